"""The web pages (WSGI): the fast ones, and /tast/..., the synchronous slow path.

``/`` answers at once.  ``/tast/report?name=N&seconds=S`` makes the report in
the request itself -- the slow path that the ``task`` group's own workers
take, with 503 + Retry-After when they are full.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from jobs import make_report


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/tast/report":
        body = json.dumps(make_report(query.get("name", "report"),
                                      float(query.get("seconds", "0.2")))).encode()
        kind = "application/json"
    elif path == "/":
        body = b"fast page\n"
        kind = "text/plain"
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", "10")])
        return [b"not found\n"]
    start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]

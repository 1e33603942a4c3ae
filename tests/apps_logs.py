"""Apps of the log tests (tests/test_logging.py): ``apps_logs:wsgi`` and ``apps_logs:asgi``.

Routes (both):

* ``/log?n=TEXT``  writes ``app-line TEXT`` to the error log (logger
  ``fastpool.error``) from the worker, then answers ``logged``
* ``/exit``        the app code raises SystemExit (the worker exits after a crash
  of the app: its queued access lines must still be written)
* anything else    ``ok``
"""

from __future__ import annotations

import logging

log = logging.getLogger("fastpool.error")


def _answer(path: str, query: str) -> bytes:
    if path == "/log":
        log.warning("app-line %s", query.partition("=")[2])
        return b"logged"
    if path == "/exit":
        raise SystemExit(3)
    return b"ok"


def wsgi(environ, start_response):
    body = _answer(environ["PATH_INFO"], environ.get("QUERY_STRING", ""))
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    body = _answer(scope["path"], scope["query_string"].decode("latin-1"))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})

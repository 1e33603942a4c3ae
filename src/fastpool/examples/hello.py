"""The bundled example: ``fastpool serve fastpool.examples.hello:app``.

``/`` says hello, ``/echo`` returns the request body, ``/json`` a small JSON
document, anything else 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

HELLO = b"Hello, World!\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [HELLO]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [body]
    if path == "/json":
        payload = json.dumps({"server": "fastpool", "path": path}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [payload]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]

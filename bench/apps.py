"""The apps every server in the benchmark serves (import as ``apps:app`` / ``apps:asgi_app``).

Rules: the WSGI ``app`` and the ASGI ``asgi_app`` send the same status, the same
headers and the same body bytes for every route, and every response carries a
Content-Length, so no server is measured doing more (or less) work than another.

Routes:

* ``GET /``      -- ``Hello, World!\\n`` (text/plain)
* ``GET /json``  -- a fixed JSON document of exactly ``JSON_SIZE`` (4096) bytes
* ``POST /echo`` -- the request body, unchanged (application/octet-stream)
* anything else  -- 404
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

HELLO = b"Hello, World!\n"
JSON_SIZE = 4096


def _make_json(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes, built once at import.

    Only letters, digits and JSON punctuation are used, so the same bytes can
    be pasted into an nginx ``return`` directive without escaping.
    """
    items = [{"id": i, "name": f"item{i:04d}", "active": i % 2 == 0} for i in range(64)]
    doc: dict[str, Any] = {"items": items, "pad": ""}
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    while base > size:
        items.pop()
        base = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["pad"] = "x" * (size - base)
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == size, len(body)
    return body


JSON_BODY = _make_json(JSON_SIZE)

_TEXT = "text/plain"
_JSON = "application/json"
_OCTETS = "application/octet-stream"
_NOT_FOUND = b"not found\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI app."""
    path = environ.get("PATH_INFO", "")
    if path == "/":
        body, ctype, status = HELLO, _TEXT, "200 OK"
    elif path == "/json":
        body, ctype, status = JSON_BODY, _JSON, "200 OK"
    elif path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        ctype, status = _OCTETS, "200 OK"
    else:
        body, ctype, status = _NOT_FOUND, _TEXT, "404 Not Found"
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def asgi_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The ASGI (3.0) app: the same routes and bytes as ``app``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/":
        body, ctype, status = HELLO, _TEXT, 200
    elif path == "/json":
        body, ctype, status = JSON_BODY, _JSON, 200
    elif path == "/echo":
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, ctype, status = b"".join(chunks), _OCTETS, 200
    else:
        body, ctype, status = _NOT_FOUND, _TEXT, 404
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""The apps that tests/fuzz.py serves: ``apps_fuzz:wsgi_app`` and ``apps_fuzz:asgi_app``.

The server is what is fuzzed, so these apps exercise a request fully (the
whole body is read) and never fail on their own: whatever the request, they
answer 200 (or the route's status) with a body, so any 5xx, malformed answer
or dead worker is the server's.  Every answer carries ``X-Method`` (the
request method), which lets the fuzzer tell a HEAD answer (no body whatever
its Content-Length) from the others.

Routes (on the path; anything not listed is the echo):

* echo          ``METHOD PATH`` and a newline, then the request body
* ``/stream``   the echo in three parts with no length (chunked, or
                close-delimited for HTTP/1.0)
* ``/noread``   ``ok`` without reading the body (the server must close after it)
* ``/204``      204 with no body

The ASGI app also accepts every WebSocket handshake, echoes the first message
(text or bytes) and closes with 1000.
"""

from __future__ import annotations

from typing import Any

TEXT = "text/plain"


TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _safe_method(method: str) -> str:
    # The method exactly (the fuzzer's reader decides by it whether a body
    # follows: "!HEAD" is not HEAD); any method token reaches the app, and a
    # token is a valid header value.  Anything else is a server bug: say so.
    return method if method and set(method) <= TCHARS else "not-a-token"


# ---------------------------------------------------------------- WSGI


def _read_all(stream: Any) -> bytes:
    parts = []
    try:
        while True:
            part = stream.read(65536)
            if not part:
                break
            parts.append(part)
    except Exception:  # noqa: BLE001 - a broken request stream is the server's report
        pass
    return b"".join(parts)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes] | Any:
    method = environ.get("REQUEST_METHOD", "")
    path = environ.get("PATH_INFO", "")
    headers = [("Content-Type", TEXT), ("X-Method", _safe_method(method))]
    if path == "/204":
        _read_all(environ["wsgi.input"])
        start_response("204 No Content", headers)
        return []
    if path == "/noread":
        start_response("200 OK", headers)
        return [b"ok"]
    head = f"{method} {path}\n".encode("latin-1", "replace")
    body = _read_all(environ["wsgi.input"])
    start_response("200 OK", headers)
    if path == "/stream":
        return iter([head, body, b"\nend\n"])
    return [head + body]


# ---------------------------------------------------------------- ASGI


async def _receive_body(receive: Any) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _websocket(receive: Any, send: Any) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    message = await receive()
    if message["type"] != "websocket.receive":
        return
    if message.get("bytes") is not None:
        await send({"type": "websocket.send", "bytes": message["bytes"]})
    else:
        await send({"type": "websocket.send", "text": message.get("text") or ""})
    await send({"type": "websocket.close", "code": 1000})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    kind = scope["type"]
    if kind == "lifespan":
        await _lifespan(receive, send)
        return
    if kind == "websocket":
        await _websocket(receive, send)
        return
    method = scope.get("method", "")
    path = scope.get("path", "")
    headers = [(b"content-type", TEXT.encode()),
               (b"x-method", _safe_method(method).encode("ascii"))]
    if path == "/noread":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = await _receive_body(receive)
    if body is None:
        return
    if path == "/204":
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    head = f"{method} {path}\n".encode("latin-1", "replace")
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for part in (head, body):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"\nend\n"})
        return
    echo = head + body
    await send({"type": "http.response.start", "status": 200,
                "headers": [*headers, (b"content-length", str(len(echo)).encode())]})
    await send({"type": "http.response.body", "body": echo})

"""The ASGI apps of ``run.py --interface asgi`` (import as ``apps_asgi:hello`` and so on).

One small app per scenario, each answering every HTTP request the same way whatever its
path, so the comparison measures the server and not a router:

* ``hello`` -- ``Hello, World!\\n`` (text/plain): the keep-alive, pipelined and
  ``Connection: close`` scenarios
* ``json``  -- the fixed 4096-byte JSON document of ``apps.py`` (application/json)
* ``echo``  -- the request body, unchanged (application/octet-stream): the POST scenarios

Rules: the bytes are those of the WSGI scenarios (``HELLO`` and ``JSON_BODY`` come from
``apps.py``); every response is one ``http.response.start`` with a Content-Type and a
Content-Length header, then one ``http.response.body``; the header lists are built once,
at import, and the message dicts per request, as a real app would. Every app also answers
the lifespan protocol (startup and shutdown complete at once), so a server that runs it
(uvicorn's ``--lifespan auto``, granian's ``asgi`` interface) does the same work as one
that does not; websocket scopes are not served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

if __package__:  # imported as bench.apps_asgi, from the repository root
    from .apps import HELLO, JSON_BODY
else:  # imported as apps_asgi, with bench/ on sys.path (how run.py starts servers)
    from apps import HELLO, JSON_BODY

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _headers(ctype: bytes, length: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", ctype), (b"content-length", str(length).encode())]


_HELLO_HEADERS = _headers(b"text/plain", len(HELLO))
_JSON_HEADERS = _headers(b"application/json", len(JSON_BODY))
_OCTETS = b"application/octet-stream"


async def _not_http(scope: Scope, receive: Receive, send: Send) -> None:
    """Lifespan: complete startup and shutdown at once. Anything else: not served."""
    if scope["type"] != "lifespan":
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """``Hello, World!\\n`` for every HTTP request."""
    if scope["type"] != "http":
        return await _not_http(scope, receive, send)
    await send({"type": "http.response.start", "status": 200, "headers": _HELLO_HEADERS})
    await send({"type": "http.response.body", "body": HELLO})


async def json(scope: Scope, receive: Receive, send: Send) -> None:
    """The 4096-byte JSON document for every HTTP request."""
    if scope["type"] != "http":
        return await _not_http(scope, receive, send)
    await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": JSON_BODY})


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """The request body back (empty for a request without one)."""
    if scope["type"] != "http":
        return await _not_http(scope, receive, send)
    chunks = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: nobody to answer
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    await send({"type": "http.response.start", "status": 200,
                "headers": _headers(_OCTETS, len(body))})
    await send({"type": "http.response.body", "body": body})

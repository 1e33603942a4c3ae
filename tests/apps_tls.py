"""The apps of the TLS tests (test_tls.py): each answers JSON of what it sees
of the connection, so a test can check what TLS gives the app.

* ``app`` (WSGI): ``scheme`` (wsgi.url_scheme), ``https``, ``ssl`` (every
  ``SSL_*`` environ key), ``remote`` (REMOTE_ADDR), ``pid``, ``path``,
  ``body`` (the request body, decoded);
* ``asgi`` (ASGI 3): ``scheme``, ``tls`` (scope["extensions"]["tls"]),
  ``client``, ``pid``, ``path``, ``body``; a WebSocket on any path echoes
  ``SCHEME:TEXT`` once and closes;
* ``web`` and ``task``: ``app`` with ``group`` set, for the routes tests.

A path ending in ``/slow`` sleeps 0.3 s first (time.sleep in WSGI, asyncio.sleep in ASGI);
``/big`` answers 1 MiB of a fixed pattern (``BIG``) instead of JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

BIG = bytes(range(256)) * 4096     # 1 MiB


def _wsgi(group: str):
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path.endswith("/slow"):
            time.sleep(0.3)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length) if length else b""
        if path == "/big":
            body = BIG
        else:
            body = json.dumps({
                "group": group, "pid": os.getpid(), "path": path,
                "scheme": environ["wsgi.url_scheme"], "https": environ.get("HTTPS"),
                "ssl": {k: v for k, v in environ.items() if k.startswith("SSL_")},
                "remote": environ.get("REMOTE_ADDR"), "body": data.decode("latin-1"),
            }).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    return app


app = _wsgi("main")
web = _wsgi("web")
task = _wsgi("task")


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send",
                    "text": f"{scope['scheme']}:{message.get('text')}"})
        await send({"type": "websocket.close"})
        return
    if scope["type"] != "http":
        return
    data = b""
    while True:
        message = await receive()
        data += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/slow"):
        await asyncio.sleep(0.3)
    if scope["path"] == "/big":
        body = BIG
    else:
        client = scope.get("client")
        body = json.dumps({
            "group": "main", "pid": os.getpid(), "path": scope["path"],
            "scheme": scope["scheme"], "tls": scope.get("extensions", {}).get("tls"),
            "remote": client[0] if client else None, "body": data.decode("latin-1"),
        }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

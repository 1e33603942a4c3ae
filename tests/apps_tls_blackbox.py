"""The apps of the black-box TLS tests (test_tls_blackbox.py): every response
is JSON of what the app saw of the request and its connection.

* WSGI (``app``; ``web`` and ``task`` for the route tests): ``group``,
  ``interface``, ``pid``, ``method``, ``path``, ``query``, ``scheme``
  (wsgi.url_scheme), ``https`` (the HTTPS key or null), ``ssl`` (every
  ``SSL_*`` environ key), ``client`` ([REMOTE_ADDR, REMOTE_PORT]),
  ``length``/``sha256`` of the body and the body itself when short;
* ASGI 3 (``asgi``; ``asgi_web``, ``asgi_task`` and ``asgi_api``), coroutine functions, so
  that ``interface`` auto-detects them: the same, with ``scheme`` from the
  scope, ``tls`` (scope["extensions"]["tls"], or null) and ``extensions``
  (the names of the scope's extensions) instead of ``https``/``ssl``.

Every response has an ``X-Pid`` header.  A path whose last segment is
``slow`` takes ``?s=SECONDS&tag=TAG``: it writes ``sleeping TAG PID`` to the
server log (wsgi.errors / stderr) and sleeps (time.sleep in WSGI,
asyncio.sleep in ASGI) before answering.  A path whose last segment is
``echo`` answers the request body itself (application/octet-stream) instead
of JSON.  A WebSocket (ASGI) is accepted, gets one text message (JSON:
``scheme``, ``tls``: whether the scope has the tls extension, ``path``,
``pid``) and is closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from typing import Any
from urllib.parse import parse_qs

SHORT_BODY = 200


def _answer(group: str, interface: str, method: str, path: str, query: str,
            body: bytes, **seen: Any) -> bytes:
    return json.dumps({
        "group": group, "interface": interface, "pid": os.getpid(),
        "method": method, "path": path, "query": query,
        "length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
        "body": body.decode("latin-1") if len(body) <= SHORT_BODY else None,
        **seen,
    }).encode()


def _slow(query: str) -> tuple[float, str] | None:
    args = {k: v[0] for k, v in parse_qs(query).items()}
    return float(args.get("s", "1")), args.get("tag", "-")


def _echo_wsgi(body: bytes, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(body))),
                              ("X-Pid", str(os.getpid()))])
    return [body]


def _wsgi(group: str):
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        body = environ["wsgi.input"].read()
        if path.rsplit("/", 1)[-1] == "slow":
            seconds, tag = _slow(query)
            environ["wsgi.errors"].write(f"sleeping {tag} {os.getpid()}\n")
            environ["wsgi.errors"].flush()
            time.sleep(seconds)
        if path.rsplit("/", 1)[-1] == "echo":
            return _echo_wsgi(body, start_response)
        port = environ.get("REMOTE_PORT")
        data = _answer(
            group, "wsgi", environ["REQUEST_METHOD"], path, query, body,
            scheme=environ.get("wsgi.url_scheme"), https=environ.get("HTTPS"),
            ssl={k: v for k, v in environ.items() if k.startswith("SSL_")},
            client=[environ.get("REMOTE_ADDR"), int(port) if port else None])
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(data))),
                                  ("X-Pid", str(os.getpid()))])
        return [data]

    app.__name__ = group
    return app


async def _websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accept, send one text message (JSON: the scope's scheme, whether it has
    the tls extension, the path), close."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    extensions = scope.get("extensions") or {}
    await send({"type": "websocket.send", "text": json.dumps({
        "scheme": scope.get("scheme"), "tls": extensions.get("tls") is not None,
        "path": scope["path"], "pid": os.getpid()})})
    await send({"type": "websocket.close", "code": 1000})


def _asgi(group: str):
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await _websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        parts = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        if path.rsplit("/", 1)[-1] == "slow":
            seconds, tag = _slow(query)
            print(f"sleeping {tag} {os.getpid()}", file=sys.stderr, flush=True)
            await asyncio.sleep(seconds)
        if path.rsplit("/", 1)[-1] == "echo":
            body = b"".join(parts)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"x-pid", str(os.getpid()).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        extensions = scope.get("extensions") or {}
        client = scope.get("client")
        data = _answer(
            group, "asgi", scope["method"], path, query, b"".join(parts),
            scheme=scope.get("scheme"), tls=extensions.get("tls"),
            extensions=sorted(extensions),
            client=list(client) if client else [None, None])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()),
                                (b"x-pid", str(os.getpid()).encode())]})
        await send({"type": "http.response.body", "body": data})

    app.__name__ = group
    return app


app = _wsgi("main")
web = _wsgi("web")
task = _wsgi("task")

asgi = _asgi("main")
asgi_web = _asgi("web")
asgi_task = _asgi("task")
asgi_api = _asgi("api")

"""The apps of the route tests (test_routes.py), one object per group, so that
every response says which group's worker served it (groups share the
environment, so the app object is the only thing that tells them apart):

* ``web``  (WSGI): the group with the listener;
* ``task`` (WSGI): a group reached through ``routes``;
* ``queue`` (WSGI): another routed group (the max_queue_wait tests);
* ``api``  (ASGI 3, auto-detected): a routed group of the other interface.

Every response is JSON: ``group``, ``pid``, ``method``, ``path`` (as the app
got it), ``query``, ``client_port`` (the client's TCP port: the same on every
request of one connection, whichever group serves it), ``client_host``,
``server_port`` (the port the client connected to), ``length`` and
``sha256`` of the request body, and the body itself when it is short.  The
worker's pid is also in an ``X-Pid`` header (for clusters.Load).

A path whose last segment is ``sleep`` (``/sleep``, ``/tast/sleep`` ...)
takes ``?s=SECONDS&tag=TAG``: it writes ``sleeping TAG PID`` to the server log
(wsgi.errors / stderr), then sleeps (time.sleep in WSGI, asyncio.sleep in
ASGI) before answering.
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

SHORT_BODY = 200    # bodies up to this size are echoed in the response


def _describe(group: str, method: str, path: str, query: str, client_port: int | None,
              body: bytes, client_host: str | None = None,
              server_port: int | None = None) -> bytes:
    return json.dumps({
        "group": group,
        "pid": os.getpid(),
        "method": method,
        "path": path,
        "query": query,
        "client_port": client_port,
        "client_host": client_host,
        "server_port": server_port,
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "body": body.decode("latin-1") if len(body) <= SHORT_BODY else None,
    }).encode()


def _sleep_args(query: str) -> tuple[float, str]:
    args = {k: v[0] for k, v in parse_qs(query).items()}
    return float(args.get("s", "1")), args.get("tag", "-")


def _wsgi_app(group: str):
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        body = environ["wsgi.input"].read()
        if path.rsplit("/", 1)[-1] == "sleep":
            seconds, tag = _sleep_args(query)
            environ["wsgi.errors"].write(f"sleeping {tag} {os.getpid()}\n")
            environ["wsgi.errors"].flush()
            time.sleep(seconds)
        port, server = environ.get("REMOTE_PORT"), environ.get("SERVER_PORT")
        data = _describe(group, environ["REQUEST_METHOD"], path, query,
                         int(port) if port else None, body, environ.get("REMOTE_ADDR"),
                         int(server) if server else None)
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(data))),
                                  ("X-Pid", str(os.getpid()))])
        return [data]

    app.__name__ = group
    return app


web = _wsgi_app("web")
task = _wsgi_app("task")
queue = _wsgi_app("queue")


async def api(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI group (a coroutine function: ``interface`` auto-detects it)."""
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
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(parts)
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope["path"]
    if path.rsplit("/", 1)[-1] == "sleep":
        seconds, tag = _sleep_args(query)
        print(f"sleeping {tag} {os.getpid()}", file=sys.stderr, flush=True)
        await asyncio.sleep(seconds)
    client, server = scope.get("client"), scope.get("server")
    data = _describe("api", scope["method"], path, query, client[1] if client else None, body,
                     client[0] if client else None, server[1] if server else None)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"x-pid", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": data})

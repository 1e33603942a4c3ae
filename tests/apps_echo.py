"""Echo apps for the request corpus replay (tests/test_corpus_sockets.py).

Every request gets a 200 whose body is JSON describing what the app saw:
``method``, ``target``, ``headers`` (sorted ``[name, value]`` pairs with
lower-case names), ``body`` (latin-1), ``interface`` and ``pid`` (the worker
that answered).  A HEAD response has no body, so its description also goes in
an ``X-Echo`` header (JSON is ASCII here: every other byte is escaped).

* ``app`` (WSGI): the target is ``RAW_URI``; the headers are rebuilt from the
  environ (``HTTP_X_FOO`` -> ``x-foo``, ``CONTENT_TYPE`` -> ``content-type``,
  ``CONTENT_LENGTH`` -> ``content-length``); the body is ``wsgi.input.read()``.
* ``asgi_app`` (ASGI): the target is ``raw_path`` plus ``?`` and the query
  string when there is one; the headers are the scope's list; the body is every
  ``http.request`` message joined.  A WebSocket handshake is accepted, the
  description sent as one text message, and the socket closed with 1000.
"""

from __future__ import annotations

import json
import os


def describe(interface: str, method: str, target: str, headers: list[list[str]],
             body: bytes) -> bytes:
    return json.dumps({"interface": interface, "pid": os.getpid(), "method": method,
                       "target": target, "headers": sorted(headers),
                       "body": body.decode("latin-1")}).encode("ascii")


def response_headers(description: bytes, method: str) -> list[tuple[str, str]]:
    headers = [("Content-Type", "application/json"),
               ("Content-Length", str(len(description)))]
    if method == "HEAD":
        headers.append(("X-Echo", description.decode("ascii")))
    return headers


# ---------------------------------------------------------------- WSGI


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append([key[5:].lower().replace("_", "-"), value])
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            headers.append([key.lower().replace("_", "-"), value])
    method = environ["REQUEST_METHOD"]
    description = describe("wsgi", method, environ["RAW_URI"], headers, body)
    start_response("200 OK", response_headers(description, method))
    return [description]


# ---------------------------------------------------------------- ASGI


def _scope_view(scope) -> tuple[str, list[list[str]]]:
    target = scope["raw_path"].decode("latin-1")
    if scope["query_string"]:
        target += "?" + scope["query_string"].decode("latin-1")
    headers = [[bytes(name).decode("latin-1"), bytes(value).decode("latin-1")]
               for name, value in scope["headers"]]
    return target, headers


async def asgi_app(scope, receive, send):
    kind = scope["type"]
    if kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    target, headers = _scope_view(scope)
    if kind == "websocket":
        await receive()   # websocket.connect
        await send({"type": "websocket.accept"})
        description = describe("asgi", "GET", target, headers, b"")
        await send({"type": "websocket.send", "text": description.decode("ascii")})
        await send({"type": "websocket.close", "code": 1000})
        return
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    method = scope["method"]
    description = describe("asgi", method, target, headers, b"".join(parts))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(name.encode("latin-1"), value.encode("latin-1"))
                            for name, value in response_headers(description, method)]})
    await send({"type": "http.response.body", "body": description})

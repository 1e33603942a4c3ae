"""The ASGI twin of apps_http.py (``apps_http_asgi:app``), for test_http.py and
test_limits.py run with ``--interface asgi``.

The same routes answer the same status, headers and bytes as the WSGI app, so
every protocol test checks both workers with one set of expectations.  Written
by hand against the ASGI 3 spec; like apps_http.py, several routes misbehave
on purpose.  Where a WSGI route lets the server pick the framing of a one-part
body (a list of one item), this app sets Content-Length itself, since an ASGI
server may send such a body chunked; streamed bodies have no length in both.

Routes (see apps_http.py):

* ``/echo``, ``/echo-chunks``  the request body, read with receive() to the end
  (a ``http.disconnect`` ends the route without a response)
* ``/noread``        ``ok`` without receiving the body
* ``/stream?n=N``    N parts, one ``http.response.body`` each, no Content-Length
* ``/events?n=N&every=S``  N server-sent events, one every S seconds
* ``/big?size=N``    N bytes of ``pattern`` in 64 KiB messages; ``&chunked=1``: no length
* ``/close``         ``bye`` with an app header ``Connection: close``
* ``/status/NNN``    that status, an empty body, no length; ``?length=N``: Content-Length N
* ``/overlong``      declares Content-Length 5, sends 10 bytes
* ``/short``         declares Content-Length 10, sends 5 bytes
* ``/raise``         raises before ``http.response.start``
* ``/raise-stream``  sends one part of a streamed response, then raises
* ``/nonbytes``      sends a body that is a str
* ``/pid``           the worker's pid
* ``/env``           the keys of apps_http's ``/env``, derived from the scope
* ``/peer``          apps_http's ``/peer`` from scope["client"] and scope["server"]
* anything else      ``METHOD PATH?QUERY``
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import parse_qs

from apps_http import BLOCK, block

TEXT = [(b"content-type", b"text/plain")]
OCTETS = [(b"content-type", b"application/octet-stream")]


def _query(scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}


async def _respond(send, body: bytes, headers=TEXT, status: int = 200) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    assert scope["type"] == "http", scope["type"]
    path = scope["path"]
    method = scope["method"]
    if path in ("/echo", "/echo-chunks"):
        body = await _read_body(receive)
        if body is not None:
            await _respond(send, body, OCTETS)
        return
    if path == "/noread":
        await _respond(send, b"ok")
        return
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": TEXT})
        for i in range(int(_query(scope).get("n", "5"))):
            await send({"type": "http.response.body", "body": b"part %d\n" % i,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/events":
        query = _query(scope)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(int(query.get("n", "5"))):
            if i:
                await asyncio.sleep(float(query.get("every", "0.2")))
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/big":
        query = _query(scope)
        size = int(query["size"])
        headers = list(OCTETS)
        if query.get("chunked") != "1":
            headers.append((b"content-length", str(size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        index = 0
        remaining = size
        while remaining > 0:
            await send({"type": "http.response.body", "body": block(index)[:remaining],
                        "more_body": remaining > BLOCK})
            remaining -= BLOCK
            index += 1
        if size == 0:
            await send({"type": "http.response.body", "body": b""})
        return
    if path == "/close":
        await _respond(send, b"bye", TEXT + [(b"connection", b"close")])
        return
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        length = _query(scope).get("length")
        headers = TEXT + ([(b"content-length", length.encode())] if length else [])
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/overlong":
        await send({"type": "http.response.start", "status": 200,
                    "headers": TEXT + [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"01234", "more_body": True})
        await send({"type": "http.response.body", "body": b"56789"})
        return
    if path == "/short":
        await send({"type": "http.response.start", "status": 200,
                    "headers": TEXT + [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"01234"})
        return
    if path == "/raise":
        raise RuntimeError("boom before http.response.start")
    if path == "/raise-stream":
        await send({"type": "http.response.start", "status": 200, "headers": TEXT})
        await send({"type": "http.response.body", "body": b"first part\n", "more_body": True})
        raise RuntimeError("boom in the middle of a streamed response")
    if path == "/nonbytes":
        await send({"type": "http.response.start", "status": 200, "headers": TEXT})
        await send({"type": "http.response.body", "body": "not bytes"})
        return
    if path == "/pid":
        await _respond(send, str(os.getpid()).encode())
        return
    if path == "/peer":
        # apps_http's /peer from the scope (ports as text, as WSGI has them).
        client, server = scope.get("client"), scope.get("server")
        shown = {"client": [client[0], str(client[1])] if client else ["", None],
                 "server": [server[0], str(server[1])] if server else None}
        await _respond(send, json.dumps(shown).encode(), [(b"content-type", b"application/json")])
        return
    if path == "/env":
        # What apps_http's /env shows, from the scope: the same request facts.
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").upper().replace("-", "_")
            if key not in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                key = "HTTP_" + key
            headers[key] = value.decode("latin-1")
        shown = {"REQUEST_METHOD": method, "PATH_INFO": path,
                 "QUERY_STRING": scope["query_string"].decode("latin-1"),
                 "SERVER_PROTOCOL": "HTTP/" + scope["http_version"]}
        for key in ("CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "HTTP_EXPECT"):
            if key in headers:
                shown[key] = headers[key]
        await _respond(send, json.dumps(shown).encode(), [(b"content-type", b"application/json")])
        return
    query = scope["query_string"].decode("latin-1")
    body = f"{method} {path}{'?' + query if query else ''}".encode("utf-8", "surrogateescape")
    await _respond(send, body)

"""WSGI apps for the HTTP protocol and limit tests (``apps_http:app``).

One router app; the path picks the behaviour.  Deliberately not wrapped in
``wsgiref.validate``: several routes misbehave on purpose (raise, yield str,
lie about Content-Length) to check how the server copes.

Routes:

* ``/echo``          the request body (read with ``read()``), Content-Length set
* ``/echo-chunks``   the request body, read with ``read(8192)`` until empty
* ``/noread``        ``ok`` without touching the body
* ``/stream?n=N``    N parts from a generator, no Content-Length
* ``/events?n=N&every=S``  N server-sent events, one every S seconds (a generator
  that sleeps between them: each must reach the client when it is produced)
* ``/big?size=N``    N bytes of ``pattern`` in 64 KiB blocks; ``&chunked=1``: no length
* ``/close``         ``bye`` with an app header ``Connection: close``
* ``/status/NNN``    that status, empty generator body; ``?length=N``: with Content-Length N
* ``/overlong``      declares Content-Length 5, yields 10 bytes
* ``/short``         declares Content-Length 10, yields 5 bytes
* ``/raise``         raises before start_response
* ``/raise-stream``  yields one part of a streamed response, then raises
* ``/nonbytes``      returns a list holding a str
* ``/write-list``    two parts through write(), then a list of two more
* ``/file?path=P``   the file P through ``wsgi.file_wrapper`` (a download the app returns)
* ``/pid``           the worker's pid
* ``/env``           a few environ keys as JSON
* ``/peer``          the client and server addresses as JSON (REMOTE_ADDR/PORT, SERVER_NAME/PORT)
* anything else      ``METHOD PATH?QUERY``
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import parse_qs

BLOCK = 65536


def pattern(size: int) -> bytes:
    """``size`` bytes where every 64 KiB block starts with its own index, so a
    lost, repeated or reordered block changes the result."""
    parts = []
    index = 0
    remaining = size
    while remaining > 0:
        parts.append(block(index)[:remaining])
        remaining -= BLOCK
        index += 1
    return b"".join(parts)


# (index + i) % 251 for i in range(...), for any index: a slice of this.
_CYCLE = bytes(i % 251 for i in range(251 + BLOCK))


def block(index: int) -> bytes:
    head = b"[block %08d]" % index
    start = index % 251
    return head + _CYCLE[start:start + BLOCK - len(head)]


def _query(environ) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _big(size: int):
    index = 0
    remaining = size
    while remaining > 0:
        yield block(index)[:remaining]
        remaining -= BLOCK
        index += 1


def _raise_stream(start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first part\n"
    raise RuntimeError("boom in the middle of a streamed response")


def _stream(count: int):
    for i in range(count):
        yield b"part %d\n" % i


def _events(count: int, every: float):
    for i in range(count):
        if i:
            time.sleep(every)
        yield b"data: %d\n\n" % i


def app(environ, start_response):
    path = environ["PATH_INFO"]
    method = environ["REQUEST_METHOD"]
    text = [("Content-Type", "text/plain")]
    if path == "/file":
        name = _query(environ)["path"]
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(os.path.getsize(name)))])
        return environ["wsgi.file_wrapper"](open(name, "rb"))    # noqa: SIM115 (closed by the server)
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [body]
    if path == "/echo-chunks":
        parts = []
        while True:
            part = environ["wsgi.input"].read(8192)
            if not part:
                break
            parts.append(part)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [b"".join(parts)]
    if path == "/noread":
        start_response("200 OK", text)
        return [b"ok"]
    if path == "/stream":
        start_response("200 OK", text)
        return _stream(int(_query(environ).get("n", "5")))
    if path == "/events":
        query = _query(environ)
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return _events(int(query.get("n", "5")), float(query.get("every", "0.2")))
    if path == "/big":
        query = _query(environ)
        size = int(query["size"])
        headers = [("Content-Type", "application/octet-stream")]
        if query.get("chunked") != "1":
            headers.append(("Content-Length", str(size)))
        start_response("200 OK", headers)
        return _big(size)
    if path == "/close":
        start_response("200 OK", text + [("Connection", "close")])
        return [b"bye"]
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        reasons = {204: "No Content", 304: "Not Modified"}
        length = _query(environ).get("length")
        start_response(f"{code} {reasons.get(code, 'Whatever')}",
                       text + ([("Content-Length", length)] if length else []))
        return iter([b""])
    if path == "/overlong":
        start_response("200 OK", text + [("Content-Length", "5")])
        return iter([b"01234", b"56789"])
    if path == "/short":
        start_response("200 OK", text + [("Content-Length", "10")])
        return iter([b"01234"])
    if path == "/raise":
        raise RuntimeError("boom before start_response")
    if path == "/raise-stream":
        return _raise_stream(start_response)
    if path == "/nonbytes":
        start_response("200 OK", text)
        return ["not bytes"]
    if path == "/write-list":
        write = start_response("200 OK", text)
        write(b"one,")
        write(b"two,")
        return [b"three,", b"four"]
    if path == "/pid":
        start_response("200 OK", text)
        return [str(os.getpid()).encode()]
    if path == "/peer":
        # The addresses the server gives the app (the PROXY protocol tests).
        shown = {"client": [environ["REMOTE_ADDR"], environ.get("REMOTE_PORT") or None],
                 "server": [environ["SERVER_NAME"], environ["SERVER_PORT"]]}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(shown).encode()]
    if path == "/env":
        keys = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL",
                "CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "HTTP_EXPECT")
        shown = {k: environ[k] for k in keys if k in environ}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(shown).encode()]
    query = environ.get("QUERY_STRING", "")
    body = f"{method} {path}{'?' + query if query else ''}".encode("latin-1")
    start_response("200 OK", text)
    return [body]

"""Plain ASGI 3 apps (no framework), written by hand for test_asgi.py and
test_asgi_websocket.py.

``app`` is a coroutine function that routes on ``scope["path"]`` for the
``http`` and ``websocket`` scopes and speaks the lifespan protocol.  Facts a
test cannot see on the wire are written as files in the server's working
directory (each test server has its own): ``lifespan-startup-PID``,
``lifespan-shutdown-PID``, ``disconnect-TAG``, ``ws-disconnect-TAG`` ... so a
test reads them after the fact, whichever process wrote them.

HTTP routes:

* ``/scope[/...]``         the scope as JSON (bytes as ``{"bytes": latin-1 text}``)
* ``/echo``                the request body (Content-Length set)
* ``/body-info``           the ``http.request`` messages received: count, sizes,
                           ``more_body`` flags, total length and sha256 of the body
* ``/stream?n=N&cl=1&delay=S``  N parts ``part I\\n`` sent one message each;
                           ``cl=1``: with a Content-Length; ``delay``: seconds between parts
* ``/sleep?s=S``           ``slept S`` after ``asyncio.sleep(S)``
* ``/slow?s=S&tag=T``      writes ``sleeping-T``, sleeps, answers ``slept``, writes ``done-T``
* ``/pid``                 the worker's pid
* ``/loop``                the class of the running event loop (``module.QualName``)
* ``/lifespan``            the lifespan events this process saw, as JSON
* ``/state-mutate``        sets ``scope["state"]["mutated"]``; answers the state's keys
* ``/raise``               raises before ``http.response.start``
* ``/raise-after-start``   sends the start and one part, then raises
* ``/no-response``         returns without sending anything
* ``/misuse?kind=K``       sends ASGI messages in an order or shape the spec forbids
                           (``MISUSES``); the server must refuse each in the app's send
* ``/bad-header?kind=K``   a response header that must never be sent (``BAD_HEADERS``)
* ``/context?set=V&s=S``   sets a context variable to V, sleeps S (0: no suspension at
                           all), answers what it was before and what it is after
* ``/disconnect?tag=T``    receives until ``http.disconnect`` (noting each message in
                           ``receiving-T``), then tries to send; the outcome in ``disconnect-T``
* anything else            ``METHOD PATH``

WebSocket routes (the first message is always ``websocket.connect``):

* ``/ws/echo?tag=T``       accepts and echoes text and bytes; with a tag, the
                           ``websocket.disconnect`` it gets goes to ``ws-disconnect-T``
                           with the messages it received (``repr``, 100 characters)
* ``/ws/subprotocol``      accepts with ``chat.v2`` if offered, else ``chat.v1`` if
                           offered, else none; sends the offered list as JSON
* ``/ws/close?code=C&reason=R``  accepts, then closes with that code and reason
* ``/ws/reject``           closes before accepting (the handshake gets 403)
* ``/ws/scope``            accepts, sends the scope as JSON, closes with 1000
* ``/ws/accept-on-release?tag=T``  accepts only once the file ``release-T`` exists in
                           its working directory, then echoes like ``/ws/echo``

Other apps: ``instance_app`` (an object whose ``__call__`` is a coroutine
function), ``ASGI2App`` (the ASGI 2 double callable), ``startup_fails`` and
``startup_raises`` (lifespan startup failures), ``no_lifespan`` (raises on the
lifespan scope), ``wsgi_app`` (a plain WSGI app).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

TEXT = [(b"content-type", b"text/plain")]
JSON = [(b"content-type", b"application/json")]

# The lifespan events of this process, in order.
LIFESPAN_EVENTS: list[str] = []
# /context: set in one request, it must not be seen by the next one.
REQUEST_VALUE: contextvars.ContextVar[str] = contextvars.ContextVar("request_value",
                                                                     default="unset")

# kind -> (name, value) of a header a server must refuse to send.
BAD_HEADERS = {
    "newline-in-value": (b"x-bad", b"a\nInjected: yes"),
    "cr-in-value": (b"x-bad", b"a\rInjected: yes"),
    "crlf-in-value": (b"x-bad", b"a\r\nInjected: yes"),
    "nul-in-value": (b"x-bad", b"a\x00Injected"),
    "space-in-name": (b"x bad", b"value"),
    "colon-in-name": (b"x-bad:", b"value"),
    "empty-name": (b"", b"value"),
}


# ---------------------------------------------------------------- helpers


def jsonable(value: Any) -> Any:
    """The scope as JSON: bytes become ``{"bytes": ...}`` so a test can tell them from str."""
    if isinstance(value, bytes):
        return {"bytes": value.decode("latin-1")}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return {"repr": repr(value)}


def query(scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}


def write(name: str, payload: Any) -> None:
    """A record for the test, in the server's working directory (written whole)."""
    path = Path.cwd() / name
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload))
    partial.replace(path)


async def respond(send, body: bytes, headers=TEXT, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send, payload: Any) -> None:
    await respond(send, json.dumps(payload).encode(), JSON)


async def read_body(receive) -> tuple[bytes, list[dict[str, Any]]]:
    """The body and a summary of each message it came in."""
    parts = []
    messages = []
    while True:
        message = await receive()
        body = message.get("body", b"")
        messages.append({"type": message["type"], "size": len(body),
                         "body_type": type(body).__name__,
                         "more_body": message.get("more_body", False)})
        if message["type"] != "http.request":
            break
        parts.append(body)
        if not message.get("more_body", False):
            break
    return b"".join(parts), messages


# ---------------------------------------------------------------- lifespan


async def lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            LIFESPAN_EVENTS.append("startup")
            state = scope.get("state")
            if state is None:
                LIFESPAN_EVENTS.append("no state in the lifespan scope")
            else:
                state["answer"] = 42
                state["started_by"] = os.getpid()
            write(f"lifespan-startup-{os.getpid()}", {"time": time.time()})
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            LIFESPAN_EVENTS.append("shutdown")
            write(f"lifespan-shutdown-{os.getpid()}", {"time": time.time()})
            await send({"type": "lifespan.shutdown.complete"})
            return


# ---------------------------------------------------------------- HTTP

_START = {"type": "http.response.start", "status": 200,
          "headers": [(b"content-type", b"text/plain")]}
_BODY = {"type": "http.response.body", "body": b"done"}

# Message sequences an app must not send; each raises in the app's send.
MISUSES = {
    "body-before-start": [_BODY],
    "start-twice": [_START, _START],
    "body-after-complete": [_START, _BODY, _BODY],
    "unknown-type": [{"type": "http.response.bogus"}],
    "status-not-int": [{"type": "http.response.start", "status": "200"}],
    "status-out-of-range": [{"type": "http.response.start", "status": 42}],
    "body-not-bytes": [_START, {"type": "http.response.body", "body": "text"}],
    "websocket-message": [{"type": "websocket.accept"}],
}


async def http(scope, receive, send) -> None:
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    if path == "/scope" or path.startswith("/scope/"):
        await respond_json(send, jsonable(scope))
    elif path == "/echo":
        body, _ = await read_body(receive)
        await respond(send, body, [(b"content-type", b"application/octet-stream")])
    elif path == "/body-info":
        body, messages = await read_body(receive)
        await respond_json(send, {"length": len(body),
                                  "sha256": hashlib.sha256(body).hexdigest(),
                                  "messages": messages})
    elif path == "/stream":
        await stream(scope, send)
    elif path == "/sleep":
        seconds = float(query(scope).get("s", "0.2"))
        await asyncio.sleep(seconds)
        await respond(send, f"slept {seconds}".encode())
    elif path == "/slow":
        args = query(scope)
        write(f"sleeping-{args['tag']}", {"time": time.time()})
        await asyncio.sleep(float(args.get("s", "1")))
        await respond(send, b"slept")
        write(f"done-{args['tag']}", {"time": time.time()})
    elif path == "/pid":
        await respond(send, str(os.getpid()).encode())
    elif path == "/loop":
        loop = type(asyncio.get_running_loop())
        await respond(send, f"{loop.__module__}.{loop.__qualname__}".encode())
    elif path == "/lifespan":
        await respond_json(send, LIFESPAN_EVENTS)
    elif path == "/state-mutate":
        state = scope["state"]
        state["mutated"] = True
        await respond_json(send, sorted(state))
    elif path == "/raise":
        raise RuntimeError("boom before http.response.start")
    elif path == "/raise-after-start":
        await send({"type": "http.response.start", "status": 200, "headers": TEXT})
        await send({"type": "http.response.body", "body": b"first part\n", "more_body": True})
        raise RuntimeError("boom after http.response.start")
    elif path == "/no-response":
        return
    elif path == "/misuse":
        for message in MISUSES[query(scope)["kind"]]:
            await send(message)
    elif path == "/bad-header":
        name, value = BAD_HEADERS[query(scope)["kind"]]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-good", b"fine"), (name, value), *TEXT]})
        await send({"type": "http.response.body", "body": b"must never be sent"})
    elif path == "/disconnect":
        await disconnect(scope, receive, send)
    elif path == "/context":
        # What a request saw of the context var before setting it, and after a
        # suspension (query s: seconds) whether its own value survived it.
        before = REQUEST_VALUE.get()
        REQUEST_VALUE.set(query(scope)["set"])
        await asyncio.sleep(float(query(scope).get("s", "0")))
        await respond_json(send, {"before": before, "after": REQUEST_VALUE.get()})
    else:
        await respond(send, f"{scope['method']} {path}".encode())


async def stream(scope, send) -> None:
    args = query(scope)
    count = int(args.get("n", "3"))
    delay = float(args.get("delay", "0"))
    parts = [b"part %d\n" % i for i in range(count)]
    headers = list(TEXT)
    if args.get("cl") == "1":
        headers.append((b"content-length", str(sum(map(len, parts))).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for index, part in enumerate(parts):
        if index and delay:
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def disconnect(scope, receive, send) -> None:
    tag = query(scope)["tag"]
    messages = []
    while True:
        message = await receive()
        messages.append({"type": message["type"], "size": len(message.get("body", b"")),
                         "more_body": message.get("more_body", False)})
        write(f"receiving-{tag}", messages)
        if message["type"] == "http.disconnect":
            break
        if len(messages) > 10000:
            break
    outcome: dict[str, Any] = {"messages": messages, "send_error": None}
    try:
        await send({"type": "http.response.start", "status": 200, "headers": TEXT})
        await send({"type": "http.response.body", "body": b"too late"})
    except BaseException as exc:   # noqa: B036 - recorded for the test, whatever it is
        outcome["send_error"] = type(exc).__name__
        outcome["send_error_is_oserror"] = isinstance(exc, OSError)
    write(f"disconnect-{tag}", outcome)


# ---------------------------------------------------------------- WebSocket


async def websocket(scope, receive, send) -> None:
    path = scope["path"]
    args = query(scope)
    connect = await receive()
    assert connect["type"] == "websocket.connect", connect
    if path == "/ws/reject":
        await send({"type": "websocket.close", "code": 1008})
        return
    if path == "/ws/subprotocol":
        offered = scope.get("subprotocols", [])
        chosen = next((p for p in ("chat.v2", "chat.v1") if p in offered), None)
        await send({"type": "websocket.accept", "subprotocol": chosen})
        await send({"type": "websocket.send", "text": json.dumps(list(offered))})
    elif path == "/ws/close":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": int(args.get("code", "1000")),
                    "reason": args.get("reason", "")})
        return
    elif path == "/ws/scope":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(jsonable(scope))})
        await send({"type": "websocket.close", "code": 1000})
        return
    elif path == "/ws/accept-on-release":
        release = Path.cwd() / f"release-{args['tag']}"
        while not release.exists():
            await asyncio.sleep(0.02)
        await send({"type": "websocket.accept"})
    else:
        await send({"type": "websocket.accept"})
    received: list[str] = []
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            if "tag" in args:
                write(f"ws-disconnect-{args['tag']}",
                      {"code": message.get("code"), "reason": message.get("reason"),
                       "received": received})
            return
        data = message.get("bytes")
        received.append(repr(data if data is not None else message["text"])[:100])
        reply = {"type": "websocket.send"}
        reply.update({"bytes": data} if data is not None else {"text": message["text"]})
        try:
            await send(reply)
        except OSError:
            if "tag" not in args:
                raise
            # (tagged: closed while echoing; the disconnect comes next, and is recorded)


# ---------------------------------------------------------------- the apps


async def app(scope: dict[str, Any], receive, send) -> None:
    kind = scope["type"]
    if kind == "lifespan":
        await lifespan(scope, receive, send)
    elif kind == "websocket":
        await websocket(scope, receive, send)
    else:
        assert kind == "http", kind
        await http(scope, receive, send)


class _Instance:
    """An ASGI 3 app that is an object: its ``__call__`` is a coroutine function."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await respond_json(send, {"app": "instance", "type": scope["type"],
                                      "asgi": scope["asgi"]})
        else:
            await app(scope, receive, send)


instance_app = _Instance()


class ASGI2App:
    """The ASGI 2 double callable: ``App(scope)``, then ``await instance(receive, send)``."""

    def __init__(self, scope: dict[str, Any]) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"ASGI2App serves http only, not {scope['type']}")
        self.scope = scope

    async def __call__(self, receive, send) -> None:
        body, _ = await read_body(receive)
        await respond_json(send, {"app": "asgi2", "path": self.scope["path"],
                                  "body": body.decode("latin-1")})


async def startup_fails(scope, receive, send) -> None:
    """Lifespan startup answered with ``lifespan.startup.failed``."""
    if scope["type"] == "lifespan":
        message = await receive()
        assert message["type"] == "lifespan.startup"
        write(f"startup-attempt-{os.getpid()}", {"time": time.time()})
        await send({"type": "lifespan.startup.failed",
                    "message": "no database at db.invalid:5432"})
        return
    await app(scope, receive, send)


async def startup_raises(scope, receive, send) -> None:
    """Lifespan startup that raises."""
    if scope["type"] == "lifespan":
        message = await receive()
        assert message["type"] == "lifespan.startup"
        write(f"startup-attempt-{os.getpid()}", {"time": time.time()})
        raise RuntimeError("startup exploded: cache unreachable")
    await app(scope, receive, send)


async def no_lifespan(scope, receive, send) -> None:
    """An app that does not speak the lifespan protocol (as many do): it raises."""
    if scope["type"] != "http":
        raise ValueError(f"unsupported scope type {scope['type']!r}")
    await app(scope, receive, send)


def wsgi_app(environ, start_response):
    """A plain WSGI app, for ``--interface`` detection."""
    body = json.dumps({"app": "wsgi", "SERVER_PROTOCOL": environ["SERVER_PROTOCOL"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

"""ASGI WebSocket sessions, on a connection the compiled ASGI worker upgraded.

Rules of this module:

* Framing, masking, ping/pong replies, the close handshake, UTF-8 checks,
  permessage-deflate and the message size limit are done by the sans-I/O
  protocol of the ``websockets`` package (``ServerProtocol``); this module
  only moves bytes between it, the asyncio transport and the app's
  ``receive``/``send``.  A malformed frame fails the connection there (1002,
  1007, 1009 ...), never here: nothing a client sends raises out of
  ``data_received``.
* permessage-deflate is offered unless ``Options.per_message_deflate`` is
  false; the size limit applies to the decompressed message.
* The handshake is checked before the app is called: an invalid one is
  answered by ``websockets`` (400/426) and the app never sees it.  The app
  then answers ``websocket.connect`` with ``websocket.accept`` (the 101
  response goes out, with its subprotocol and headers) or ``websocket.close``
  (403, as uvicorn does).
* The access log (when on) gets one line per session, when the handshake is
  answered: 101 for an accepted session, else the HTTP status sent (403, 400,
  500 ...), as uvicorn and hypercorn log WebSockets.
* Flow control goes through the connection's ``FlowControl`` (shared with
  the HTTP protocol, _asgi.pyx): the app's ``send`` waits while the client is
  not reading; more than ``INBOX_HIGH_WATER`` messages the app has not received
  hold reading from the socket, and so do more than ``EARLY_DATA_LIMIT`` bytes
  sent before the app accepted (kept, unparsed, until it does).
* Once the protocol fails the connection (a malformed frame, invalid UTF-8),
  nothing more is delivered to the app, not even messages that came in the
  same read.
* ``tick`` (once a second) pings an idle client every ``ping_interval`` seconds
  and closes with 1011 when no pong comes within ``ping_timeout``.
* On the worker's graceful stop, open sessions are closed with 1012 (service
  restart).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from fastpool._asgi import HOLD_EARLY, HOLD_INBOX
from fastpool._http import error_response
from fastpool.log import asgi_environ

log = logging.getLogger("fastpool.error")

INBOX_HIGH_WATER = 64
EARLY_DATA_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Options:
    max_size: int = 16 * 1024 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    per_message_deflate: bool = True
    access_log: Any = None     # the worker's fastpool.log.AccessLog, or None


# permessage-deflate with the settings the websockets package's own servers use
# by default: 4 KiB windows and memLevel 5 keep zlib's state per connection
# near 50 KiB instead of about 300 KiB.
DEFLATE = (ServerPerMessageDeflateFactory(server_max_window_bits=12, client_max_window_bits=12,
                                          compress_settings={"memLevel": 5}),)


class WebSocketClosed(OSError):
    """``send`` on a WebSocket that is closed (ASGI: an OSError subclass)."""


class WebSocketSession:
    def __init__(self, conn: Any, transport: asyncio.Transport, scope: dict[str, Any],
                 target: bytes, early_data: bytes, options: Options) -> None:
        self.conn = conn
        self.worker = conn.worker
        self.transport = transport
        self.scope = scope
        self.target = target
        self.options = options
        self.started = time.monotonic()
        self.logged = False               # the access-log line is written
        self.early_data = bytearray(early_data)   # frames sent before the 101
        self.flow = conn.flow             # reading held for the inbox or early data, drain
        self.inbox: deque[dict[str, Any]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.connect_delivered = False
        self.accepted = False
        self.finished = False             # no more messages to or from the app
        self.transport_closed = False
        self.fragments: list[bytes] = []
        self.fragment_opcode: Opcode | None = None
        self.failed = False               # this module failed the connection (1007)
        self.last_seen = time.monotonic()
        self.ping_sent_at: float | None = None
        subprotocols = []
        headers = Headers()
        for name, value in scope["headers"]:
            text_name, text_value = name.decode("latin-1"), value.decode("latin-1")
            headers[text_name] = text_value
            if name == b"sec-websocket-protocol":
                subprotocols += [p.strip() for p in text_value.split(",") if p.strip()]
        scope["subprotocols"] = subprotocols
        # The handshake was parsed by the worker's HTTP parser: websockets
        # checks it and builds the 101 response; the frames are then spoken by
        # a protocol object that starts in the OPEN state.
        handshaker = ServerProtocol(extensions=DEFLATE if options.per_message_deflate else None,
                                    max_size=options.max_size or None)
        self.handshake = handshaker.accept(Request(target.decode("latin-1"), headers))
        self.protocol = ServerProtocol(state=State.OPEN, max_size=options.max_size or None)
        # The extensions negotiated by accept() (permessage-deflate) code the frames.
        self.protocol.extensions = list(handshaker.extensions)

    # ---- the app

    def start(self, app: Any) -> None:
        if self.handshake.status_code != 101:
            # websockets refused the handshake (missing key, bad version ...).
            self.transport.write(self.handshake.serialize())
            self._log_access(self.handshake.status_code, len(self.handshake.body or b""))
            self._close_transport()
            return
        asyncio.get_running_loop().create_task(self._run(app))

    async def _run(self, app: Any) -> None:
        self.worker.app_started_py()
        try:
            await app(self.scope, self.receive, self.send)
        except WebSocketClosed:
            pass
        except Exception:
            log.error("Exception in ASGI app (WebSocket %s)", self.scope.get("path"),
                      exc_info=True)
            if not self.accepted:
                self._respond_http(500)
            else:
                self._close(1011, "internal error")
        else:
            if not self.accepted:
                if not self.transport_closed:
                    log.error("ASGI app returned without accepting or closing the WebSocket "
                              "(%s)", self.scope.get("path"))
                    self._respond_http(500)
            else:
                self._close(1000, "")
        finally:
            self.finished = True
            self.worker.app_finished_py()

    async def receive(self) -> dict[str, Any]:
        if not self.connect_delivered:
            self.connect_delivered = True
            return {"type": "websocket.connect"}
        while not self.inbox:
            if self.transport_closed:
                return {"type": "websocket.disconnect", "code": self._close_code()}
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.inbox.popleft()
        if len(self.inbox) < INBOX_HIGH_WATER // 2:
            self.flow.hold(HOLD_INBOX, False)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.transport_closed or (self.accepted and self.protocol.state is not State.OPEN):
            raise WebSocketClosed("the WebSocket is closed")
        if not self.accepted:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._respond_http(403)
            else:
                raise RuntimeError(f"ASGI: {kind!r} sent before websocket.accept")
            return
        if kind == "websocket.send":
            data = message.get("bytes")
            if data is not None:
                self.protocol.send_binary(bytes(data))
            elif message.get("text") is not None:
                self.protocol.send_text(message["text"].encode("utf-8"))
            else:
                raise RuntimeError("ASGI: websocket.send needs 'bytes' or 'text'")
            self._write_out()
            if self.flow.write_paused:
                await self.flow.drain()
        elif kind == "websocket.close":
            self._close(message.get("code") or 1000, message.get("reason") or "")
        else:
            raise RuntimeError(f"ASGI: unexpected message type {kind!r} on a WebSocket")

    def _accept(self, message: dict[str, Any]) -> None:
        response = self.handshake
        subprotocol = message.get("subprotocol")
        if subprotocol:
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        for name, value in message.get("headers") or ():
            response.headers[bytes(name).decode("latin-1")] = bytes(value).decode("latin-1")
        self.transport.write(response.serialize())
        self.accepted = True
        self._log_access(101, 0)
        self.flow.hold(HOLD_EARLY, False)
        if self.early_data:
            data, self.early_data = bytes(self.early_data), bytearray()
            self.data_received(data)

    def _respond_http(self, status: int) -> None:
        if not self.transport_closed:
            response = error_response(status)
            self.transport.write(response)
            self._log_access(status, len(response) - response.index(b"\r\n\r\n") - 4)
        self._close_transport()

    def _log_access(self, status: int, size: int) -> None:
        """The session's access-log line: its handshake request and the answer."""
        access_log = self.options.access_log
        if access_log is None or self.logged:
            return
        self.logged = True
        environ = asgi_environ(self.scope.get("client"), "GET", self.target,
                               self.scope.get("http_version", "1.1"), self.scope["headers"],
                               access_log.headers)
        access_log(environ, status, size, time.monotonic() - self.started)

    def _close(self, code: int, reason: str) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._write_out()

    def _close_code(self) -> int:
        if self.protocol.close_rcvd is not None:
            return self.protocol.close_rcvd.code
        if self.protocol.close_sent is not None:
            return self.protocol.close_sent.code
        return 1006 if self.accepted else 1000

    def _deliver(self, message: dict[str, Any]) -> None:
        self.inbox.append(message)
        if len(self.inbox) >= INBOX_HIGH_WATER:
            self.flow.hold(HOLD_INBOX, True)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # ---- the connection (called by the compiled ASGIConnection)

    def data_received(self, data: bytes) -> None:
        if not self.accepted:
            # The client should wait for the 101; keep what it sent for then,
            # and stop reading past EARLY_DATA_LIMIT.
            self.early_data += data
            if len(self.early_data) > EARLY_DATA_LIMIT:
                self.flow.hold(HOLD_EARLY, True)
            return
        self.last_seen = time.monotonic()
        self.protocol.receive_data(data)
        self._handle_events()

    def eof_received(self) -> bool:
        if self.accepted:
            self.protocol.receive_eof()
            self._handle_events()
        return False

    def connection_lost(self) -> None:
        self.transport_closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def tick(self, now: float) -> None:
        interval, timeout = self.options.ping_interval, self.options.ping_timeout
        if not self.accepted or self.protocol.state is not State.OPEN or interval <= 0:
            return
        if self.ping_sent_at is not None:
            if timeout > 0 and now - self.ping_sent_at > timeout:
                self._close(1011, "keepalive ping timeout")
                self._close_transport()
        elif now - self.last_seen >= interval:
            self.ping_sent_at = now
            self.protocol.send_ping(os.urandom(4))
            self._write_out()

    def shutdown(self) -> None:
        """The worker is stopping: 1012 (service restart), as uvicorn does."""
        if self.accepted:
            self._close(1012, "server shutting down")
        else:
            self._respond_http(503)

    # ---- plumbing

    def _handle_events(self) -> None:
        for frame in self.protocol.events_received():
            if self.failed:
                break   # frames after one that failed the connection are not processed
            self.last_seen = time.monotonic()
            opcode = frame.opcode
            if opcode is Opcode.PONG:
                self.ping_sent_at = None
            elif opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                if opcode is not Opcode.CONT:
                    self.fragment_opcode = opcode
                    self.fragments = []
                self.fragments.append(frame.data)
                if frame.fin:
                    self._message(b"".join(self.fragments))
        self._write_out()

    def _message(self, data: bytes) -> None:
        opcode, self.fragments = self.fragment_opcode, []
        if opcode is Opcode.TEXT:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.protocol.fail(1007, "invalid UTF-8 in a text message")
                self.failed = True
                return
            self._deliver({"type": "websocket.receive", "text": text})
        else:
            self._deliver({"type": "websocket.receive", "bytes": data})

    def _write_out(self) -> None:
        for data in self.protocol.data_to_send():
            if self.transport_closed:
                return
            if data:
                self.transport.write(data)
            else:
                self._close_transport()   # the protocol's end of stream: close TCP

    def _close_transport(self) -> None:
        if not self.transport_closed:
            self.transport_closed = True
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

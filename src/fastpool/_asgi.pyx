# cython: language_level=3
"""The compiled ASGI worker: an asyncio protocol over the shared connection core.

Rules of this module:

* One worker process runs one asyncio event loop (uvloop when installed and
  chosen) and serves many connections and many requests at once.  The
  connection, ``ASGIConnection``, is an asyncio protocol written in Cython: it
  feeds received bytes to the shared ``HttpConnection`` core (parser glue,
  limits, error statuses) and frames responses with the functions the WSGI
  worker uses (``end_head``, ``frame_body``, ``end_body``).  There is no second
  copy of the HTTP logic here, only the asyncio side of it.
* The requests of one connection are served one at a time, in order: a
  ``Cycle`` is one request's ASGI call.  The next pipelined request starts as
  soon as the response before it is complete, even if that app call goes on
  (a background task after the response).
* An app's coroutine starts at once, inside data_received, in a copy of the
  worker's root context (never the previous request's: the Task that ends a
  response may start the next request).  A handler that never waits on I/O
  finishes there, without a Task and without a trip through the loop's ready
  queue; one that suspends continues as a Task (``Resumed``) from where it is
  (Python 3.11+; 3.10 makes every call a Task).  Responses finished during
  one data_received go out in one write.
* Flow control both ways: while the transport says the client is not reading
  (pause_writing), the app's ``send`` waits; a body the app does not
  ``receive`` stops reading from the socket past ``BODY_HIGH_WATER`` bytes, and
  so do more than ``MAX_PIPELINED`` waiting requests.
* Errors: an exception before the response head is written is a 500; after
  it, the connection is closed.  Nothing an app or a client does ends the loop.
* Deadlines (idle keep-alive, slow request heads and bodies, a client that
  stops reading) are enforced by one ``tick`` a second over every connection,
  never by a timer per connection.  The tick also writes the scoreboard: for
  an ASGI worker, ``timeout`` means that the event loop itself has been
  blocked that long while requests were running.
* TLS: a ``tls_listen`` connection's first byte is peeked (a plain HTTP
  request gets a 400 in plain text); a ClientHello starts the loop's own TLS
  (``connect_accepted_socket(ssl=...)``, non-blocking, ``client_timeout``
  as its deadline).  Static files then go through the transport (no
  sendfile), and a request for another group is relayed (``Relay``) instead
  of handed over: the keys stay in this loop.
* PROXY protocol (``proxy_protocol``): before its transport exists, a
  connection's header is taken off the raw socket (``ProxyReader``, the WSGI
  worker's reader too), within client_timeout, from the same ``starting``
  table as the TLS first byte; the transport starts after it (or after the
  ClientHello on a tls_listen socket).
* WebSocket and lifespan, which are not on the per-request hot path, live in
  plain Python (``fastpool.websocket``, ``fastpool.lifespan``).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from libc.math cimport INFINITY

from fastpool._consts cimport *
from fastpool._posix cimport sockaddr_storage
from fastpool._http cimport (
    peer_of, remember, take_first, target_parts,
    Request, HttpConnection, OutBuffer, TargetCache, refresh_date,
    error_response, status_line_of, monotonic, Framing, framing_reset, queue_head, frame_body,
    end_body, SERVED_HEALTH, SERVED_STATIC, SERVED_SHED, SERVED_ERROR,
)
from fastpool._static cimport StaticAnswer, StaticFile, StaticFiles, queue_answer
from fastpool._worker cimport (
    WorkerBase, WorkerOptions, Handover, Listener, SERVING, BOARD_BUSY_SINCE, BOARD_IN_FLIGHT,
    input_waiting, ProxyReader, PROXY_WAIT, PROXY_BAD, PROXY_GONE,
)

import asyncio
import collections.abc
import contextvars
import logging
import os
import signal
import socket
import sys
import types
from asyncio.selector_events import BaseSelectorEventLoop

from fastpool.tls import asgi_extension as tls_extension

from fastpool._http import ClientDisconnected
from fastpool.log import asgi_environ
from fastpool.signals import WORKER_SIGNALS

cdef object error_log = logging.getLogger("fastpool.error")

# Python 3.11+: a Task takes the context its coroutine runs in, so an app call
# can run its first step here and become a Task only when it suspends
# (start_cycle); 3.10 starts every call as a Task.
cdef bint DIRECT_START = sys.version_info >= (3, 11)
cdef object Task = asyncio.Task
cdef object copy_context = contextvars.copy_context
cdef object CancelledError = asyncio.CancelledError


async def sleep0():
    """One turn of the event loop (asyncio.sleep(0) without its checks)."""
    await _yield_once()


@types.coroutine
def _yield_once():
    yield


cdef dict DISCONNECT = {"type": "http.disconnect"}


# An iterator that is over, and stays over: what a complete awaitable returns.
cdef object EXHAUSTED = iter(())


@cython.final
cdef class Done:
    """An awaitable that is complete: awaiting it returns None at once (its
    iterator is the exhausted one), with no coroutine and no future."""

    def __await__(self):
        return EXHAUSTED


cdef Done DONE = Done()


# ---------------------------------------------------------------- scope

# Request header names as received -> lower-cased (ASGI wants lower case).
cdef dict LOWER_NAMES = {}


cdef bytes lower_name(bytes name):
    cdef bytes lowered = LOWER_NAMES.get(name)
    if lowered is None:
        lowered = remember(LOWER_NAMES, name, name.lower(), HEADER_NAME_CACHE_SIZE)
    return lowered


@cython.final
cdef class ASGITargets(TargetCache):
    """Request-target -> (path, raw_path, query_string) in ASGI's types."""

    cdef tuple convert(self, bytes target, tuple parts):
        return ((<bytes>parts[0]).decode("utf-8", "replace"), parts[1], parts[2])


cdef ASGITargets TARGETS = ASGITargets()


@cython.final
@cython.freelist(64)
cdef class ASGIRequest(Request):
    cdef dict scope
    cdef list headers


# ---------------------------------------------------------------- one request

@cython.final
@cython.freelist(64)
cdef class Cycle:
    """One request's ASGI call: the scope, ``receive`` and ``send``."""
    cdef ASGIConnection conn
    cdef ASGIRequest request
    cdef Framing framing
    cdef object status             # from http.response.start; the head waits for the body
    cdef object headers
    cdef bint started              # http.response.start received
    cdef bint complete             # the last body message is queued
    cdef bint disconnected         # the client is gone: receive says so, send raises
    cdef bint continue_sent        # "100 Continue" written for Expect: 100-continue
    cdef bint body_done            # the last http.request message was received
    cdef bint client_eof           # the client will send nothing more (it may still read)
    cdef object waiter             # the future receive() waits on
    cdef object task               # the app's task while it is pending
    cdef long long turn_start      # body bytes sent when the app last let the loop run

    async def receive(self):
        cdef ASGIRequest request = self.request
        cdef bytes chunk
        cdef bint more
        while True:
            if self.disconnected or self.complete:
                return DISCONNECT
            if not self.body_done:
                if request.body_complete or request.body_buffered():
                    chunk = request.take_body(-1)
                    more = not request.body_complete
                    self.body_done = not more
                    self.conn.check_reading()
                    return {"type": "http.request", "body": chunk, "more_body": more}
                if (request.expect_continue and not self.continue_sent
                        and not self.framing.headers_sent):
                    self.continue_sent = True
                    self.conn.write_now(b"HTTP/1.1 100 Continue\r\n\r\n")
            if self.client_eof:
                # The client shut its side: no more body will come (a body cut
                # short can never complete).  Its side may still read: send works.
                return DISCONNECT
            # Wait for more body, or (the body delivered) for the disconnect.
            self.waiter = self.conn.loop.create_future()
            self.conn.check_reading()
            try:
                await self.waiter
            finally:
                self.waiter = None

    cdef int wake(self) except -1:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        return 0

    def send(self, message):
        """ASGI's send.  Not a coroutine: what it does happens now, and it
        returns ``DONE`` (an awaitable that completes at once), or, when the
        client is slow or the body large, an awaitable that waits for the
        transport -- no coroutine object for a send that need not wait."""
        cdef ASGIConnection conn = self.conn
        cdef object kind = message["type"]
        cdef object body
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("ASGI: http.response.body sent before http.response.start")
            if self.complete:
                raise RuntimeError("ASGI: http.response.body sent after the response completed")
            if self.disconnected or conn.closed or conn.transport.is_closing():
                raise ClientDisconnected("the client closed the connection")
            body = message.get("body", b"")
            self.write_body(body, message.get("more_body", False))
            if self.complete:
                return DONE
            if conn.flow.write_paused:
                return conn.flow.drain()
            if self.framing.body_sent - self.turn_start > HIGH_WATER:
                # A client that reads as fast as the app sends never pauses
                # the transport: let the loop serve the other connections (and
                # notice a disconnect) once per HIGH_WATER bytes.
                self.turn_start = self.framing.body_sent
                return sleep0()
            return DONE
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("ASGI: http.response.start sent twice")
            if self.disconnected:
                raise ClientDisconnected("the client closed the connection")
            status_line_of(message["status"])   # a bad status fails here, in the app's send
            self.status = message["status"]
            self.headers = message.get("headers", ())
            self.started = True
            return DONE
        else:
            raise RuntimeError(f"ASGI: unexpected message type {kind!r} on an http connection")

    cdef int write_head(self, long long body_length) except -1:
        """Serialise the head held since http.response.start; ``body_length``
        is the whole body's size when the first body message is the last."""
        cdef ASGIWorker worker = self.conn.worker
        return queue_head(self.conn.out, &self.framing, self.request,
                          status_line_of(self.status), <int>self.status, self.headers, True,
                          body_length, worker.alive and worker.keep_alive > 0)

    cdef int write_body(self, object body, bint more) except -1:
        cdef ASGIConnection conn = self.conn
        if type(body) is not bytes:
            if not isinstance(body, (bytes, bytearray, memoryview)):
                raise TypeError(f"ASGI: body must be bytes, got {type(body).__name__}")
            body = bytes(body)
        if not self.framing.headers_sent:
            self.write_head(-1 if more else PyBytes_GET_SIZE(body))
        if frame_body(conn.out, &self.framing, body):
            error_log.warning("app sent more than its Content-Length (%d) for %s; closing",
                              self.framing.declared_length,
                              self.request.target.decode("latin-1"))
        if not more:
            end_body(conn.out, &self.framing)
            self.complete = True
            conn.flush()
            conn.response_done(self)
            self.wake()
        else:
            conn.flush()
        return 0

    cdef int fail(self, int status, str detail="", bytes answer=None) except -1:
        """The app cannot give a response: answer ``status`` (``answer``, or
        its error response) if nothing is out yet, else close (the only
        honest signal left)."""
        cdef ASGIConnection conn = self.conn
        if self.complete:
            return 0
        self.complete = True
        self.framing.close = True
        self.wake()                    # a receive() waiting for the body ends now
        if not self.framing.headers_sent and not self.disconnected:
            conn.out.write(answer if answer is not None else error_response(status, detail))
            self.framing.status_code = status
        conn.flush()
        conn.response_done(self)
        return 0

    cdef bint abandoned(self):
        """The client will never finish this request: it went away, or shut
        its side before the body was complete (so no answer is owed)."""
        return self.disconnected or (self.client_eof and not self.request.body_complete)

    async def run(self, app):
        """The app call, as a task; its exceptions become statuses here."""
        cdef ASGIConnection conn = self.conn
        cdef ASGIWorker worker = conn.worker
        worker.app_started()
        try:
            # Admission control, when the app's turn has come (a loop blocked
            # by earlier requests makes this later than dispatch).
            if worker.admission:
                late = worker.too_late(conn.arrived, self.request.started)
                conn.arrived = worker.stop_waiting(conn.arrived)
                if late:
                    self.framing.served_by = SERVED_SHED
                    self.fail(503, "", worker.shed())
                    return
            await app(self.request.scope, self.receive, self.send)
            if not self.complete:
                if self.abandoned():
                    self.give_up()
                else:
                    if not self.started:
                        error_log.error("ASGI app returned without starting a response (%s %s)",
                                        self.request.method,
                                        self.request.target.decode("latin-1"))
                    self.fail(500)
        except ClientDisconnected:
            self.give_up()
        except (Exception, CancelledError):
            if self.abandoned():
                # The app raised on the client's disconnect (frameworks do): routine.
                self.give_up()
            else:
                error_log.error("Exception in ASGI app (%s %s)", self.request.method,
                                self.request.target.decode("latin-1"), exc_info=True)
                self.fail(500)
        finally:
            if self.task is not None:
                worker.tasks.discard(self.task)
                self.task = None    # no cycle -> task -> coroutine -> cycle loop
            worker.app_finished(None)

    async def send_file(self, StaticAnswer answer):
        """A static file's body (its head is queued).  While the transport has
        nothing queued, sendfile(2) writes to the socket directly (the
        transport's order is kept: it is empty); when the socket is full, the
        next HIGH_WATER bytes are read and written through the transport,
        which then watches for writability -- its pause is what the deadline
        tick sees -- and the loop serves the other connections meanwhile."""
        cdef ASGIConnection conn = self.conn
        cdef object transport = conn.transport
        cdef long long offset = answer.offset
        cdef long long remaining = answer.length
        cdef object sent
        cdef bytes chunk
        try:
            conn.flush()
            socket_fd = transport.get_extra_info("socket").fileno()
            while remaining > 0 and not conn.closed:
                # (On TLS the transport must encrypt every byte: no sendfile.)
                if conn.tls is None and transport.get_write_buffer_size() == 0:
                    try:
                        sent = os.sendfile(socket_fd, answer.fd, offset,
                                           min(remaining, SENDFILE_CHUNK))
                    except BlockingIOError:
                        sent = None
                    if sent is not None:
                        if sent == 0:
                            break       # the file shrank: end_body sees the short body
                        offset += sent
                        remaining -= sent
                        self.framing.body_sent += sent
                        await sleep0()
                        continue
                chunk = os.pread(answer.fd, min(remaining, HIGH_WATER), offset)
                if not chunk:
                    break
                offset += PyBytes_GET_SIZE(chunk)
                remaining -= PyBytes_GET_SIZE(chunk)
                frame_body(conn.out, &self.framing, chunk)
                conn.flush()
                if conn.flow.write_paused:
                    await conn.flow.drain()
                else:
                    await sleep0()
        except (OSError, RuntimeError, CancelledError):
            self.give_up()
            return
        finally:
            answer.close()
            if self.task is not None:
                conn.worker.tasks.discard(self.task)
                self.task = None
        if conn.closed:
            self.give_up()
        else:
            self.write_body(b"", False)

    cdef int give_up(self) except -1:
        """No answer for a request its client abandoned: the connection closes."""
        cdef ASGIConnection conn = self.conn
        if self.complete:
            return 0
        self.complete = True
        self.framing.close = True
        self.wake()
        conn.flush()
        conn.response_done(self)
        return 0


# ---------------------------------------------------------------- flow control

# Why reading from a transport is held (FlowControl.hold): any one holds it.
HOLD_HTTP = 1       # the HTTP protocol: unread body, pipelined heads, a stop
HOLD_INBOX = 2      # a WebSocket session: messages the app has not received
HOLD_EARLY = 4      # a WebSocket session: frames sent before the app accepted


@cython.final
cdef class FlowControl:
    """Flow control of one transport, both ways, for every protocol on it (the
    HTTP connection, then a WebSocket session on the same socket):

    * reading is paused while any holder holds it (``hold(reason, on)``, one
      bit per reason) and resumed when none does;
    * the transport pauses our writing when its buffer is full; a writer then
      waits in ``drain()`` until it resumes, or raises ClientDisconnected once
      the connection is lost.
    """
    cdef object transport
    cdef object loop
    cdef readonly int holds
    cdef readonly bint reading_paused
    cdef readonly bint write_paused
    cdef readonly double write_paused_since
    cdef readonly bint lost
    cdef object drain_waiter

    def __init__(self, transport, loop):
        self.transport = transport
        self.loop = loop

    cpdef hold(self, int reason, bint on):
        """Hold reading for ``reason`` (``on``), or release that hold."""
        self.holds = (self.holds | reason) if on else (self.holds & ~reason)
        if self.lost:
            return
        if self.holds and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not self.holds and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    cpdef release_all(self):
        """Read again whatever held it (a lingering close drains the input)."""
        self.hold(self.holds, False)

    cpdef pause_writing(self):
        self.write_paused = True
        self.write_paused_since = monotonic()

    cpdef resume_writing(self):
        self.write_paused = False
        self.wake()

    cpdef connection_lost(self):
        self.lost = True
        self.wake()

    cdef int wake(self) except -1:
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        return 0

    async def drain(self):
        """Wait until the client reads what is queued (or goes away)."""
        while self.write_paused and not self.lost:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None
        if self.lost:
            raise ClientDisconnected("the client closed the connection")


# ---------------------------------------------------------------- connection

@cython.final
cdef class ASGIConnection(HttpConnection):
    """An asyncio protocol: one client connection."""
    cdef readonly ASGIWorker worker
    cdef readonly object loop
    cdef readonly object transport
    cdef dict base_scope           # per connection: listener's keys plus client
    # base_scope with every key finish_head sets (as None): a request's scope is
    # a copy of it whose keys are then replaced, never added (no resize).
    cdef dict scope_template
    cdef dict template_of          # the base_scope scope_template was made from
    cdef OutBuffer out
    cdef Cycle cycle               # the request being answered, or None
    cdef readonly bint closed
    cdef readonly FlowControl flow   # shared with a WebSocket session on this socket
    cdef bint dispatching          # inside dispatch(): output waits for its end
    cdef bint peer_closed          # EOF from the client
    cdef bint trusted_proxy
    cdef str via                   # the host trusted_proxy is decided on, when not the peer's
    cdef ProxyReader proxy         # proxy_protocol: its PROXY header, until it is in
    cdef double last_activity      # monotonic time of the last read or response
    cdef readonly object websocket  # a fastpool.websocket.WebSocketSession after an upgrade
    cdef bint tcp
    cdef bint closing              # close once the queued output is out
    cdef bint lingering            # our side is shut; the client's input is drained
    cdef double linger_deadline
    cdef bint answered             # a response went out: idle time is keep-alive time
    cdef double opened             # monotonic time the connection was made
    cdef bytes initial_data        # bytes another group's worker read (a handoff)
    cdef object peer               # the client's (host, port), known from accept
    cdef object tls                # the transport's ssl.SSLObject on a TLS connection
    cdef double arrived            # admission: when its bytes reached the kernel (see _worker)
    cdef bytes refusal             # answered at once, then closed (a shed, plain HTTP on TLS)

    def __init__(self, ASGIWorker worker, dict listener_scope, bint tcp):
        HttpConnection.__init__(self, worker.limits)
        self.worker = worker
        self.loop = worker.loop
        self.base_scope = listener_scope
        self.out = OutBuffer()
        self.trusted_proxy = worker.options.trust_all_proxies
        self.tcp = tcp

    # ---- asyncio protocol

    def protocol_factory(self):
        """For loop.connect_accepted_socket: this connection is the protocol."""
        return self

    def connection_made(self, transport):
        cdef ASGIWorker worker = self.worker
        self.transport = transport
        self.flow = FlowControl(transport, self.loop)
        self.opened = self.last_activity = monotonic()
        peer = self.peer if self.peer is not None else transport.get_extra_info("peername")
        scope = self.base_scope.copy()
        self.tls = transport.get_extra_info("ssl_object")
        if self.tls is not None:
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = tls_extension(self.tls)
            scope["extensions"] = extensions
        if self.tcp and type(peer) is tuple:
            scope["client"] = (peer[0], peer[1])
            self.trusted_proxy = (worker.options.trust_all_proxies or (
                self.via if self.via is not None else peer[0]) in worker.options.trusted_proxies)
        else:
            scope["client"] = None
        self.base_scope = scope
        worker.connections.add(self)
        if worker.router is not None and self.router is None:
            self.router = worker.router
            self.home_group = worker.local_group
        if self.arrived == -INFINITY and self.tls is None:
            # Admission control: too many wait already; the 503 goes out now.
            self.arrived = 0
            self.refusal = worker.shed()
            worker.count_response(503, 0, SERVED_SHED)
        if self.refusal is not None:
            self.out.write(self.refusal)
            self.refusal = None
            self.close_after_output()
            return
        if self.initial_data is not None:
            # Now, before the loop reads the socket: these bytes came first.
            data, self.initial_data = self.initial_data, None
            self.data_received(data)

    def data_received(self, bytes data):
        if self.websocket is not None:
            self.websocket.data_received(data)
            return
        if self.closing:
            return      # (lingering: the client's input is drained and dropped)
        self.last_activity = monotonic()
        try:
            self.feed(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        except Exception:
            error_log.exception("error while parsing a request")
            self.fail(500, "internal error")
        if self.cycle is not None:
            if self.error_status and not self.cycle.request.body_complete:
                # The running request's body broke a limit or its framing.
                self.cycle.fail(self.error_status, self.error_reason or "")
            else:
                self.cycle.wake()
        self.dispatch()
        self.check_reading()

    def eof_received(self):
        self.peer_closed = True
        if self.websocket is not None:
            return self.websocket.eof_received()
        if self.lingering:
            return False   # drained: the transport closes
        if self.cycle is None and not self.pending:
            return False   # nothing to answer: let the transport close
        self.stop_reading = True
        if self.cycle is not None:
            self.cycle.client_eof = True
            self.cycle.wake()
        return True         # half-closed: the answers can still go out

    def connection_lost(self, exc):
        cdef ASGIWorker worker = self.worker
        self.closed = True
        if self.arrived:
            self.arrived = worker.stop_waiting(self.arrived)
        worker.connections.discard(self)
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.wake()
            self.cycle = None
        del self.pending[:]
        self.flow.connection_lost()
        if self.websocket is not None:
            self.websocket.connection_lost()
        worker.connection_closed()

    def pause_writing(self):
        self.flow.pause_writing()

    def resume_writing(self):
        self.flow.resume_writing()

    # ---- the scope (hooks of HttpConnection)

    cdef Request new_request(self):
        cdef ASGIRequest request = ASGIRequest.__new__(ASGIRequest)
        request.headers = []
        return request

    cdef int add_header(self, Request request, bytes name, bytes value) except -1:
        (<ASGIRequest>request).headers.append((lower_name(name), value))
        return 0

    cdef int finish_head(self, Request request) except -1:
        cdef ASGIRequest asgi_request = <ASGIRequest>request
        cdef dict scope
        cdef tuple parts = target_parts(TARGETS, request.target)
        cdef ASGIWorker worker = self.worker
        if self.template_of is not self.base_scope:
            self.template_of = self.base_scope
            self.scope_template = dict(self.base_scope, http_version=None, method=None,
                                       path=None, raw_path=None, query_string=None,
                                       headers=None)
        scope = self.scope_template.copy()
        scope["http_version"] = "1.1" if request.http_minor else "1.0"
        scope["method"] = request.method
        if worker.root_path and not (<str>parts[0]).startswith(worker.root_path):
            # A proxy stripped the prefix; ASGI's path includes root_path.
            scope["path"] = worker.root_path + parts[0]
            scope["raw_path"] = worker.root_path.encode("utf-8") + parts[1]
        else:
            scope["path"] = parts[0]
            scope["raw_path"] = parts[1]
        scope["query_string"] = parts[2]
        if request.authority is not None:
            # An absolute-form target's host wins over Host (RFC 9112 3.2.2).
            asgi_request.headers = [(name, request.authority if name == b"host" else value)
                                    for name, value in asgi_request.headers]
        scope["headers"] = asgi_request.headers
        if worker.state is not None:
            scope["state"] = worker.state.copy()
        if self.trusted_proxy:
            self.apply_forwarded(scope, asgi_request.headers)
        asgi_request.scope = scope
        return 0

    cdef int apply_forwarded(self, dict scope, list headers) except -1:
        cdef ASGIWorker worker = self.worker
        cdef str chain = None, proto = None, client, scheme
        for name, value in headers:
            if name == b"x-forwarded-for":
                chain = value.decode("latin-1")
            elif name == b"x-forwarded-proto":
                proto = value.decode("latin-1")
        client = worker.forwarded_client(chain)
        scheme = worker.forwarded_scheme(proto)
        if client is not None:
            scope["client"] = (client, 0)
        if scheme is not None:
            scope["scheme"] = scheme
        return 0

    # ---- serving

    cdef int dispatch(self) except -1:
        """Start the next request if none is running; answer what the core
        refused; close when nothing more can come."""
        cdef ASGIRequest request
        cdef ASGIRequest upgrade = None
        cdef ASGIWorker worker = self.worker
        if self.dispatching:
            return 0
        self.dispatching = True
        try:
            while self.cycle is None and not self.closing:
                if self.pending:
                    request = <ASGIRequest>take_first(self.pending)
                    if worker.is_health(request.target):
                        self.answer_health(request)
                    elif worker.static is not None and self.serve_static(request):
                        pass
                    elif request.upgrade and worker.websockets and is_websocket(request):
                        upgrade = request
                        break
                    else:
                        self.start_cycle(request)
                    continue
                if self.error_status:
                    self.out.write(error_response(self.error_status, self.error_reason or ""))
                    worker.count_response(self.error_status, 0, SERVED_ERROR)
                    self.closing = True
                elif self.peer_closed or (not worker.alive and worker.close_idle
                                          and self.at_message_boundary()):
                    self.closing = True
                break
        finally:
            self.dispatching = False
        self.flush()
        if self.closing:
            self.close_after_output()
        elif upgrade is not None:
            self.start_websocket(upgrade)
        elif self.handoff_group >= 0 and self.cycle is None and not self.pending:
            self.hand_off()
        return 0

    def hand_off(self):
        """Give the connection to the group its next request belongs to, once
        everything before that request is sent."""
        cdef ASGIWorker worker = self.worker
        if self.closed or self.closing or self.handoff_group < 0:
            return
        if self.transport.get_write_buffer_size():
            self.loop.call_later(HANDOFF_RETRY_SECONDS, self.hand_off)
            return
        if self.tls is not None:
            return self.start_relay()
        refusal = worker.hand_off(self, self.transport.get_extra_info("socket").fileno())
        if refusal is None:
            self.closing = True
            self.transport.abort()   # our copy of the socket; the other worker has it
        else:
            self.out.write(refusal)
            self.close_after_output()

    def start_relay(self):
        """hand_off for a TLS connection: its TLS state stays in this worker's
        loop, so the other group gets one end of a socket pair and a Relay
        carries the bytes (WorkerBase.relay_off); 503 when that group is full."""
        cdef ASGIWorker worker = self.worker
        server = self.base_scope.get("server")
        result = worker.relay_off(self, self.peer if type(self.peer) is tuple else None,
                                  server if type(server) is tuple and server[1] else None)
        if type(result) is bytes:
            self.out.write(result)
            self.close_after_output()
            return
        # From here the transport belongs to the relay: this protocol is done.
        self.closed = True
        worker.connections.discard(self)
        self.flow.release_all()
        Relay(worker, self.transport, socket.socket(fileno=result))

    cdef int start_cycle(self, ASGIRequest request) except -1:
        cdef Cycle cycle = Cycle.__new__(Cycle)
        cdef ASGIWorker worker = self.worker
        cycle.conn = self
        cycle.request = request
        framing_reset(&cycle.framing)
        self.cycle = cycle
        coroutine = cycle.run(worker.app)
        # Every call starts from the worker's own context, never from the one
        # this runs in: that may be the previous request's (its Task finished
        # the response and started this one).
        context = worker.root_context.copy()
        if DIRECT_START:
            try:
                waiting = context.run(coroutine.send, None)
            except StopIteration:
                return 0          # answered without suspending: no Task at all
            task = Task(Resumed(coroutine, waiting), loop=self.loop, context=context)
        else:
            task = context.run(Task, coroutine, loop=self.loop)
        # asyncio keeps only weak references to tasks.
        cycle.task = task
        worker.tasks.add(task)
        return 0

    cdef int answer_health(self, ASGIRequest request) except -1:
        """The group's health_path, answered without the app (WorkerBase.health_answer)."""
        cdef Cycle cycle = Cycle.__new__(Cycle)
        cdef tuple answer = self.worker.health_answer()
        cycle.conn = self
        cycle.request = request
        framing_reset(&cycle.framing)
        cycle.framing.served_by = SERVED_HEALTH
        self.cycle = cycle
        cycle.started = True
        cycle.headers = ((b"content-type", b"text/plain"),)
        cycle.status = answer[0]
        cycle.write_body(answer[1], False)
        return 0

    cdef bint serve_static(self, ASGIRequest request) except -1:
        """Answer ``request`` from the group's static files, without the app
        (fastpool._static); False when it is not a file.  A small file goes
        out with its head; a larger one is sent by a task (``Cycle.send_file``)
        as the client takes it."""
        cdef StaticFiles static = self.worker.static
        cdef StaticFile found
        cdef StaticAnswer answer
        cdef Cycle cycle = Cycle.__new__(Cycle)
        cdef ASGIWorker worker = self.worker
        try:
            found = static.find(request.method, request.target)
            if found is None:
                return False
            wanted = {b"if-none-match": None, b"if-modified-since": None, b"range": None,
                      b"if-range": None, b"accept-encoding": None}
            for name, value in request.headers:
                if name in wanted:
                    wanted[name] = value
            answer = static.answer(found, request.method, wanted[b"if-none-match"],
                                   wanted[b"if-modified-since"], wanted[b"range"],
                                   wanted[b"if-range"], wanted[b"accept-encoding"])
        except Exception:
            # Never the worker's end: a 500 for this request, one log line.
            error_log.exception("Error answering a static file (%s %s)", request.method,
                                request.target.decode("latin-1"))
            answer = None
        cycle.conn = self
        cycle.request = request
        framing_reset(&cycle.framing)
        cycle.framing.served_by = SERVED_STATIC
        self.cycle = cycle
        if answer is None:
            cycle.fail(500)
            return True
        cycle.started = True
        if queue_answer(answer, self.out, &cycle.framing, request,
                        worker.alive and worker.keep_alive > 0):
            # Not eager: the head must reach the transport (at the end of
            # dispatch) before the file's bytes.
            cycle.task = self.loop.create_task(cycle.send_file(answer))
            worker.tasks.add(cycle.task)
        else:
            cycle.write_body(b"", False)
        return True

    cdef int start_websocket(self, ASGIRequest request) except -1:
        from fastpool.websocket import WebSocketSession
        cdef ASGIWorker worker = self.worker
        scope = request.scope
        scope["type"] = "websocket"
        scope["scheme"] = "wss" if scope["scheme"] == "https" else "ws"
        del scope["method"]
        self.websocket = WebSocketSession(self, self.transport, scope, request.target,
                                          self.upgrade_data or b"",
                                          worker.options.websocket_options)
        self.upgrade_data = None
        # The core stopped reading at the upgrade; the bytes now are frames.
        self.flow.hold(HOLD_HTTP, False)
        # (Its task copies this: the worker's context, not an earlier request's.)
        worker.root_context.copy().run(self.websocket.start, worker.app)
        return 0

    cdef int response_done(self, Cycle cycle) except -1:
        """The response of ``cycle`` is queued; move on to the next request."""
        cdef ASGIWorker worker = self.worker
        if self.cycle is not cycle:
            return 0
        self.cycle = None
        worker.request_done()
        worker.count_response(cycle.framing.status_code, cycle.request.started,
                              cycle.framing.served_by)
        worker.retirement_due()
        if worker.access_log is not None:
            worker.log_access(cycle.request, self.base_scope.get("client"),
                              cycle.framing.status_code, cycle.framing.body_sent)
        if cycle.framing.close or self.closed:
            self.close_after_output()
            return 0
        self.last_activity = monotonic()
        self.answered = True
        self.dispatch()
        self.check_reading()
        return 0

    cdef int check_reading(self) except -1:
        """Hold reading while the app has enough unread input; release after."""
        if self.closed or self.transport is None or self.websocket is not None:
            return 0        # (a WebSocket session holds reading for its own reasons)
        self.flow.hold(HOLD_HTTP, len(self.pending) > MAX_PIPELINED or self.stop_reading or (
            self.cycle is not None and self.cycle.request.body_buffered() > BODY_HIGH_WATER))
        return 0

    # ---- output

    cdef int flush(self) except -1:
        """Hand queued output to the transport (once per dispatch round)."""
        if self.dispatching or self.out.size == 0 or self.closed:
            return 0
        for part in self.out.take():
            self.transport.write(part)
        return 0

    cdef int write_now(self, bytes data) except -1:
        if not self.closed:
            self.flush()
            self.transport.write(data)
        return 0

    cdef int close_after_output(self) except -1:
        """Close once the queued output is out.  If the client may still be
        sending (an unread body, a refused request), shut our side and drain
        theirs for a moment first, as the WSGI worker does: closing with
        unread input would reset the connection and could destroy the answer
        before the client reads it."""
        self.closing = True
        if self.dispatching:
            return 0        # dispatch closes once its output is queued
        self.flush()
        if self.closed or self.transport is None or self.lingering:
            return 0
        if self.peer_closed or (self.at_message_boundary() and not self.error_status
                                and not self.pending and not input_waiting(
                                    self.transport.get_extra_info("socket").fileno())):
            self.transport.close()   # sends what is queued, then closes
            return 0
        self.lingering = True
        self.linger_deadline = monotonic() + LINGER_SECONDS
        self.flow.release_all()
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError):
            self.transport.close()
        return 0

    cdef int abort(self) except -1:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        return 0

    # ---- deadlines (called by the worker's tick)

    cdef int check_deadlines(self, double now) except -1:
        """The same rules as the WSGI worker's (its set_deadline): a new
        connection's first byte within client_timeout; a request's head within
        client_timeout of its first byte; its body must keep arriving; the
        client must keep taking the response; keep_alive between requests; a
        lingering close at most LINGER_SECONDS."""
        cdef ASGIWorker worker = self.worker
        cdef double limit = worker.client_timeout
        if self.websocket is not None:
            self.websocket.tick(now)
            return 0
        if self.lingering:
            if now > self.linger_deadline:
                self.abort()
            return 0
        if self.flow.write_paused and limit > 0 and now - self.flow.write_paused_since > limit:
            error_log.info("closing the connection of %s: the client took no response bytes "
                           "for %g s", self.client_text(), limit)
            self.abort()
        elif self.cycle is not None:
            if (not self.cycle.request.body_complete and not self.flow.reading_paused and limit > 0
                    and now - self.last_activity > limit):
                # The body stopped arriving: 408 if nothing is answered yet.
                self.cycle.fail(408, "request body not received in time")
        elif self.current is not None:
            if limit > 0 and now - self.current.started > limit:
                self.out.write(error_response(408, "request not received in time"))
                worker.count_response(408, 0, SERVED_ERROR)
                self.fail(408, "request not received in time")
                self.close_after_output()
        elif not self.pending:
            if not worker.alive and worker.close_idle:
                self.close_after_output()
            elif self.answered:
                if now - self.last_activity > worker.keep_alive:
                    self.close_after_output()
            elif limit > 0 and now - self.opened > limit:
                self.close_after_output()      # connected, and never sent a byte
        return 0

    cdef str client_text(self):
        client = self.base_scope.get("client")
        return client[0] if client else "a unix socket client"


cdef bint is_websocket(ASGIRequest request):
    for name, value in request.headers:
        if name == b"upgrade":
            return value.strip().lower() == b"websocket"
    return False


# ---------------------------------------------------------------- TLS relays

cdef class Relay


@cython.final
cdef class RelayEnd:
    """One side of a Relay, the protocol of its transport: what it receives
    goes to the other side's transport, and while the other side cannot
    write, this side does not read."""
    cdef Relay relay
    cdef RelayEnd other
    cdef readonly object transport

    def protocol_factory(self):
        return self

    def connection_made(self, transport):
        self.transport = transport
        self.relay.made(self)

    def data_received(self, data):
        self.other.transport.write(data)

    def eof_received(self):
        # The client's TLS side cannot half-close: either end's EOF ends both
        # once what is queued is written.
        self.relay.close()
        return False

    def connection_lost(self, exc):
        self.transport = None
        self.relay.close()

    def pause_writing(self):
        if self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self):
        if self.other.transport is not None:
            self.other.transport.resume_reading()


@cython.final
cdef class Relay:
    """A TLS connection whose requests another group serves (routes): that
    group's worker has the other end of a socket pair, and this worker's loop
    carries the plaintext both ways (the WSGI worker's Relay does the same in
    its epoll loop).  The serving group's deadlines govern the exchange: its
    worker closes its end when the client idles, and that ends the relay."""
    cdef ASGIWorker worker
    cdef RelayEnd client
    cdef RelayEnd inner
    cdef bint closed

    def __init__(self, ASGIWorker worker, transport, sock):
        self.worker = worker
        self.client = RelayEnd.__new__(RelayEnd)
        self.inner = RelayEnd.__new__(RelayEnd)
        self.client.relay = self.inner.relay = self
        self.client.other = self.inner
        self.inner.other = self.client
        worker.relays.add(self)
        # Nothing is read from the client until the pair's end has a transport.
        transport.pause_reading()
        transport.set_protocol(self.client)
        self.client.transport = transport
        sock.setblocking(False)
        worker.start_transport(self.inner, sock)

    cdef int made(self, RelayEnd end) except -1:
        if end is self.inner and self.client.transport is not None:
            self.client.transport.resume_reading()
        return 0

    cdef int close(self) except -1:
        if self.closed:
            return 0
        self.closed = True
        for end in (self.client, self.inner):
            if (<RelayEnd>end).transport is not None:
                (<RelayEnd>end).transport.close()
        self.worker.relays.discard(self)
        return self.worker.connection_closed()

    cdef int abort(self) except -1:
        for end in (self.client, self.inner):
            if (<RelayEnd>end).transport is not None:
                (<RelayEnd>end).transport.abort()
        return self.close()


@cython.final
cdef class Resumed:
    """An app call's coroutine that start_cycle has already driven one step,
    until it suspended on ``waiting`` (a future, or None for a bare yield):
    the Task that continues it gets ``waiting`` from its first step, as if it
    had run that step itself, then the coroutine's own steps."""
    cdef object coroutine
    cdef object waiting
    cdef bint begun

    def __init__(self, coroutine, waiting):
        self.coroutine = coroutine
        self.waiting = waiting

    def send(self, value):
        if self.begun:
            return self.coroutine.send(value)
        self.begun = True
        waiting, self.waiting = self.waiting, None
        return waiting

    def throw(self, *exception):
        self.begun = True
        self.waiting = None
        return self.coroutine.throw(*exception)

    def close(self):
        return self.coroutine.close()

    def __await__(self):
        return self

    def __next__(self):
        return self.send(None)


# asyncio.Task takes a coroutine: anything collections.abc.Coroutine says is one.
collections.abc.Coroutine.register(Resumed)


# ---------------------------------------------------------------- accepting

@cython.final
cdef class Adoption:
    """Drives ``loop.connect_accepted_socket`` (uvloop's way to make a
    transport of an accepted socket) to its end without a Task: the transport
    exists after the first step; the rest waits for connection_made."""
    cdef object coroutine
    cdef object sock
    cdef ASGIWorker handshaking   # a TLS handshake's worker, told when it ends

    def __init__(self, coroutine, sock, ASGIWorker handshaking=None):
        self.coroutine = coroutine
        self.sock = sock
        self.handshaking = handshaking

    def step(self, _done=None):
        try:
            waiting = self.coroutine.send(None)
        except StopIteration:
            return self.ended()
        except OSError:
            self.sock.close()     # the connection failed before it was made
            return self.ended()
        waiting.add_done_callback(self.step)

    cdef int ended(self) except -1:
        if self.handshaking is not None:
            self.handshaking.handshake_ended()
            self.handshaking = None
        return 0


# ---------------------------------------------------------------- worker

@cython.final
cdef class ASGIWorker(WorkerBase):
    """The asyncio loop of one ASGI worker process (the WorkerBase does the rest)."""

    cdef readonly object loop
    cdef list listeners           # (fd, is_tcp, base_scope, shared, ssl context or None)
    cdef list sockets             # Listener: the listeners this worker accepts from
    cdef bint accept_paused
    cdef object make_transport    # asyncio's selector loops make a transport at once
    cdef readonly set connections
    cdef readonly set relays      # TLS connections relayed to another group (Relay)
    # fd -> (conn, sock, TLS context or None, accepted at): connections whose
    # first bytes decide how they start (a TLS ClientHello, a PROXY header;
    # see accept and first_bytes)
    cdef dict starting
    cdef int handshakes           # TLS handshakes under way (see start_transport)
    cdef dict tls_options         # connect_accepted_socket's TLS timeouts (see main)
    cdef int app_calls            # app calls in progress
    cdef readonly dict state      # the lifespan state, copied into every scope
    cdef readonly bint websockets
    cdef readonly set tasks       # app tasks still pending (asyncio holds them weakly)
    # The context every app call starts from a copy of (the serving task's, as
    # main() begins): never the context of the request that happened to start it.
    cdef object root_context
    cdef dict handoff_scope
    cdef object stopped           # future: the worker is done serving
    cdef object tick_handle
    cdef object on_ready

    def __init__(self, app, listeners, WorkerOptions options not None,
                 dict handoff_scope=None):
        """``listeners``: (fd, is_tcp, base_scope, shared, tls) tuples; the fds stay
        owned by the caller.  ``handoff_scope``: the base scope of connections
        other groups hand over (with routes)."""
        WorkerBase.__init__(self, app, options)
        self.listeners = list(listeners)
        self.sockets = []
        self.connections = set()
        self.relays = set()
        self.starting = {}
        self.tasks = set()
        self.websockets = options.websocket_options is not None
        self.handoff_scope = handoff_scope

    # ---- bookkeeping called by connections

    cdef object app_started(self):
        """Many app calls run at once on one loop: the scoreboard's busy time
        says the loop has been busy (the tick refreshes it while calls run),
        so ``timeout`` means the loop itself is blocked."""
        self.app_calls += 1
        self.board[BOARD_IN_FLIGHT] = self.app_calls
        if self.app_calls == 1:
            self.board[BOARD_BUSY_SINCE] = monotonic()
        return None

    cdef int app_finished(self, object token) except -1:
        self.app_calls -= 1
        self.board[BOARD_IN_FLIGHT] = self.app_calls
        if self.app_calls == 0:
            self.board[BOARD_BUSY_SINCE] = 0.0
            if not self.alive:
                self.check_drained()
        return 0

    def app_started_py(self):
        self.app_started()

    def app_finished_py(self):
        self.app_finished(None)

    cdef int connection_closed(self) except -1:
        if not self.alive:
            self.check_drained()
        return 0

    def log_access(self, ASGIRequest request, client, int status, long long size):
        """The access-log line of a response (called only when the access log is on)."""
        environ = asgi_environ(client, request.method, request.target,
                               "1.1" if request.http_minor else "1.0", request.headers,
                               self.access_log.headers)
        self.access_log(environ, status, size, monotonic() - request.started)

    # ---- life

    def run(self, on_ready=None):
        """Serve until stopped.  ``on_ready`` is called once the lifespan
        startup succeeded and the listeners accept; a startup failure raises
        fastpool.lifespan.LifespanFailure."""
        self.on_ready = on_ready
        loop = new_event_loop(self.options.loop)
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            loop.run_until_complete(self.main())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def main(self):
        loop = self.loop
        self.root_context = copy_context()
        self.stopped = loop.create_future()
        self.install_signal_handlers()
        if self.options.lifespan is not None:
            self.state = await self.options.lifespan.startup()
        if self.alive:       # (a stop during the startup skips serving, not the shutdown)
            if isinstance(loop, BaseSelectorEventLoop):
                self.make_transport = loop._make_socket_transport
            # The handshake has client_timeout; a closing TLS connection waits
            # for the client's close_notify as long as a lingering close
            # drains a plain one (asyncio before 3.11 has no such timeout).
            self.tls_options = {"ssl_handshake_timeout": self.client_timeout or None}
            if not isinstance(loop, BaseSelectorEventLoop) or sys.version_info >= (3, 11):
                self.tls_options["ssl_shutdown_timeout"] = LINGER_SECONDS
            # The worker accepts itself (not loop.create_server): the master's
            # sockets keep their backlog, and running out of descriptors
            # pauses accepting instead of spinning (asyncio) or resetting
            # clients (uvloop).
            for fd, tcp, base_scope, shared, tls in self.listeners:
                self.sockets.append(Listener(fd, tcp, shared, base_scope, tls))
            self.watch_listeners(True)
            if self.handoff is not None:
                loop.add_reader(self.handoff.receiver_fd(), self.take_handoffs)
            refresh_date()
            self.set_state(SERVING)
            self.tick_handle = loop.call_later(SWEEP_SECONDS, self.tick)
            if self.on_ready is not None:
                self.on_ready()
            await self.stopped
            self.tick_handle.cancel()
        if self.options.lifespan is not None:
            await self.options.lifespan.shutdown()

    def install_signal_handlers(self):
        """The worker's signal handlers (set by fastpool.worker) run as loop
        callbacks, so that they may touch the loop's objects."""
        for signum in WORKER_SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                self.loop.add_signal_handler(signum, handler, signum, None)

    def tick(self):
        """Once a second: the Date header, deadlines, the heartbeat."""
        cdef double now = monotonic()
        cdef ASGIConnection conn
        refresh_date()
        if self.app_calls:
            self.board[BOARD_BUSY_SINCE] = now
        self.count_connections(len(self.connections))
        for conn in list(self.connections):
            conn.check_deadlines(now)
        for fd, entry in list(self.starting.items()):
            if self.client_timeout > 0 and now - entry[3] > self.client_timeout:
                self.starting_gone(fd)
        if self.accept_paused and self.alive:
            self.accept_paused = False
            self.watch_listeners(True)
        if self.master_gone():
            self.quit()
            return
        if not self.alive:
            if now > self.graceful_deadline:
                error_log.warning("worker %d: graceful timeout; closing %d connections",
                                  os.getpid(), len(self.connections))
                self.quit()
                return
            self.check_drained()
        self.tick_handle = self.loop.call_later(SWEEP_SECONDS, self.tick)

    # ---- accepting

    cdef int watch_listeners(self, bint on) except -1:
        cdef Listener listening
        for listening in self.sockets:
            if on:
                self.loop.add_reader(listening.fd, self.accept, listening)
            else:
                self.loop.remove_reader(listening.fd)
        return 0

    def accept(self, Listener listening):
        """A listener is readable: accept what waits (a batch at most)."""
        cdef sockaddr_storage address
        cdef int fd
        cdef ASGIConnection conn
        for _ in range(ACCEPT_BATCH):
            fd = self.accept_next(listening, &address)
            if fd < 0:
                return
            conn = ASGIConnection(self, listening.base, listening.tcp)
            if listening.tcp:
                conn.peer = peer_of(&address)
            if self.admission:
                conn.arrived = self.arrival(listening, fd)
            sock = socket.socket(address.ss_family, socket.SOCK_STREAM, 0, fileno=fd)
            if self.proxy_protocol:
                conn.proxy = ProxyReader.__new__(ProxyReader)
            if listening.tls is None and conn.proxy is None:
                self.start_transport(conn, sock, None, conn.peer)
            else:
                # The handshake starts once the first bytes show it is one
                # (after the PROXY header, with proxy_protocol).
                self.starting[fd] = (conn, sock, listening.tls, monotonic())
                self.loop.add_reader(fd, self.first_bytes, fd)

    def first_bytes(self, int fd):
        """A starting connection's first bytes are in.  With proxy_protocol,
        its PROXY header first (WorkerBase.proxy_origin decides whether its
        addresses stand; an invalid one gets nginx's 400).  Then, on a TLS
        listener, a ClientHello starts the loop's TLS handshake; a plain HTTP
        request gets nginx's 400 in plain text (the WSGI worker learns the
        same from OpenSSL)."""
        cdef ASGIConnection conn
        entry = self.starting[fd]
        conn, sock, context = entry[0], entry[1], entry[2]
        if conn.proxy is not None and not self.read_proxy(conn, fd):
            return
        if context is None:
            self.loop.remove_reader(fd)
            del self.starting[fd]
            self.start_transport(conn, sock, None, conn.peer)
            return
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self.loop.remove_reader(fd)
        del self.starting[fd]
        if not first:
            sock.close()
        elif first[0] != TLS_HANDSHAKE_RECORD:
            error_log.debug("TLS handshake with %s failed: not TLS (plain HTTP?)",
                            conn.client_text())
            # Answered in plain text, with the lingering close of any refusal.
            conn.refusal = error_response(400, "The plain HTTP request was sent to HTTPS port")
            self.count_response(400, 0, SERVED_ERROR)
            self.start_transport(conn, sock, None, conn.peer)
        else:
            self.start_transport(conn, sock, context)

    cdef bint read_proxy(self, ASGIConnection conn, int fd) except -1:
        """first_bytes' PROXY header part: True once it is in and the
        connection goes on (its addresses set when believed); False while it
        waits, or when it ended (closed, or given its 400)."""
        cdef ProxyReader reader = conn.proxy
        cdef int step = reader.step(fd)
        if step == PROXY_WAIT:
            return False
        conn.proxy = None
        if step == PROXY_GONE:
            self.starting_gone(fd)
            return False
        if step == PROXY_BAD:
            error_log.debug("connection from %s refused: %s", conn.peer[0] if type(
                conn.peer) is tuple else "a unix socket client", reader.error)
            entry = self.starting.pop(fd)
            self.loop.remove_reader(fd)
            conn.refusal = error_response(400, reader.error)
            self.count_response(400, 0, SERVED_ERROR)
            self.start_transport(conn, entry[1], None, conn.peer)
            return False
        peer = conn.peer[0] if type(conn.peer) is tuple else ""
        origin = self.proxy_origin(reader, peer, conn.base_scope["scheme"])
        if origin is not None:
            conn.via, conn.peer, conn.tcp = peer, reader.client, True
            conn.base_scope = dict(conn.base_scope, server=reader.server)
            conn.handoff_origin = origin
        return True

    cdef int starting_gone(self, int fd) except -1:
        """A starting connection that never sent its first bytes in time (or a stop)."""
        entry = self.starting.pop(fd)
        self.loop.remove_reader(fd)
        entry[1].close()
        return 0

    cdef int pause_accepting(self) except -1:
        if not self.accept_paused:
            self.accept_paused = True
            self.watch_listeners(False)
        return 0

    cdef int start_transport(self, object protocol, object sock, object tls=None,
                             object peer=None) except -1:
        """Give an accepted (or handed-over) socket to the event loop, with
        ``protocol`` (an ASGIConnection, or a relay's end) as its protocol
        and ``peer`` as its peername; with ``tls`` (an SSL context), after the
        loop's non-blocking TLS handshake, which client_timeout bounds (a
        failed one ends the connection, logged at debug level by asyncio)."""
        if tls is not None:
            # Counted until it ends (WorkerBase's drain waits for it, as the
            # WSGI worker's does for a connection in HANDSHAKING).
            self.handshakes += 1
            Adoption(self.loop.connect_accepted_socket(
                protocol.protocol_factory, sock, ssl=tls, **self.tls_options), sock,
                self).step()
        elif self.make_transport is not None:
            # asyncio: connection_made runs soon, before the first read.
            self.make_transport(sock, protocol, None, extra={"peername": peer})
        else:
            # uvloop's public way is a coroutine: driven here, without a Task.
            Adoption(self.loop.connect_accepted_socket(protocol.protocol_factory, sock),
                     sock).step()
        return 0

    def take_handoffs(self):
        """Connections other groups handed to this one (routes)."""
        cdef ASGIConnection conn
        cdef dict scope
        cdef Handover handover
        for _ in range(HANDOFF_BATCH):
            handover = self.take_handoff()
            if handover is None:
                return
            if handover.fd < 0:
                continue
            scope = self.handoff_scope.copy()
            scope["server"] = handover.server
            if handover.scheme == "https":
                scope["scheme"] = "https"
            conn = ASGIConnection(self, scope, handover.tcp)
            conn.router = self.router
            conn.home_group = handover.home
            conn.handoff_origin = handover.origin
            conn.handoff_addresses = handover.addresses
            conn.initial_data = handover.data
            if handover.peer is not None:
                conn.peer = handover.peer
            conn.via = handover.via
            # With the family from the message, the socket object asks the
            # descriptor nothing (three getsockopt calls otherwise).
            sock = socket.socket(handover.family, socket.SOCK_STREAM, 0, handover.fd) \
                if handover.family else socket.socket(fileno=handover.fd)
            sock.setblocking(False)
            self.start_transport(conn, sock, None, conn.peer)

    # ---- stopping (WorkerBase.stop, from the signal handlers in worker.py)

    def stop(self, *, bint graceful=True, bint close_idle=True):
        if self.stopped is None:
            raise SystemExit(0)   # the loop is not running yet: nothing to drain
        WorkerBase.stop(self, graceful=graceful, close_idle=close_idle)

    cdef int stop_accepting(self) except -1:
        """Stop accepting, close WebSockets with 1012, close idle connections
        (on a shutdown), and finish once drained."""
        cdef ASGIConnection conn
        self.watch_listeners(False)
        if self.close_idle:
            for fd in list(self.starting):
                self.starting_gone(fd)     # (connected, and not one byte sent yet)
        if self.handoff is not None and self.sockets:
            # Queued handoffs are for the workers that stay.
            self.loop.remove_reader(self.handoff.receiver_fd())
        for conn in list(self.connections):
            if conn.websocket is not None:
                conn.websocket.shutdown()
            elif self.close_idle and conn.cycle is None and not conn.pending and (
                    conn.at_message_boundary()):
                conn.close_after_output()
        return self.check_drained()

    cdef int check_drained(self) except -1:
        if not (self.connections or self.relays or self.app_calls or self.starting
                or self.handshakes):
            self.quit()
        return 0

    cdef int handshake_ended(self) except -1:
        """A TLS handshake is over (its connection, if made, is in connections)."""
        self.handshakes -= 1
        if not self.alive:
            self.check_drained()
        return 0

    cdef int quit(self) except -1:
        cdef ASGIConnection conn
        cdef Relay relay
        for conn in list(self.connections):
            conn.abort()
        for relay in list(self.relays):
            relay.abort()
        for fd in list(self.starting):
            self.starting_gone(fd)
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)
        return 0


def new_event_loop(str kind):
    """asyncio's loop, or uvloop's (``auto``: uvloop when it is installed)."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise RuntimeError("--loop uvloop: uvloop is not installed "
                                   "(pip install 'fastpool[uvloop]')") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()

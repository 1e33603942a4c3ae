# cython: language_level=3
"""The compiled WSGI worker: accept, read, parse, call the app, respond.

Rules of this module:

* One worker process runs one ``WSGIWorker.run`` loop over epoll (level
  triggered) with non-blocking sockets and many keep-alive connections.  The
  app is called synchronously (the prefork model): one request at a time.
* No connection may hold the worker while it waits for its client:
  - a request is dispatched only once its head and its whole body are in (a
    body past ``BODY_MEMORY_LIMIT`` bytes is spooled to an anonymous temporary
    file), so ``wsgi.input`` never waits on the socket; ``Expect:
    100-continue`` is answered by the loop when the request's turn comes;
  - a response body the app streams (any iterable but a list or tuple) or a
    ``wsgi.file_wrapper`` file is sent as the client takes it: each block is
    sent before the app is asked for the next (PEP 3333: no delay), and once
    more than ``HIGH_WATER`` bytes wait for a client that does not read, the
    response is suspended and the loop serves other connections until the
    socket is writable again.  The iterator then runs in a ``contextvars``
    context of its own, so suspended responses never see each other's
    context variables.
  Only the PEP 3333 ``write()`` callable can still wait on a client, past
  ``HIGH_WATER`` bytes, bounded by the connection's deadline.
* Responses are written into the connection's ``OutBuffer`` and sent once per
  batch of pipelined requests (and once per block of a streamed body).
* The GIL is released only around epoll_wait and poll.
* Every connection has one deadline (see ``WSGIWorker.set_deadline``: the
  idle keep-alive, the head absolute from its first byte, the body and the
  response by progress, the lingering close); ``sweep`` enforces them once a
  second.
* Nothing a client sends and nothing an app does may end this loop: protocol
  errors become statuses (see _http.pyx), app errors become 500s, and a client
  that disappears is a closed connection.
* TLS (a ``tls_listen`` socket): the connection's ``ssl.SSLSocket`` does the
  handshake a step per readiness (state HANDSHAKING, within client_timeout),
  then reads decrypt into the same buffer (``read_tls``, draining what
  OpenSSL holds, which epoll cannot see) and output goes through
  ``OutBuffer.send_through``; files are read and encrypted in
  ``TLS_FILE_CHUNK`` parts.  Where the kernel took the records over both ways
  (kernel TLS), the SSLSocket is dropped and the connection is plain.  A
  request for another group on a TLS connection is relayed (``Relay``,
  state RELAYING), since the keys cannot travel with the descriptor.
* PROXY protocol (``proxy_protocol``): a new connection starts in state
  PROXYING, whose reads take its header off the socket (``ProxyReader``)
  within client_timeout; then it goes on as any other (OPEN, or HANDSHAKING
  on a tls_listen socket).  Other connections never pass through that state:
  it costs them nothing.
* With ``threads`` > 1 the app runs in a pool of threads (gthread model): a
  connection with a ready request is taken out of epoll and handed to a
  thread, which serves its ready requests exactly as the loop would (the same
  methods, but waiting on the socket itself, since the thread is the
  connection's alone) and hands it back through a wake-up pipe.  A connection
  belongs to one thread at a time; the loop never touches a busy one.
* The worker reports to the master through its scoreboard record (shared
  memory): requests served, since when app code has been running (for
  ``timeout``: the app call and each step of a streamed body, not the time a
  client takes to read), and its state.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_WRITE
from cpython.exc cimport PyErr_CheckSignals
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.math cimport INFINITY
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.types cimport off_t

from fastpool._consts cimport *
from fastpool._posix cimport (
    epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLLIN, EPOLLOUT, EPOLLERR,
    EPOLLHUP, EPOLLEXCLUSIVE, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC,
    sockaddr_storage, recv, send, shutdown, SHUT_WR, sendfile, poll, MSG_NOSIGNAL,
    pollfd, POLLOUT, close, errno, EAGAIN, EINTR, setsockopt, IPPROTO_TCP, TCP_CORK,
)
from fastpool._http cimport (
    peer_of, remember, take_first, target_parts,
    deadline_after, Request, HttpConnection, OutBuffer, TargetCache,
    refresh_date, status_line, error_response, monotonic, Framing, framing_reset,
    queue_head, frame_body, end_body, SERVED_HEALTH, SERVED_STATIC, SERVED_SHED, SERVED_ERROR,
)
from fastpool._static cimport StaticAnswer, StaticFile, StaticFiles, queue_answer
from fastpool._worker cimport (
    WorkerBase, WorkerOptions, Handover, Listener, SERVING, input_waiting, ProxyReader,
    PROXY_WAIT, PROXY_BAD, PROXY_GONE,
)

import contextvars
import logging
import os
import queue
import socket
import ssl
import stat
import threading
from ssl import SSLEOFError, SSLWantReadError, SSLWantWriteError

from fastpool._http import ClientDisconnected
from fastpool.tls import offloaded as tls_offloaded, wsgi_keys as tls_keys

cdef object error_log = logging.getLogger("fastpool.error")
# ssl.OP_ENABLE_KTLS where this Python has it (3.12+), else no option bit.
cdef long KTLS_OPTION = getattr(ssl, "OP_ENABLE_KTLS", 0)

# An app's ``next()`` returns this at the end of the iterable (see pump).
cdef object END = object()
cdef object copy_context = contextvars.copy_context


# ---------------------------------------------------------------- environ

cdef dict HEADER_KEYS = {}


cdef object header_key(bytes name):
    """The environ key for a request header name, or None to drop it.

    Names containing "_" are dropped: once "-" becomes "_" they could pass
    for another header (X-Auth_User vs X-Auth-User), as gunicorn and nginx
    also rule.
    """
    cdef object key = HEADER_KEYS.get(name, False)
    cdef str upper
    if key is not False:
        return key
    if b"_" in name:
        key = None
    else:
        upper = name.decode("latin-1").upper().replace("-", "_")
        if upper == "CONTENT_TYPE" or upper == "CONTENT_LENGTH":
            key = upper
        else:
            key = "HTTP_" + upper
    return remember(HEADER_KEYS, name, key, HEADER_NAME_CACHE_SIZE)


cdef int cork(int fd, int on) noexcept:
    """TCP_CORK on (or off) while a static file goes out with sendfile: the
    kernel then sends full segments, as nginx's tcp_nopush does.  Without it
    each EPOLLOUT wake-up pushes what little room has freed in small packets,
    and the client's side pays for them (bench/static.py, file-1m: 1,828 ->
    2,478 req/s).  A Unix socket ignores it."""
    setsockopt(fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on))
    return 0


cdef bytes header_bytes(dict environ, str key):
    """A request header's value from the environ, as bytes (None when absent)."""
    cdef object value = environ.get(key)
    return None if value is None else (<str>value).encode("latin-1")


@cython.final
cdef class WSGITargets(TargetCache):
    """Request-target -> (PATH_INFO, QUERY_STRING, RAW_URI) before root_path."""

    cdef tuple convert(self, bytes target, tuple parts):
        return ((<bytes>parts[0]).decode("latin-1"), (<bytes>parts[2]).decode("latin-1"),
                target.decode("latin-1"))


cdef WSGITargets TARGETS = WSGITargets()


@cython.final
@cython.freelist(64)
@cython.no_gc   # environ -> wsgi.input -> request is a cycle only until run_app breaks it
cdef class WSGIRequest(Request):
    cdef public dict environ
    cdef bint continue_sent    # "100 Continue" written for Expect: 100-continue


# ---------------------------------------------------------------- wsgi.input

@cython.final
@cython.freelist(64)
@cython.no_gc   # its reference is dropped when the response is done
cdef class InputStream:
    """``wsgi.input``: the request body, de-chunked, never read past its end.

    The whole body is in when the app runs (in memory, or spooled to a file
    that this stream reads), so no read waits on the client.  After the
    response is finished it is detached and reads as empty.
    """

    cdef WSGIRequest request

    def read(self, size=-1):
        cdef Py_ssize_t wanted = -1 if size is None else size
        if self.request is None:
            return b""
        return self.request.take_body(wanted)

    def readline(self, size=-1):
        cdef Py_ssize_t limit = -1 if size is None else size
        cdef WSGIRequest request = self.request
        cdef Py_ssize_t end
        if request is None:
            return b""
        if request.spool is not None:
            line = request.spool.readline(limit)
            request.body_size -= len(line)
            return line
        end = request.find_in_body(b"\n", limit)
        if end >= 0:
            return request.take_body(end)
        return request.take_body(limit)

    def readlines(self, hint=-1):
        cdef list lines = []
        cdef Py_ssize_t total = 0
        cdef Py_ssize_t limit = -1 if hint is None else hint
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < limit <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line


# ---------------------------------------------------------------- file wrapper

@cython.final
cdef class FileWrapper:
    """``wsgi.file_wrapper``: served with sendfile when the file is a regular file."""

    cdef public object filelike
    cdef public Py_ssize_t blksize

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration

    def close(self):
        closer = getattr(self.filelike, "close", None)
        if closer is not None:
            closer()


# ---------------------------------------------------------------- connection

cdef class WakePipe:
    """The table entry of the pipe app threads use to wake the loop."""


cdef class HandoffQueue:
    """The table entry of the group's handoff queue (routes)."""


cdef enum ConnState:
    OPEN = 0        # reading requests / idle between them
    LINGERING = 1   # response sent, write side shut, discarding input until EOF
    CLOSED = 2
    HANDSHAKING = 3  # a TLS connection before its handshake is done
    RELAYING = 4    # a TLS connection another group serves: bytes go through a Relay
    PROXYING = 5    # a proxy_protocol group's connection before its PROXY header is in


cdef class Relay


@cython.final
cdef class WSGIConnection(HttpConnection):
    cdef int fd
    cdef WSGIWorker worker
    cdef dict base_environ
    cdef readonly str remote_addr
    cdef OutBuffer out
    cdef ConnState state
    cdef double deadline
    cdef double last_read      # when bytes last arrived (a body's progress deadline)
    cdef bint closing          # close once the output is sent
    cdef bint peer_closed      # the client shut its side down
    cdef bint want_write       # registered for EPOLLOUT
    cdef bint busy             # owned by an app thread (threads > 1)
    cdef bint trusted_proxy    # the peer may set X-Forwarded-For / -Proto
    cdef object start_response_method
    cdef object write_method
    # The response being produced (one at a time).
    cdef WSGIRequest request
    cdef object status
    cdef object headers
    cdef Framing framing
    # A response whose body goes out as the client takes it (``streaming``):
    # the app's iterable (``result``, closed at the end) and its iterator,
    # advanced in ``context``; or a wsgi.file_wrapper file sent with sendfile.
    cdef bint streaming
    cdef object result
    cdef object body_iter
    cdef object context
    cdef int file_fd
    cdef off_t file_offset
    cdef long long file_remaining
    # TLS: the connection's ssl.SSLSocket (None for a plain connection, and
    # once kernel TLS carries the records), and what reads and writes its
    # records (``tls_io``, see start_tls); a relay when another group serves it.
    cdef object tls
    cdef object tls_io
    cdef Relay relay
    cdef bint fd_closed        # Python's ssl closed the descriptor (see start_tls)
    # proxy_protocol: the header being read (state PROXYING), and the TLS
    # context whose handshake follows it on a tls_listen socket.
    cdef ProxyReader proxy
    cdef object proxy_tls
    # Admission control: when the connection's bytes reached the kernel
    # (WorkerBase.arrival; 0 when not measured, -INFINITY to shed).
    cdef double arrived

    def __init__(self, WSGIWorker worker, int fd, dict base_environ, str remote_addr):
        HttpConnection.__init__(self, worker.limits)
        self.worker = worker
        self.fd = fd
        self.base_environ = base_environ
        self.remote_addr = remote_addr
        self.out = OutBuffer()
        self.state = OPEN
        self.file_fd = -1
        self.start_response_method = self.start_response
        self.write_method = self.write

    # ---- building the environ (hooks of HttpConnection)

    cdef Request new_request(self):
        cdef WSGIRequest request = WSGIRequest.__new__(WSGIRequest)
        request.environ = self.base_environ.copy()
        request.spool_above = BODY_MEMORY_LIMIT
        return request

    cdef int add_header(self, Request request, bytes name, bytes value) except -1:
        cdef object key = header_key(name)
        cdef dict environ
        cdef str text
        if key is None:
            return 0
        environ = (<WSGIRequest>request).environ
        text = value.decode("latin-1")
        previous = environ.setdefault(key, text)
        if previous is not text:
            environ[key] = previous + ", " + text   # a repeated header
        return 0

    cdef int finish_head(self, Request request) except -1:
        cdef dict environ = (<WSGIRequest>request).environ
        cdef tuple parts = target_parts(TARGETS, request.target)
        cdef str path = parts[0]
        cdef str root = self.worker.root_path
        environ["REQUEST_METHOD"] = request.method
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root):]
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = parts[1]
        environ["RAW_URI"] = parts[2]
        environ["SERVER_PROTOCOL"] = "HTTP/1.1" if request.http_minor else "HTTP/1.0"
        if request.authority is not None:
            # An absolute-form target's host wins over Host (RFC 9112 3.2.2).
            environ["HTTP_HOST"] = request.authority.decode("latin-1")
        if self.trusted_proxy:
            self.apply_forwarded(environ)
        return 0

    cdef int apply_forwarded(self, dict environ) except -1:
        """A trusted proxy's X-Forwarded-For / X-Forwarded-Proto (WorkerBase)."""
        cdef str client = self.worker.forwarded_client(environ.get("HTTP_X_FORWARDED_FOR"))
        cdef str scheme = self.worker.forwarded_scheme(environ.get("HTTP_X_FORWARDED_PROTO"))
        if client is not None:
            environ["REMOTE_ADDR"] = client
            environ["REMOTE_PORT"] = "0"
        if scheme is not None:
            environ["wsgi.url_scheme"] = scheme
        return 0

    cdef int answer_health(self, WSGIRequest request) except -1:
        """The group's health_path, answered without the app (WorkerBase.health_answer)."""
        cdef tuple answer = self.worker.health_answer()
        cdef bytes body = answer[1]
        self.reset_response(request)
        self.framing.served_by = SERVED_HEALTH
        self.status = "200 OK" if answer[0] == 200 else "503 Service Unavailable"
        self.headers = [("Content-Type", "text/plain")]
        self.write_head(len(body))
        self.write_body(body)
        self.finish_body()
        return self.finish_response(request)

    cdef bint serve_static(self, WSGIRequest request) except -1:
        """Answer ``request`` from the group's static files, without the app
        (fastpool._static); False when it is not a file.  The request leaves
        ``pending`` only when it is answered here.  A small file goes out with
        its head; a larger one is a streamed response that ``pump`` sends with
        sendfile as the client takes it."""
        cdef WSGIWorker worker = self.worker
        cdef StaticFiles static = worker.static
        cdef StaticFile found
        cdef StaticAnswer answer
        cdef dict environ
        if static is None:
            return False
        environ = request.environ
        try:
            found = static.find(request.method, request.target)
            if found is None:
                return False
            answer = static.answer(found, request.method,
                                   header_bytes(environ, "HTTP_IF_NONE_MATCH"),
                                   header_bytes(environ, "HTTP_IF_MODIFIED_SINCE"),
                                   header_bytes(environ, "HTTP_RANGE"),
                                   header_bytes(environ, "HTTP_IF_RANGE"),
                                   header_bytes(environ, "HTTP_ACCEPT_ENCODING"))
        except Exception:
            # Never the worker's end: a 500 for this request, one log line.
            if self.pending and self.pending[0] is request:
                take_first(self.pending)
            self.reset_response(request)
            self.app_failed()
            self.end_response(None, False)
            return True
        if self.pending and self.pending[0] is request:
            take_first(self.pending)
        self.reset_response(request)
        self.framing.served_by = SERVED_STATIC
        if not queue_answer(answer, self.out, &self.framing, request,
                            worker.alive and worker.keep_alive > 0):
            self.end_response(None, True)
            return True
        self.result = answer
        self.streaming = True
        cork(self.fd, 1)
        self.file_fd = answer.fd
        self.file_offset = answer.offset
        self.file_remaining = answer.length
        return True

    cdef int finish_response(self, WSGIRequest request) except -1:
        """After a response is queued: its counts, its access-log line, and the
        close decision."""
        self.worker.count_response(self.framing.status_code, request.started,
                                   self.framing.served_by)
        if self.worker.access_log is not None:
            self.worker.access_log(request.environ, self.framing.status_code,
                                   self.framing.body_sent,
                                   monotonic() - request.started)
        if self.framing.close:
            self.closing = True
        self.request = None
        if request.spool is not None:
            request.spool.close()
            request.spool = None
        return 0

    # ---- start_response and write (PEP 3333)

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.framing.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        if type(status) is not str:
            raise TypeError(f"status must be str, got {type(status).__name__}")
        if type(headers) is not list:
            raise TypeError(f"headers must be a list, got {type(headers).__name__}")
        status_line(status)  # raises ValueError on a malformed status, here where the app sees it
        self.status = status
        self.headers = headers
        return self.write_method

    def write(self, data):
        if self.status is None:
            raise AssertionError("write() called before start_response()")
        if type(data) is not bytes:
            raise TypeError(f"write() takes bytes, got {type(data).__name__}")
        self.write_body(data)
        # PEP 3333: sent, or buffered for sending, before write returns.  The
        # app is running, so past HIGH_WATER there is nothing to do but wait.
        self.send_some()
        if self.out.size > HIGH_WATER:
            self.flush_blocking()

    # ---- response serialisation

    cdef int write_head(self, long long body_length) except -1:
        """Serialise status and headers; ``body_length`` is the whole body's
        size when the worker knows it, else -1."""
        cdef WSGIWorker worker = self.worker
        cdef tuple line = status_line(self.status)
        return queue_head(self.out, &self.framing, self.request, <bytes>line[0], <int>line[1],
                          self.headers, False, body_length,
                          worker.alive and worker.keep_alive > 0)

    cdef int write_body(self, bytes data) except -1:
        if PyBytes_GET_SIZE(data) == 0:
            return 0   # PEP 3333: the head waits for the first non-empty chunk
        if not self.framing.headers_sent:
            self.write_head(-1)
        if frame_body(self.out, &self.framing, data):
            error_log.warning("app sent more than its Content-Length (%d) for %s; closing",
                              self.framing.declared_length, self.request.environ.get("RAW_URI"))
        return 0

    cdef int finish_body(self) except -1:
        if not self.framing.headers_sent:
            self.write_head(0)
        return end_body(self.out, &self.framing)

    # ---- the socket

    cdef int send_some(self) except -1:
        """Send what the socket takes now; ClientDisconnected when it is gone."""
        if self.out.size:
            try:
                self.send_out()
            except OSError as exc:
                raise ClientDisconnected(*exc.args) from None
        return 0

    cdef Py_ssize_t send_out(self) except -2:
        """The queued output to the socket, without blocking (OutBuffer.send_to,
        or send_through on TLS); OSError when the client is gone."""
        if self.tls is None:
            return self.out.send_to(self.fd)
        return self.out.send_through(self.tls_io)

    cdef int wait_socket(self, short events) except -1:
        """Wait (GIL released) until the socket is ready, at most the
        connection's send timeout (an app thread, or write())."""
        cdef pollfd pfd
        cdef double limit = self.worker.client_timeout
        cdef int timeout_ms = <int>(limit * 1000) if limit > 0 else -1
        cdef int ready
        pfd.fd = self.fd
        pfd.events = events
        pfd.revents = 0
        while True:
            with nogil:
                ready = poll(&pfd, 1, timeout_ms)
            if ready >= 0:
                break
            if errno != EINTR:
                raise ClientDisconnected(errno, "poll failed")
            PyErr_CheckSignals()
        if ready == 0:
            raise ClientDisconnected(f"the client took no response bytes for {limit:g} s")
        return 0

    cdef int flush_blocking(self) except -1:
        while self.out.size:
            self.send_some()
            if self.out.size:
                self.wait_socket(POLLOUT)
        return 0

    # ---- one request

    cdef int reset_response(self, WSGIRequest request) except -1:
        self.request = request
        self.status = None
        self.headers = None
        framing_reset(&self.framing)
        return 0

    cdef int send_continue(self) except -1:
        """The loop's answer to ``Expect: 100-continue`` once the request's turn
        has come and its body has not started: the client may send it now."""
        cdef WSGIRequest request
        if not self.pending or self.streaming or self.closing:
            return 0
        request = <WSGIRequest>self.pending[0]
        if (request.expect_continue and not request.continue_sent and not request.body_complete
                and request.body_received == 0 and not self.error_status):
            request.continue_sent = True
            self.out.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n", 25)
        return 0

    cdef int run_app(self, WSGIRequest request) except -1:
        """Call the app for ``request``: a list or tuple is queued whole; any
        other iterable (or a file wrapper) starts a streamed response, which
        ``pump`` sends."""
        cdef InputStream body = InputStream.__new__(InputStream)
        cdef object result = None
        cdef object item
        cdef long long total
        cdef object token
        cdef bint late
        cdef WSGIWorker worker = self.worker
        if worker.admission:
            late = worker.too_late(self.arrived, request.started)
            self.arrived = worker.stop_waiting(self.arrived)
            if late:
                return self.shed_request(request)
        self.reset_response(request)
        body.request = request
        if request.spool is not None:
            request.spool.seek(0)
        request.environ["wsgi.input"] = body
        token = worker.app_started()
        try:
            result = worker.app(request.environ, self.start_response_method)
            if type(result) is list or type(result) is tuple:
                total = 0
                for item in result:
                    if type(item) is not bytes:
                        raise TypeError(
                            f"the app's iterable yielded {type(item).__name__}, not bytes")
                    total += PyBytes_GET_SIZE(<bytes>item)
                if self.status is None:
                    raise AssertionError("the app returned without calling start_response()")
                if not self.framing.headers_sent:
                    self.write_head(total)
                for item in result:
                    self.write_body(item)
                result = None
            else:
                self.result = result
                self.streaming = True
                if type(result) is not FileWrapper or not self.open_file(<FileWrapper>result):
                    self.body_iter = iter(result)
                    # The iterator may be suspended while other requests run:
                    # it gets a context of its own (a copy of the app call's).
                    self.context = copy_context()
        except ClientDisconnected:
            self.abort_response()
            return 0
        except Exception:
            self.app_failed()
            self.end_response(result, False)
            return 0
        finally:
            worker.app_finished(token)
            # Break environ -> wsgi.input -> request -> environ, so that the
            # request is freed by reference counting, not by the cyclic GC.
            body.request = None
        if not self.streaming:
            self.end_response(None, True)
        return 0

    cdef int pump(self, bint blocking) except -1:
        """Send a streamed response as the client takes it: each block is sent
        before the app is asked for the next.  Returns 1 when the loop should
        come back on EPOLLOUT: the client must read first, or this response
        has had its turn (HIGH_WATER bytes per call, so that one fast client
        does not keep the loop from the others).  ``blocking`` (an app thread)
        waits on the socket instead.  Returns 0 when the response is over."""
        cdef WSGIWorker worker = self.worker
        cdef object token
        cdef object item
        cdef long long turn_end = self.framing.body_sent + HIGH_WATER
        try:
            while self.streaming:
                self.send_some()
                if self.out.size > (HIGH_WATER if self.file_fd < 0 else 0):
                    if not blocking:
                        return 1
                    self.wait_socket(POLLOUT)
                    continue
                if not blocking and self.framing.body_sent >= turn_end:
                    return 1
                if self.file_fd >= 0:
                    if self.send_file_part():
                        if not blocking:
                            return 1
                        self.wait_socket(POLLOUT)
                    continue
                token = worker.app_started()
                try:
                    item = self.context.run(next, self.body_iter, END)
                finally:
                    worker.app_finished(token)
                if item is END:
                    if self.status is None:
                        raise AssertionError("the app returned without calling start_response()")
                    self.end_response(self.result, True)
                    return 0
                if type(item) is not bytes:
                    raise TypeError(f"the app's iterable yielded {type(item).__name__}, not bytes")
                if self.status is None:
                    raise AssertionError("the app yielded a body before start_response()")
                self.write_body(item)
        except ClientDisconnected:
            self.abort_response()
        except Exception:
            self.app_failed()
            self.end_response(self.result, False)
        return 0

    cdef int shed_request(self, WSGIRequest request) except -1:
        """Admission control: ``request`` waited longer than max_queue_wait (or
        came while more than max_pending connections waited): 503 with
        Retry-After instead of the app, and the connection closes."""
        self.reset_response(request)
        self.out.write(self.worker.shed())
        self.framing.served_by = SERVED_SHED
        self.framing.status_code = 503
        self.framing.headers_sent = True
        self.closing = True
        return self.end_response(None, False)

    cdef bint open_file(self, FileWrapper wrapper) except -1:
        """Set up a wsgi.file_wrapper response for sendfile; False if its file
        is not a regular file (then it is iterated like any iterable)."""
        cdef off_t offset
        cdef long long remaining
        try:
            fd = wrapper.filelike.fileno()
            info = os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            return False
        if not stat.S_ISREG(info.st_mode) or self.status is None:
            return False
        try:
            offset = wrapper.filelike.tell()
        except (AttributeError, OSError):
            offset = 0
        remaining = max(info.st_size - offset, 0)
        if not self.framing.headers_sent:
            self.write_head(remaining)
        if self.framing.chunked:
            return False
        if self.framing.declared_length >= 0 and remaining > self.framing.declared_length:
            remaining = self.framing.declared_length
        if self.framing.body_suppressed:
            remaining = 0
        self.file_fd = fd
        self.file_offset = offset
        self.file_remaining = remaining
        cork(self.fd, 1)
        return True

    cdef bint send_file_part(self) except -1:
        """sendfile the next part of a file response (the head is out); True
        when the socket is full.  At the end, or when the file has shrunk
        (finish_body then sees the short length and closes), the response ends."""
        cdef ssize_t sent
        if self.tls is not None:
            return self.send_file_tls()
        while self.file_remaining > 0:
            sent = sendfile(self.fd, self.file_fd, &self.file_offset,
                            min(self.file_remaining, SENDFILE_CHUNK))
            if sent > 0:
                self.file_remaining -= sent
                self.framing.body_sent += sent
                return False      # back to the loop between parts
            if sent == 0:
                break
            if errno == EAGAIN:
                return True
            if errno != EINTR:
                raise ClientDisconnected(errno, "sendfile failed")
        cork(self.fd, 0)
        self.end_response(self.result, True)
        return False

    cdef bint send_file_tls(self) except -1:
        """send_file_part on a TLS connection: the kernel cannot encrypt, so the
        next part is read and sent through OpenSSL.  After a block, the same
        bytes are read again for the retry OpenSSL wants."""
        cdef ssize_t sent
        if self.file_remaining > 0:
            piece = os.pread(self.file_fd, min(self.file_remaining, TLS_FILE_CHUNK),
                             self.file_offset)
            if piece:
                try:
                    sent = self.tls_io.write(piece)
                except (SSLWantWriteError, SSLWantReadError):
                    return True
                except OSError as exc:
                    raise ClientDisconnected(*exc.args) from None
                self.file_offset += sent
                self.file_remaining -= sent
                self.framing.body_sent += sent
                return False
        cork(self.fd, 0)
        self.end_response(self.result, True)
        return False

    cdef int end_response(self, object result, bint complete) except -1:
        """The app's body is over: end its framing (``complete``; an app that
        failed half-way gets no end, the connection closes instead), close the
        app's iterable, log, decide about the connection."""
        cdef WSGIRequest request = self.request
        if request is None:
            return 0
        if complete:
            self.finish_body()
        if result is not None or self.streaming:
            self.close_result(result)
        self.worker.request_done()
        return self.finish_response(request)

    cdef int close_result(self, object result) except -1:
        """PEP 3333: call the iterable's close(), in the context it ran in."""
        cdef object context = self.context
        self.streaming = False
        self.result = None
        self.body_iter = None
        self.context = None
        self.file_fd = -1
        if result is None or type(result) is list or type(result) is tuple:
            return 0
        closer = getattr(result, "close", None)
        if closer is None:
            return 0
        try:
            if context is not None:
                context.run(closer)
            else:
                closer()
        except Exception:
            error_log.error("Error closing the app's iterable for %s",
                            self.request.environ.get("RAW_URI") if self.request else "?",
                            exc_info=True)
        return 0

    cdef int app_failed(self) except -1:
        """The app raised: a 500 in place of its response, or a close when part
        of the response is already out."""
        cdef WSGIRequest request = self.request
        error_log.error("Error handling request %s %s", request.method,
                        request.environ.get("RAW_URI"), exc_info=True)
        if self.framing.headers_sent:
            self.closing = True     # the only honest signal left
            return 0
        self.out.write(error_response(500))
        self.framing.status_code = 500
        self.framing.headers_sent = True
        self.closing = True
        return 0

    cdef int abort_response(self) except -1:
        """The client went away (or stopped reading) during the response."""
        self.closing = True
        self.out.clear()
        if self.request is not None:
            self.close_result(self.result)
            self.worker.request_done()
            self.finish_response(self.request)
        return 0

    # ---- the connection's life in the loop (every event comes through here)

    cdef int on_event(self, unsigned int flags) except -1:
        if self.state != OPEN:
            if self.state == LINGERING:
                self.linger_read()
            elif self.state == HANDSHAKING:
                self.handshake()
            elif self.state == RELAYING:
                self.relay.client_event(flags)
            elif self.state == PROXYING:
                self.read_proxy()
        elif self.want_write:
            if flags & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                self.advance()
        else:
            self.read()
        return 0

    cdef int read(self) except -1:
        cdef WSGIWorker worker = self.worker
        cdef ssize_t received
        if self.tls is not None:
            return self.read_tls()
        received = recv(self.fd, worker.recv_buffer, RECV_SIZE, 0)
        if received > 0:
            self.last_read = worker.now
            self.feed(worker.recv_buffer, received)
        elif received == 0:
            self.peer_closed = True
            self.stop_reading = True
        elif errno == EAGAIN or errno == EINTR:
            return 0
        else:
            return self.close_connection()
        return self.advance()

    # ---- the PROXY protocol

    cdef int expect_proxy(self, object tls) except -1:
        """A proxy_protocol group's connection: its PROXY header first (then
        the TLS handshake, with ``tls``), within client_timeout."""
        self.proxy = ProxyReader.__new__(ProxyReader)
        self.proxy_tls = tls
        self.state = PROXYING
        return self.read_proxy()

    cdef int read_proxy(self) except -1:
        """Read the PROXY header; once it is in, its addresses stand for the
        socket's (WorkerBase.proxy_origin decides) and the connection goes
        on; an invalid one gets 400, as nginx answers it."""
        cdef WSGIWorker worker = self.worker
        cdef int step = self.proxy.step(self.fd)
        cdef dict base = self.base_environ
        if step == PROXY_WAIT:
            return 0
        if step == PROXY_GONE:
            return self.close_connection()
        self.state = OPEN
        if step == PROXY_BAD:
            error_log.debug("connection from %s refused: %s",
                            self.remote_addr or "a unix socket client", self.proxy.error)
            self.fail(400, self.proxy.error)
            self.proxy = None
            return self.settle()
        origin = worker.proxy_origin(self.proxy, self.remote_addr, base["wsgi.url_scheme"])
        if origin is not None:
            client, server = self.proxy.client, self.proxy.server
            self.remote_addr = client[0]
            base["REMOTE_ADDR"], base["REMOTE_PORT"] = client[0], str(client[1])
            base["SERVER_NAME"], base["SERVER_PORT"] = server[0], str(server[1])
            self.handoff_origin = origin
        tls, self.proxy, self.proxy_tls = self.proxy_tls, None, None
        if tls is not None:
            return self.start_tls(tls)
        return self.read()

    # ---- TLS

    cdef int start_tls(self, object context) except -1:
        """A connection accepted on a tls_listen socket: its handshake runs in
        the loop, a step per readiness, within client_timeout."""
        sock = socket.socket(fileno=self.fd)
        sock.settimeout(0.0)
        try:
            self.tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            # The client is gone already (reset before its handshake).  Python's
            # ssl may have closed the descriptor itself: then it is not closed twice.
            if sock.fileno() < 0:
                self.fd_closed = True
            else:
                sock.detach()
            return self.handshake_failed(exc)
        # The SSLSocket's own record layer (CPython's _ssl object, whose read
        # and write the SSLSocket's wrap in Python code: a quarter of a TLS
        # request's instructions on the hello benchmark); the SSLSocket's
        # methods of the same names where a Python lacks it.
        self.tls_io = getattr(self.tls, "_sslobj", None) or self.tls
        self.state = HANDSHAKING
        return self.handshake()

    cdef int handshake(self) except -1:
        cdef WSGIWorker worker = self.worker
        try:
            self.tls.do_handshake()
        except SSLWantReadError:
            return self.handshake_waits(False)
        except SSLWantWriteError:
            return self.handshake_waits(True)
        except OSError as exc:         # (SSLError, a reset, an EOF)
            return self.handshake_failed(exc)
        self.state = OPEN
        self.handshake_waits(False)
        self.base_environ.update(tls_keys(self.tls))
        if worker.kernel_tls and not self.tls.pending() and tls_offloaded(self.fd):
            # The kernel encrypts both ways: a plain socket from here on
            # (sendfile, and routes hand the descriptor itself over).
            self.tls.detach()
            self.tls = self.tls_io = None
        self.deadline = deadline_after(monotonic(), worker.client_timeout)
        return self.read()   # (the request may have come with the handshake's end)

    cdef int handshake_waits(self, bint writing) except -1:
        if writing != self.want_write:
            self.want_write = writing
            self.worker.watch(self.fd, EPOLLOUT if writing else EPOLLIN)
        return 0

    cdef int handshake_failed(self, object exc) except -1:
        """A handshake that cannot finish ends this connection only (debug
        level: scanners and impatient clients do this all day).  A plain HTTP
        request on a TLS port gets nginx's answer, in plain text."""
        error_log.debug("TLS handshake with %s failed: %s",
                        self.remote_addr or "a unix socket client", exc)
        if getattr(exc, "reason", None) != "HTTP_REQUEST" or self.tls is None:
            return self.close_connection()
        # Answered in plain text, then the lingering close: the rest of the
        # request is unread, and closing over it would reset the answer.
        self.tls.detach()
        self.tls = self.tls_io = None
        self.state = OPEN
        self.handshake_waits(False)
        self.out.write(error_response(400, "The plain HTTP request was sent to HTTPS port"))
        self.worker.count_response(400, 0, SERVED_ERROR)
        self.closing = True
        return self.settle()

    cdef Py_ssize_t read_record(self) except -3:
        """One TLS read into the worker's receive buffer (the connection's
        and its relay's): the bytes decrypted, 0 at the client's EOF, -1 when
        nothing is there now, -2 on a TLS error (logged; the caller closes)."""
        try:
            return self.tls_io.read(RECV_SIZE, self.worker.recv_view)
        except (SSLWantReadError, SSLWantWriteError):
            return -1
        except SSLEOFError:
            return 0         # (an EOF without close_notify: an EOF all the same)
        except OSError as exc:
            error_log.debug("TLS error on the connection of %s: %s",
                            self.remote_addr or "a unix socket client", exc)
            return -2

    cdef int read_tls(self) except -1:
        """read() on a TLS connection: what OpenSSL decrypts, including the
        records it holds already (epoll does not know of them)."""
        cdef WSGIWorker worker = self.worker
        cdef Py_ssize_t received
        cdef bint progress = False
        while True:
            received = self.read_record()
            if received == -1:
                break
            if received == -2:
                return self.close_connection()
            progress = True
            if received == 0:
                self.peer_closed = True
                self.stop_reading = True
                break
            self.last_read = worker.now
            self.feed(worker.recv_buffer, received)
            # One read gives one TLS record (16 KiB at most), and the next
            # records wait in the socket, where epoll sees them; only a full
            # buffer can leave decrypted bytes behind in OpenSSL.
            if received < RECV_SIZE or not self.tls_io.pending():
                break
        return self.advance() if progress else 0

    cdef int close_notify(self) except -1:
        """Tell a TLS client the response is complete (close_notify), so a body
        that ends with the connection cannot be cut short unnoticed."""
        try:
            self.tls.unwrap()
        except (OSError, ValueError):
            pass   # (its own close_notify has not come: it need not)
        return 0

    cdef tuple origin_addresses(self):
        """(peer, server) of this connection, for a relay's origin."""
        environ = self.base_environ
        peer = (environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"])) \
            if environ.get("REMOTE_PORT") else None
        server = (environ["SERVER_NAME"], int(environ["SERVER_PORT"])) \
            if str(environ.get("SERVER_PORT", "0")).isdigit() else None
        return peer, server

    cdef int start_relay(self) except -1:
        """The next request is another group's and this connection is TLS:
        relay it (WorkerBase.relay_off), or answer 503 when the group is full."""
        cdef tuple addresses = self.origin_addresses()
        result = self.worker.relay_off(self, addresses[0], addresses[1])
        if type(result) is bytes:
            self.out.write(result)
            self.closing = True
            return self.settle()
        self.state = RELAYING
        self.deadline = INFINITY      # the serving group's deadlines apply (see Relay)
        self.relay = Relay(self, <int>result)
        return 0

    cdef bint has_ready_request(self):
        """The next request can be answered: its body is all in, no response
        is still being sent, and the connection goes on."""
        return (self.pending and not self.closing and not self.streaming
                and (<Request>self.pending[0]).body_complete)

    cdef int advance(self) except -1:
        """Go as far as possible without waiting for the client: on with a
        streamed response, answer the ready requests in order (or hand them to
        an app thread), then ``settle`` what the connection waits for."""
        cdef WSGIWorker worker = self.worker
        cdef WSGIRequest request
        if self.state == CLOSED:
            return 0
        if self.streaming and self.pump(False):
            return self.wait_writable()
        if worker.threads is not None:
            # Health checks and static files are answered here, never queued
            # behind app threads.
            while self.has_ready_request():
                request = <WSGIRequest>self.pending[0]
                if worker.is_health(request.target):
                    self.answer_health(<WSGIRequest>take_first(self.pending))
                elif worker.static is not None and self.serve_static(request):
                    if self.streaming and self.pump(False):
                        return self.wait_writable()
                else:
                    return worker.threads.submit(self)
            return self.settle()
        # Pipelined requests are answered into one buffer, sent at once --
        # unless the client is not reading it.
        while self.has_ready_request() and self.out.size <= HIGH_WATER:
            request = <WSGIRequest>take_first(self.pending)
            if worker.is_health(request.target):
                self.answer_health(request)
            elif worker.static is None or not self.serve_static(request):
                self.run_app(request)
            if self.streaming and self.pump(False):
                return self.wait_writable()
        return self.settle()

    cdef int serve_in_thread(self) except -1:
        """An app thread's turn: the ready requests, in order, waiting on the
        socket as needed (the connection is this thread's alone)."""
        cdef WSGIRequest request
        while self.has_ready_request():
            request = <WSGIRequest>take_first(self.pending)
            if self.worker.is_health(request.target):
                self.answer_health(request)
            elif not self.serve_static(request):
                self.run_app(request)
            if self.streaming:
                self.pump(True)
        return 0

    cdef int settle(self) except -1:
        """Nothing more can be answered now: answer a protocol error, decide
        about closing, send, then wait for what comes next (EPOLLOUT while
        output is queued; else the client's next bytes, by set_deadline),
        hand the connection over, or close it."""
        cdef WSGIWorker worker = self.worker
        cdef bytes refusal
        if self.state == CLOSED:
            return 0
        if (self.pending and not self.has_ready_request() and not self.streaming
                and not self.closing and self.peer_closed):
            self.pending.clear()     # a body the client will never finish
        if not self.closing and not self.pending and not self.streaming:
            if self.error_status:
                self.out.write(error_response(self.error_status, self.error_reason or ""))
                worker.count_response(self.error_status, 0, SERVED_ERROR)
                self.closing = True
            elif self.peer_closed:
                self.closing = True
            elif not worker.alive and self.at_message_boundary() and self.handoff_group < 0:
                self.closing = True  # (a request for another group is still handed over)
        if self.pending and not self.closing:
            self.send_continue()
        if self.out.size:
            try:
                self.send_out()
            except OSError:
                return self.close_connection()
            if self.out.size:
                return self.wait_writable()
        if self.want_write:
            self.want_write = False
            worker.watch(self.fd, EPOLLIN)
            if self.has_ready_request():
                return self.advance()     # pipelined requests waited for the output
        if self.handoff_group >= 0 and not self.closing and not self.pending:
            if self.tls is not None:
                return self.start_relay()
            refusal = worker.hand_off(self, self.fd)
            if refusal is None:
                return self.close_connection()       # our copy: the other group's worker has it
            self.out.write(refusal)
            self.closing = True
            return self.settle()
        if self.closing:
            return self.start_close()
        return self.set_deadline()

    cdef int wait_writable(self) except -1:
        """The client must read before the connection goes on: wait for
        EPOLLOUT (reading nothing meanwhile), within the send deadline."""
        self.deadline = deadline_after(monotonic(), self.worker.client_timeout)
        if not self.want_write:
            self.want_write = True
            self.worker.watch(self.fd, EPOLLOUT)
        return 0

    cdef int set_deadline(self) except -1:
        """The deadline of a connection waiting for its client's bytes, the
        same rule as the ASGI worker's: a request's head must be in within
        client_timeout of its first byte; its body must keep arriving (each
        read restarts client_timeout); between requests a connection is kept
        keep_alive seconds.  (A new connection gets client_timeout for its
        first byte, in WSGIWorker.add_connection; the send and linger
        deadlines are set in wait_writable and start_close.)"""
        cdef WSGIWorker worker = self.worker
        cdef Request current = self.current
        if current is not None:
            if current.head_complete:
                self.deadline = deadline_after(self.last_read, worker.client_timeout)
            else:
                self.deadline = deadline_after(current.started, worker.client_timeout)
        elif self.pending:
            self.deadline = deadline_after(monotonic(), worker.client_timeout)
        elif self.last_read:
            self.deadline = monotonic() + worker.keep_alive
        return 0

    cdef int start_close(self) except -1:
        """Close after a response.  If the client may still be sending (an unread
        body, a rejected request), shut our side and drain theirs for a moment
        first: closing with unread input would reset the connection and could
        destroy the response before the client reads it (RFC 9112 9.6) --
        also bytes sent after a request that closes, which are never read."""
        if self.tls is not None:
            self.close_notify()
        if self.peer_closed or (self.at_message_boundary() and not self.error_status
                                and not self.pending and not input_waiting(self.fd)):
            return self.close_connection()
        shutdown(self.fd, SHUT_WR)
        self.state = LINGERING
        self.deadline = monotonic() + LINGER_SECONDS
        return 0

    cdef int linger_read(self) except -1:
        cdef char *buffer = self.worker.recv_buffer
        cdef ssize_t received
        for _ in range(LINGER_READS):
            received = recv(self.fd, buffer, RECV_SIZE, 0)
            if received > 0:
                continue
            if received < 0 and (errno == EAGAIN or errno == EINTR):
                return 0
            break
        else:
            return 0
        return self.close_connection()

    cdef int fail_hard(self) noexcept:
        """An unexpected error while serving this connection (a bug): one log
        line with the traceback, and the connection closed, never the worker."""
        try:
            error_log.exception("Unexpected error on the connection of %s; closing it",
                                self.remote_addr)
            self.close_connection()
        except BaseException:
            pass
        return 0

    cdef int close_connection(self) except -1:
        if self.state == CLOSED:
            return 0
        self.state = CLOSED
        if self.request is not None and not self.busy:
            self.abort_response()     # a response still being sent: close the app's iterable
        self.worker.forget(self.fd)
        if self.arrived:
            self.arrived = self.worker.stop_waiting(self.arrived)
        if self.relay is not None:
            self.relay.close_inner()
            self.relay = None
        if self.tls is not None:
            self.tls.detach()         # (the descriptor is closed here, once)
            self.tls = self.tls_io = None
        if not self.fd_closed:
            close(self.fd)
        self.pending.clear()
        self.out.clear()
        # Drop the connection's self-references (its bound methods) so it is
        # freed at once, without the cyclic GC.
        self.start_response_method = None
        self.write_method = None
        return 0

    cdef int expire(self) except -1:
        """The deadline passed (see set_deadline)."""
        if self.state == LINGERING or self.state == RELAYING or self.state == PROXYING:
            return self.close_connection()
        if self.state == HANDSHAKING:
            error_log.debug("TLS handshake with %s not done in %g s; closing",
                            self.remote_addr or "a unix socket client", self.worker.client_timeout)
            return self.close_connection()
        if self.want_write or self.streaming:
            error_log.info("closing the connection of %s: the client took no response bytes "
                           "for %g s", self.remote_addr or "a unix socket client",
                           self.worker.client_timeout)
            return self.close_connection()
        if self.pending or not self.at_message_boundary():
            # A request started but did not arrive in time: 408, then a
            # lingering close (the client may still be sending).
            self.pending.clear()
            self.fail(408, "request not received in time")
            self.parse_failed()
            return self.settle()
        if input_waiting(self.fd):
            # Bytes arrived while this worker was busy (the app ran longer
            # than the deadline): they are the client's next request, not a
            # timeout.  Give the loop a turn to read them.
            self.deadline = monotonic() + READ_GRACE_SECONDS
            return 0
        return self.close_connection()


# ---------------------------------------------------------------- TLS relays

@cython.final
cdef class Relay:
    """A TLS connection whose requests another group serves (routes without
    kernel TLS): that group's worker has the other end of a socket pair
    (``fd``), and this worker carries plaintext both ways in its loop --
    decrypted from the client into the pair, and from the pair encrypted to
    the client.  Each way holds at most one read that its writer has not
    taken (``to_inner``, ``to_client``); while it waits, that way reads
    nothing more, so a slow reader slows its writer instead of filling this
    worker's memory.  The serving group's deadlines govern the exchange (its
    worker closes its end when the client idles); once that end is closed,
    what is left goes to the client within client_timeout, then the
    connection closes.  Either side's end or error ends both."""
    cdef WSGIConnection conn
    cdef int fd
    cdef bytes to_inner
    cdef bytes to_client
    cdef bint client_eof
    cdef bint inner_eof
    cdef unsigned int client_events   # what epoll watches on each side now
    cdef unsigned int inner_events

    def __init__(self, WSGIConnection conn, int fd):
        cdef WSGIWorker worker = conn.worker
        self.conn = conn
        self.fd = fd
        self.client_events = EPOLLIN
        worker.register(fd, self)
        if worker.ctl(EPOLL_CTL_ADD, fd, EPOLLIN) < 0:
            worker.table[fd] = None
            close(fd)
            self.fd = -1
            conn.close_connection()
            return
        self.inner_events = EPOLLIN

    cdef int client_event(self, unsigned int flags) except -1:
        if self.to_client is not None and flags & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            self.flush_client()
        if self.conn.state == RELAYING and self.to_inner is None and not self.client_eof:
            self.from_client()
        return self.update()

    cdef int inner_event(self, unsigned int flags) except -1:
        if self.to_inner is not None and flags & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            self.flush_inner()
        if self.conn.state == RELAYING and self.to_client is None and not self.inner_eof:
            self.from_inner()
        return self.update()

    cdef int from_client(self) except -1:
        cdef WSGIWorker worker = self.conn.worker
        cdef Py_ssize_t received
        while self.to_inner is None:
            received = self.conn.read_record()
            if received == -1:
                return 0
            if received == -2:
                return self.end()
            if received == 0:
                self.client_eof = True
                shutdown(self.fd, SHUT_WR)
                return 0
            self.to_inner = worker.recv_view[:received].tobytes()
            self.flush_inner()
            if received < RECV_SIZE or not self.conn.tls_io.pending():    # (see read_tls)
                return 0
        return 0

    cdef int flush_inner(self) except -1:
        cdef ssize_t sent = send(self.fd, PyBytes_AS_STRING(self.to_inner),
                                 PyBytes_GET_SIZE(self.to_inner), MSG_NOSIGNAL)
        if sent < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            return self.end()
        self.to_inner = self.to_inner[sent:] if sent < PyBytes_GET_SIZE(self.to_inner) else None
        return 0

    cdef int from_inner(self) except -1:
        cdef WSGIWorker worker = self.conn.worker
        cdef ssize_t received = recv(self.fd, worker.recv_buffer, RECV_SIZE, 0)
        if received > 0:
            self.to_client = worker.recv_view[:received].tobytes()
            return self.flush_client()
        if received == 0:
            self.inner_eof = True
            if self.to_client is None:
                return self.end()
            self.conn.deadline = deadline_after(monotonic(), worker.client_timeout)
        elif errno != EAGAIN and errno != EINTR:
            return self.end()
        return 0

    cdef int flush_client(self) except -1:
        cdef Py_ssize_t sent
        try:
            sent = self.conn.tls_io.write(self.to_client)
        except (SSLWantWriteError, SSLWantReadError):
            return 0
        except OSError:
            return self.end()
        self.to_client = (self.to_client[sent:] if sent < PyBytes_GET_SIZE(self.to_client)
                          else None)
        if self.to_client is None and self.inner_eof:
            return self.end()
        return 0

    cdef int update(self) except -1:
        """Watch, on each side, what its way needs now."""
        cdef WSGIWorker worker = self.conn.worker
        cdef unsigned int wanted
        if self.conn.state != RELAYING:
            return 0
        wanted = (EPOLLOUT if self.to_client is not None else 0) | (
            EPOLLIN if self.to_inner is None and not self.client_eof else 0)
        if wanted != self.client_events:
            self.client_events = wanted
            worker.ctl(EPOLL_CTL_MOD, self.conn.fd, wanted)
        wanted = (EPOLLOUT if self.to_inner is not None else 0) | (
            EPOLLIN if self.to_client is None and not self.inner_eof else 0)
        if wanted != self.inner_events:
            self.inner_events = wanted
            worker.ctl(EPOLL_CTL_MOD, self.fd, wanted)
        return 0

    cdef int end(self) except -1:
        if self.conn.state == RELAYING:
            self.conn.close_notify()
            self.conn.close_connection()     # (which calls close_inner)
        return 0

    cdef int close_inner(self) except -1:
        """Close this worker's end of the pair (the connection is closing)."""
        cdef WSGIWorker worker = self.conn.worker
        if self.fd >= 0:
            worker.ctl(EPOLL_CTL_DEL, self.fd, 0)
            worker.table[self.fd] = None
            close(self.fd)
            self.fd = -1
        return 0


# ---------------------------------------------------------------- app threads

@cython.final
cdef class AppThreads:
    """The gthread model (``threads`` > 1): connections with ready requests
    are served by a pool of threads, the loop keeps accepting, reading and
    writing.  A connection taken out of epoll belongs to one thread until it
    comes back through the wake-up pipe (``take_back``)."""

    cdef WSGIWorker worker
    cdef readonly int size
    cdef int busy
    cdef object tasks
    cdef list finished
    cdef object finished_lock
    cdef readonly int wake_read
    cdef int wake_write
    cdef list pool

    def __cinit__(self):
        self.wake_read = self.wake_write = -1

    def __dealloc__(self):
        if self.wake_read >= 0:
            close(self.wake_read)
            close(self.wake_write)

    def __init__(self, WSGIWorker worker, int size):
        self.worker = worker
        self.size = size
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.tasks = queue.SimpleQueue()
        self.finished = []
        self.finished_lock = threading.Lock()
        self.pool = []
        for index in range(size):
            thread = threading.Thread(target=self.thread_main, name=f"fastpool-app-{index}",
                                      daemon=True)
            thread.start()
            self.pool.append(thread)

    cdef bint has_free_thread(self):
        return self.busy < self.size

    cdef int submit(self, WSGIConnection conn) except -1:
        """Hand ``conn`` to an app thread; the loop forgets it until take_back.
        What is already answered goes out first."""
        try:
            conn.send_out()
        except OSError:
            pass   # the thread's own writes will find the peer gone
        conn.busy = True
        conn.want_write = False
        self.worker.unwatch(conn.fd)
        self.tasks.put(conn)
        self.busy += 1
        if not self.has_free_thread():
            self.worker.watch_handoffs(False)   # no free thread: let other workers take them
        return 0

    def thread_main(self):
        """An app thread: serve the ready requests of each connection handed over."""
        cdef WSGIConnection conn
        while True:
            conn = self.tasks.get()
            if conn is None:
                return
            try:
                conn.serve_in_thread()
            except BaseException:
                error_log.exception("app thread failed while serving a connection")
                conn.closing = True
            with self.finished_lock:
                self.finished.append(conn)
            try:
                os.write(self.wake_write, b"x")
            except BlockingIOError:
                pass   # the pipe is full: the loop is already due to wake

    cdef int take_back(self) except -1:
        """Connections the app threads are done with return to the loop."""
        cdef WSGIConnection conn
        cdef list done
        try:
            while os.read(self.wake_read, WAKE_PIPE_READ):
                pass
        except BlockingIOError:
            pass
        with self.finished_lock:
            done = self.finished
            self.finished = []
        self.busy -= len(done)
        if self.worker.alive and self.has_free_thread():
            self.worker.watch_handoffs(True)
        for conn in done:
            conn.busy = False
            if conn.state == CLOSED:
                continue
            self.worker.rewatch(conn.fd)
            conn.advance()
        return 0

    cdef int stop(self) except -1:
        for _ in self.pool:
            self.tasks.put(None)
        return 0


# ---------------------------------------------------------------- worker

@cython.final
cdef class WSGIWorker(WorkerBase):
    """The epoll loop of one WSGI worker process (the WorkerBase does the rest)."""

    cdef int epfd
    cdef list listeners
    cdef list table              # fd -> Listener | WSGIConnection | Relay | WakePipe |
    #                              HandoffQueue | None
    cdef readonly int connections
    cdef bint quitting
    cdef char *recv_buffer
    cdef object recv_view         # recv_buffer as a writable memoryview (TLS reads into it)
    cdef readonly bint kernel_tls  # some listener's context may move TLS into the kernel
    cdef double now               # monotonic time of this wakeup of the loop
    cdef double next_sweep
    cdef bint accept_paused
    cdef int handoff_fd
    cdef bint handoff_registered
    cdef dict handoff_environ
    cdef readonly AppThreads threads   # None unless the group has threads > 1

    def __cinit__(self):
        self.epfd = -1
        self.handoff_fd = -1
        self.recv_buffer = <char *>malloc(RECV_SIZE)
        if self.recv_buffer == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.recv_buffer)
        if self.epfd >= 0:
            close(self.epfd)

    def __init__(self, app, listeners, WorkerOptions options not None,
                 dict handoff_environ=None):
        """``listeners``: (fd, is_tcp, base_environ, shared) tuples; the fds stay
        owned by the caller's socket objects.  ``handoff_environ``: the base
        environ of connections other groups hand over (with routes)."""
        WorkerBase.__init__(self, app, options)
        self.table = []
        self.listeners = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.recv_view = PyMemoryView_FromMemory(self.recv_buffer, RECV_SIZE, PyBUF_WRITE)
        for fd, tcp, base_environ, shared, tls in listeners:
            listener = Listener(fd, tcp, shared, base_environ, tls)
            if tls is not None and tls.options & KTLS_OPTION:
                self.kernel_tls = True
            self.listeners.append(listener)
            self.register(fd, listener)
            # A socket shared by all workers wakes one of them, not all (no herd).
            self.add(fd, EPOLLIN | (EPOLLEXCLUSIVE if shared else 0))
        if self.handoff is not None:
            self.handoff_environ = handoff_environ
            self.handoff_fd = self.handoff.receiver_fd()
            self.register(self.handoff_fd, HandoffQueue())
            self.watch_handoffs(True)
        if options.threads > 1:
            self.threads = AppThreads(self, options.threads)
            self.register(self.threads.wake_read, WakePipe())
            self.add(self.threads.wake_read, EPOLLIN)

    # ---- epoll

    cdef int register(self, int fd, object obj) except -1:
        while len(self.table) <= fd:
            self.table.extend([None] * (fd + ACCEPT_BATCH - len(self.table)))
        self.table[fd] = obj
        return 0

    cdef int ctl(self, int op, int fd, unsigned int events) except -2:
        """epoll_ctl(2) for ``fd``; its result (-1 on failure, errno set)."""
        cdef epoll_event event
        memset(&event, 0, sizeof(event))
        event.events = events
        event.data.fd = fd
        return epoll_ctl(self.epfd, op, fd, &event)

    cdef int add(self, int fd, unsigned int events) except -1:
        if self.ctl(EPOLL_CTL_ADD, fd, events) < 0:
            raise OSError(errno, "epoll_ctl failed")
        return 0

    cdef int watch(self, int fd, unsigned int events) except -1:
        """What a registered connection waits for now (EPOLLIN or EPOLLOUT)."""
        self.ctl(EPOLL_CTL_MOD, fd, events)
        return 0

    cdef int unwatch(self, int fd) except -1:
        """Out of epoll for a while (its app thread has it)."""
        self.ctl(EPOLL_CTL_DEL, fd, 0)
        return 0

    cdef int rewatch(self, int fd) except -1:
        """Back in epoll (from its app thread)."""
        self.ctl(EPOLL_CTL_ADD, fd, EPOLLIN)
        return 0

    cdef int forget(self, int fd) except -1:
        """A connection is closed (the caller closes the descriptor)."""
        self.ctl(EPOLL_CTL_DEL, fd, 0)
        self.table[fd] = None
        self.connections -= 1
        return 0

    # ---- connections in

    cdef int accept(self, Listener listener) except -1:
        cdef sockaddr_storage address
        cdef int fd
        cdef WSGIConnection conn
        cdef str remote
        cdef dict base
        for _ in range(ACCEPT_BATCH):
            fd = self.accept_next(listener, &address)
            if fd < 0:
                return 0
            base = listener.base.copy()
            if listener.tcp:
                remote = peer_address(&address, base)
            else:
                remote = ""
                base["REMOTE_ADDR"] = ""
            conn = WSGIConnection(self, fd, base, remote)
            if self.admission:
                conn.arrived = self.arrival(listener, fd)
            conn.trusted_proxy = self.options.trust_all_proxies or (
                listener.tcp and remote in self.options.trusted_proxies)
            if self.router is not None:
                conn.router = self.router
                conn.home_group = self.local_group
            if not self.add_connection(conn):
                continue
            if self.proxy_protocol:
                # (admission control sheds it when its first request is in)
                try:
                    conn.expect_proxy(listener.tls)
                except Exception:
                    conn.fail_hard()
            elif listener.tls is not None:
                try:
                    conn.start_tls(listener.tls)
                except Exception:
                    conn.fail_hard()
            elif conn.arrived == -INFINITY:
                # Admission control: too many wait already.  The 503 goes out
                # now, not after the requests ahead of it (its own request
                # is drained by the lingering close).
                conn.arrived = 0
                conn.out.write(self.shed())
                self.count_response(503, 0, SERVED_SHED)
                conn.closing = True
                conn.settle()
        return 0

    cdef bint add_connection(self, WSGIConnection conn) except -1:
        """Watch a new connection (accepted, or handed over); False if epoll
        refused it (it is closed)."""
        conn.deadline = deadline_after(monotonic(), self.client_timeout)
        self.register(conn.fd, conn)
        if self.ctl(EPOLL_CTL_ADD, conn.fd, EPOLLIN) < 0:
            self.table[conn.fd] = None
            close(conn.fd)
            return False
        self.connections += 1
        return True

    cdef int pause_accepting(self) except -1:
        cdef Listener listener
        if self.accept_paused:
            return 0
        self.accept_paused = True
        for listener in self.listeners:
            self.ctl(EPOLL_CTL_DEL, listener.fd, 0)
        return 0

    cdef int resume_accepting(self) except -1:
        cdef Listener listener
        if not self.accept_paused:
            return 0
        self.accept_paused = False
        for listener in self.listeners:
            self.add(listener.fd, EPOLLIN | (EPOLLEXCLUSIVE if listener.shared else 0))
        return 0

    # ---- routes: the group's queue

    cdef int watch_handoffs(self, bint on) except -1:
        """Take handoffs only while this worker can serve them at once."""
        if on == self.handoff_registered or self.handoff_fd < 0:
            return 0
        self.handoff_registered = on
        if on:
            # Wakes one waiting worker of the group per handoff, not all.
            self.add(self.handoff_fd, EPOLLIN | EPOLLEXCLUSIVE)
        else:
            self.ctl(EPOLL_CTL_DEL, self.handoff_fd, 0)
        return 0

    cdef int adopt_handoff(self) except -1:
        """One connection from this group's queue: its bytes are parsed as if
        this worker had read them."""
        cdef WSGIConnection conn
        cdef dict base
        cdef str remote = ""
        cdef Handover handover = self.take_handoff()
        if handover is None or handover.fd < 0:
            return 0
        base = self.handoff_environ.copy()
        if handover.server is not None:
            base["SERVER_NAME"], base["SERVER_PORT"] = handover.server[0], str(handover.server[1])
        if handover.peer is not None:
            remote = handover.peer[0]
            base["REMOTE_ADDR"], base["REMOTE_PORT"] = remote, str(handover.peer[1])
        if handover.scheme == "https":
            base["wsgi.url_scheme"] = "https"
            base["HTTPS"] = "on"
        conn = WSGIConnection(self, handover.fd, base, remote)
        conn.router = self.router
        conn.home_group = handover.home
        conn.handoff_origin = handover.origin
        conn.handoff_addresses = handover.addresses
        # Its bytes count as read now: a body that goes on arriving is timed
        # from here (set_deadline), not from a read this worker never made.
        conn.last_read = self.now or monotonic()
        conn.trusted_proxy = self.options.trust_all_proxies or (
            handover.tcp and handover.via in self.options.trusted_proxies)
        if not self.add_connection(conn):
            return 0
        conn.feed(handover.data, PyBytes_GET_SIZE(handover.data))
        return conn.advance()

    # ---- stopping (WorkerBase.stop, from the signal handlers in worker.py)

    cdef int stop_accepting(self) except -1:
        self.close_listeners()
        self.watch_handoffs(False)   # queued handoffs are for the workers that stay
        self.next_sweep = 0          # close idle keep-alive connections on the next wakeup
        return 0

    cdef int quit(self) except -1:
        self.quitting = True
        return 0

    cdef int close_listeners(self) except -1:
        cdef Listener listener
        for listener in self.listeners:
            self.ctl(EPOLL_CTL_DEL, listener.fd, 0)
            self.table[listener.fd] = None
        del self.listeners[:]
        return 0

    # ---- the loop

    def run(self):
        cdef epoll_event events[MAX_EVENTS]
        cdef int ready, i, fd
        cdef object entry
        cdef double now
        refresh_date()
        self.set_state(SERVING)
        while not self.quitting:
            if not self.alive and self.connections == 0:
                break
            with nogil:
                ready = epoll_wait(self.epfd, events, MAX_EVENTS, <int>(SWEEP_SECONDS * 1000))
            if ready < 0:
                if errno != EINTR:
                    raise OSError(errno, "epoll_wait failed")
                PyErr_CheckSignals()
                ready = 0
            self.now = monotonic()
            refresh_date()
            if self.handoff_registered:
                # Handoffs first: a connection waiting in the group's queue
                # must not wait behind every request of the connections this
                # worker already holds.
                for i in range(ready):
                    if events[i].data.fd == self.handoff_fd:
                        self.adopt_handoff()
                        events[i].data.fd = -1
                        break
            for i in range(ready):
                fd = events[i].data.fd
                if fd < 0:
                    continue
                entry = self.table[fd]
                if entry is None:
                    continue
                if type(entry) is WSGIConnection:
                    try:
                        (<WSGIConnection>entry).on_event(events[i].events)
                    except Exception:
                        # A bug for one connection must not end the others.
                        (<WSGIConnection>entry).fail_hard()
                elif type(entry) is Listener:
                    self.accept(<Listener>entry)
                elif type(entry) is Relay:
                    try:
                        (<Relay>entry).inner_event(events[i].events)
                    except Exception:
                        (<Relay>entry).conn.fail_hard()
                elif type(entry) is WakePipe:
                    self.threads.take_back()
                elif type(entry) is HandoffQueue:
                    self.adopt_handoff()
            PyErr_CheckSignals()
            self.retirement_due()
            now = self.now          # (the wakeup's time: the sweep is a second coarse anyway)
            if now >= self.next_sweep:
                self.sweep(now)
                self.next_sweep = now + SWEEP_SECONDS
        self.close_listeners()
        for entry in self.table:
            if type(entry) is WSGIConnection and not (<WSGIConnection>entry).busy:
                (<WSGIConnection>entry).close_connection()
        if self.threads is not None:
            self.threads.stop()

    cdef int sweep(self, double now) except -1:
        """Once a second: deadlines, a vanished master, the end of a drain."""
        cdef object entry
        cdef WSGIConnection conn
        if self.master_gone():
            self.begin_stop(True)
        if not self.alive and now >= self.graceful_deadline:
            self.quitting = True
            return 0
        if self.accept_paused:
            self.resume_accepting()
        self.count_connections(self.connections)
        for entry in self.table:
            if type(entry) is not WSGIConnection:
                continue
            conn = <WSGIConnection>entry
            if conn.busy:
                continue
            if not self.alive and self.close_idle and (conn.state == HANDSHAKING
                                                       or conn.state == PROXYING):
                conn.close_connection()      # (no request yet: nothing to finish)
            elif (not self.alive and self.close_idle and conn.state == OPEN
                    and not conn.want_write and not conn.streaming and not conn.pending
                    and conn.at_message_boundary()):
                # Idle keep-alive during a shutdown -- unless its next request is
                # already waiting: that one is answered (with Connection: close).
                if not input_waiting(conn.fd):
                    conn.close_connection()
            elif now >= conn.deadline:
                conn.expire()
        return 0


cdef str peer_address(sockaddr_storage *address, dict environ):
    """Fill REMOTE_ADDR and REMOTE_PORT from an accepted peer address."""
    cdef tuple peer = peer_of(address)
    if peer is None:
        environ["REMOTE_ADDR"] = ""
        return ""
    environ["REMOTE_ADDR"] = peer[0]
    environ["REMOTE_PORT"] = str(peer[1])
    return <str>peer[0]

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
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.math cimport INFINITY
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.types cimport off_t

from fastpool._posix cimport (
    epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLLIN, EPOLLOUT, EPOLLERR,
    EPOLLHUP, EPOLLEXCLUSIVE, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC,
    sockaddr, sockaddr_storage, sockaddr_in, sockaddr_in6, socklen_t, accept4, recv,
    shutdown, setsockopt, SOCK_NONBLOCK, SOCK_CLOEXEC, SHUT_WR, AF_INET, AF_INET6, MSG_PEEK,
    MSG_DONTWAIT,
    IPPROTO_TCP, TCP_NODELAY, inet_ntop, ntohs, INET6_ADDRSTRLEN, sendfile, poll, pollfd,
    POLLIN, POLLOUT, close, getppid, errno, EAGAIN, EINTR, ECONNABORTED,
    EPROTO, EMFILE, ENFILE, ENOBUFS, ENOMEM,
)
from fastpool._http cimport (
    peer_of, Limits, Request, HttpConnection, OutBuffer, refresh_date, status_line, error_response,
    monotonic, Framing, framing_reset, queue_head, frame_body, end_body,
    split_request_target, forwarded_client, forwarded_scheme, is_health_target,
    BOARD_REQUESTS, BOARD_BUSY_SINCE, BOARD_STATE, BOARD_SIZE, BOARD_HANDED_IN,
    BOARD_HANDED_OUT, BOARD_SHED, Router,
)

import contextvars
import logging
import os
import queue
import stat
import threading

from fastpool.handoff import addresses as handoff_addresses

cdef object error_log = logging.getLogger("fastpool.error")


cdef enum:
    # One read takes up to this much; a large body arrives in few reads.
    RECV_SIZE = 262144
    MAX_EVENTS = 256
    ACCEPT_BATCH = 64
    # Request body bytes held in memory; past this the body is spooled to a file.
    BODY_MEMORY_LIMIT = 1048576
    # Response bytes queued for a client that does not read, past which a
    # streamed response waits for the socket (and write() blocks).
    HIGH_WATER = 262144
    # sendfile(2) takes at most this much per call, so one large file does
    # not keep the loop from its other connections.
    SENDFILE_CHUNK = 1048576
    # The lingering close: drain the client's input for at most this many
    # seconds and reads per wakeup before closing.
    LINGER_SECONDS = 2
    LINGER_READS = 16

# An app's ``next()`` returns this at the end of the iterable (see pump).
cdef object END = object()
cdef object copy_context = contextvars.copy_context


cdef inline double deadline_after(double start, double seconds) noexcept:
    """``start + seconds``; a limit of 0 means none."""
    return start + seconds if seconds > 0 else INFINITY


class ClientDisconnected(OSError):
    """The client went away, or stopped reading for too long."""


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
    if len(HEADER_KEYS) < 2048:
        HEADER_KEYS[name] = key
    return key


# request-target -> (PATH_INFO, QUERY_STRING, RAW_URI) before root_path is applied
cdef dict TARGETS = {}


cdef tuple split_target(bytes target):
    cdef tuple cached = TARGETS.get(target)
    cdef tuple parts
    if cached is not None:
        return cached
    parts = split_request_target(target)
    cached = ((<bytes>parts[0]).decode("latin-1"), (<bytes>parts[2]).decode("latin-1"),
              target.decode("latin-1"))
    if len(TARGETS) >= 1024:
        TARGETS.clear()
    TARGETS[target] = cached
    return cached


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


# ---------------------------------------------------------------- listeners

@cython.final
cdef class Listener:
    """One listening socket this worker accepts from."""

    cdef readonly int fd
    cdef readonly bint tcp
    cdef readonly dict base_environ

    def __init__(self, int fd, bint tcp, dict base_environ):
        self.fd = fd
        self.tcp = tcp
        self.base_environ = base_environ


# ---------------------------------------------------------------- connection

cdef class WakePipe:
    """The table entry of the pipe app threads use to wake the loop."""


cdef class HandoffQueue:
    """The table entry of the group's handoff queue (routes)."""


cdef enum ConnState:
    OPEN = 0        # reading requests / idle between them
    LINGERING = 1   # response sent, write side shut, discarding input until EOF
    CLOSED = 2


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
        cdef tuple parts = split_target(request.target)
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
        """A trusted proxy's X-Forwarded-For / X-Forwarded-Proto (gunicorn's and
        uvicorn's forwarded_allow_ips): the client is the nearest address in
        the chain that is not itself a trusted proxy."""
        cdef WSGIWorker worker = self.worker
        cdef str client = forwarded_client(environ.get("HTTP_X_FORWARDED_FOR"),
                                           worker.trusted_proxies, worker.trust_all_proxies)
        cdef str scheme = forwarded_scheme(environ.get("HTTP_X_FORWARDED_PROTO"))
        if client is not None:
            environ["REMOTE_ADDR"] = client
            environ["REMOTE_PORT"] = "0"
        if scheme is not None:
            environ["wsgi.url_scheme"] = scheme
        return 0

    cdef int answer_health(self, WSGIRequest request) except -1:
        """The group's health_path, answered without the app: 200 while the
        worker serves, 503 once its graceful stop has begun."""
        cdef bytes body
        self.reset_response(request)
        if self.worker.alive:
            self.status, body = "200 OK", b"OK\n"
        else:
            self.status, body = "503 Service Unavailable", b"stopping\n"
        self.headers = [("Content-Type", "text/plain")]
        self.write_head(len(body))
        self.write_body(body)
        self.finish_body()
        return self.finish_response(request)

    cdef int finish_response(self, WSGIRequest request) except -1:
        """After a response is queued: its access-log line, and the close decision."""
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
                self.out.send_to(self.fd)
            except OSError as exc:
                raise ClientDisconnected(*exc.args) from None
        return 0

    cdef int wait_socket(self, short events) except -1:
        """Wait (GIL released) until the socket is ready, at most the
        connection's send timeout (an app thread, or write())."""
        cdef pollfd pfd
        cdef double limit = self.worker.header_timeout
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
        cdef WSGIWorker worker = self.worker
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
                self.finish_body()
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
        return True

    cdef bint send_file_part(self) except -1:
        """sendfile the next part of a file response (the head is out); True
        when the socket is full.  At the end, or when the file has shrunk
        (finish_body then sees the short length and closes), the response ends."""
        cdef ssize_t sent
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
        close = getattr(result, "close", None)
        if close is None:
            return 0
        try:
            if context is not None:
                context.run(close)
            else:
                close()
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


# ---------------------------------------------------------------- worker

@cython.final
cdef class WSGIWorker:
    """The event loop of one worker process."""

    cdef readonly object app
    cdef Limits limits
    cdef int epfd
    cdef list listeners
    cdef list table              # fd -> Listener | WSGIConnection | None
    cdef readonly int connections
    cdef readonly bint alive
    cdef bint quitting
    cdef readonly long long requests
    cdef readonly double keep_alive
    cdef readonly double header_timeout
    cdef double graceful_timeout
    cdef double graceful_deadline
    cdef readonly str root_path
    cdef object access_log
    cdef int master_pid
    cdef char *recv_buffer
    cdef double now               # monotonic time of this wakeup of the loop
    cdef double next_sweep
    cdef bint accept_paused
    cdef bint close_idle          # on a graceful stop: close idle keep-alive at once
    cdef readonly long long max_requests
    # The scoreboard record: see BOARD_* below.
    cdef double[::1] board
    cdef object board_owner
    cdef list running             # start times of the requests being served
    cdef bytes health_target      # health_path as bytes, or None
    cdef bint trust_all_proxies
    cdef frozenset trusted_proxies
    # Routes (None without): the router, this group's index, the queues.
    cdef Router router
    cdef int local_group
    cdef object handoff
    cdef int handoff_fd
    cdef bint handoff_registered
    cdef dict handoff_environ
    # Thread pool (threads > 1)
    cdef readonly int threads
    cdef object tasks
    cdef int busy_threads
    cdef list finished
    cdef object finished_lock
    cdef int wake_read
    cdef int wake_write
    cdef list pool

    def __cinit__(self):
        self.epfd = -1
        self.wake_read = self.wake_write = -1
        self.recv_buffer = <char *>malloc(RECV_SIZE)
        if self.recv_buffer == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.recv_buffer)
        if self.epfd >= 0:
            close(self.epfd)
        if self.wake_read >= 0:
            close(self.wake_read)
            close(self.wake_write)

    def __init__(self, app, listeners, *, Limits limits not None, double keep_alive=5.0,
                 double header_timeout=30.0, double graceful_timeout=30.0,
                 str root_path="", access_log=None, int master_pid=0, int threads=1,
                 long long max_requests=0, scoreboard=None, str health_path=None,
                 forwarded_allow_ips=(), routing=None, dict handoff_environ=None):
        """``listeners``: (fd, is_tcp, base_environ, shared) tuples; the fds stay
        owned by the caller's socket objects until ``stop`` closes them.
        ``scoreboard``: a writable buffer of BOARD_SIZE doubles, or None.
        ``routing``: (Router, fastpool.handoff.Handoff) when the server has
        routes; ``handoff_environ`` is then the base environ of connections
        handed over by other groups."""
        cdef epoll_event event
        self.app = app
        self.threads = threads
        self.health_target = health_path.encode("latin-1") if health_path else None
        self.trust_all_proxies = "*" in forwarded_allow_ips
        self.trusted_proxies = frozenset(forwarded_allow_ips)
        self.max_requests = max_requests
        self.running = []
        self.board_owner = scoreboard if scoreboard is not None else bytearray(8 * BOARD_SIZE)
        self.board = memoryview(self.board_owner).cast("B").cast("d")
        self.limits = limits
        self.keep_alive = keep_alive
        self.header_timeout = header_timeout
        self.graceful_timeout = graceful_timeout
        self.root_path = root_path.rstrip("/")
        self.access_log = access_log
        self.master_pid = master_pid
        self.alive = True
        self.table = []
        self.listeners = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        for fd, tcp, base_environ, shared in listeners:
            listener = Listener(fd, tcp, base_environ)
            self.listeners.append(listener)
            self.register(fd, listener)
            memset(&event, 0, sizeof(event))
            # A socket shared by all workers wakes one of them, not all (no herd).
            event.events = EPOLLIN | (EPOLLEXCLUSIVE if shared else 0)
            event.data.fd = fd
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &event) < 0:
                raise OSError(errno, "epoll_ctl(listener) failed")
        self.wake_read = self.wake_write = -1
        self.handoff_fd = -1
        if routing is not None:
            self.router, self.handoff = routing
            self.local_group = self.router.local_group
            self.handoff_environ = handoff_environ
            self.handoff_fd = self.handoff.receiver_fd()
            self.register(self.handoff_fd, HandoffQueue())
            self.watch_handoffs(True)
        if threads > 1:
            self.start_pool(threads)

    # ---- the thread pool (threads > 1)

    cdef int start_pool(self, int threads) except -1:
        cdef epoll_event event
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.register(self.wake_read, WakePipe())
        memset(&event, 0, sizeof(event))
        event.events = EPOLLIN
        event.data.fd = self.wake_read
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wake_read, &event) < 0:
            raise OSError(errno, "epoll_ctl(wake pipe) failed")
        self.tasks = queue.SimpleQueue()
        self.finished = []
        self.finished_lock = threading.Lock()
        self.pool = []
        for index in range(threads):
            thread = threading.Thread(target=self.thread_main, name=f"fastpool-app-{index}",
                                      daemon=True)
            thread.start()
            self.pool.append(thread)
        return 0

    def thread_main(self):
        """An app thread: serve the ready requests of each connection handed over."""
        cdef WSGIConnection conn
        while True:
            conn = self.tasks.get()
            if conn is None:
                return
            try:
                self.serve_in_thread(conn)
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
        cdef epoll_event event
        cdef list done
        try:
            while os.read(self.wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        with self.finished_lock:
            done = self.finished
            self.finished = []
        self.busy_threads -= len(done)
        if self.alive and self.busy_threads < self.threads:
            self.watch_handoffs(True)
        for conn in done:
            conn.busy = False
            if conn.state == CLOSED:
                continue
            memset(&event, 0, sizeof(event))
            event.events = EPOLLIN
            event.data.fd = conn.fd
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, conn.fd, &event)
            self.advance(conn)
        return 0

    cdef bint is_health_request(self, Request request):
        return self.health_target is not None and is_health_target(self.health_target,
                                                                   request.target)

    # ---- routes: handing connections over and taking them

    cdef int watch_handoffs(self, bint on) except -1:
        """Take handoffs only while this worker can serve them at once."""
        cdef epoll_event event
        if on == self.handoff_registered or self.handoff_fd < 0:
            return 0
        self.handoff_registered = on
        if on:
            memset(&event, 0, sizeof(event))
            # Wakes one waiting worker of the group per handoff, not all.
            event.events = EPOLLIN | EPOLLEXCLUSIVE
            event.data.fd = self.handoff_fd
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.handoff_fd, &event)
        else:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.handoff_fd, NULL)
        return 0

    cdef int take_handoff(self) except -1:
        """One connection from this group's queue: its bytes are parsed as if
        this worker had read them."""
        cdef WSGIConnection conn
        cdef epoll_event event
        cdef bytes data
        cdef dict base
        entry = self.handoff.receive()
        if entry is None:
            return 0
        fd, home, started, data, refusal = entry
        self.board[BOARD_HANDED_IN] += 1
        os.set_blocking(fd, False)
        if refusal is not None:
            # It waited longer than max_queue_wait.
            self.board[BOARD_SHED] += 1
            try:
                os.write(fd, refusal)
            except OSError:
                pass
            close(fd)
            return 0
        tcp, server, peer = handoff_addresses(fd)
        base = self.handoff_environ.copy()
        if server is not None:
            base["SERVER_NAME"], base["SERVER_PORT"] = server[0], str(server[1])
        remote = ""
        if peer is not None:
            remote = peer[0]
            base["REMOTE_ADDR"], base["REMOTE_PORT"] = remote, str(peer[1])
        conn = WSGIConnection(self, fd, base, remote)
        conn.router = self.router
        conn.home_group = home
        conn.trusted_proxy = self.trust_all_proxies or (tcp and remote in self.trusted_proxies)
        if not self.add_connection(conn):
            return 0
        conn.feed(data, PyBytes_GET_SIZE(data))
        return self.advance(conn)

    cdef int hand_off(self, WSGIConnection conn) except -1:
        """Give ``conn`` to the group its next request belongs to (everything
        before that request has been answered and sent)."""
        refusal = self.handoff.send(conn.handoff_group, conn.fd, conn.home_group,
                                    conn.handoff_started, conn.handoff_data)
        conn.handoff_group = -1
        conn.handoff_data = None
        if refusal is None:
            self.board[BOARD_HANDED_OUT] += 1
            return self.close_connection(conn)   # our copy: the other worker has it
        self.board[BOARD_SHED] += 1
        conn.out.write(refusal)
        conn.closing = True
        return self.settle(conn)

    # ---- the scoreboard

    cdef object app_started(self):
        """App code starts running (the app call, or a step of a streamed
        body); returns the token app_finished takes."""
        cdef object now = monotonic()
        self.running.append(now)
        if len(self.running) == 1:
            self.board[BOARD_BUSY_SINCE] = now
        return now

    cdef int app_finished(self, object started) except -1:
        if len(self.running) == 1:
            del self.running[0]
            self.board[BOARD_BUSY_SINCE] = 0.0
        else:
            # Threads finish in any order: the oldest still running counts.
            self.running.remove(started)
            self.board[BOARD_BUSY_SINCE] = min(self.running)
        return 0

    cdef int request_done(self) except -1:
        """A response the app gave is over (sent, or given up)."""
        self.requests += 1
        self.board[BOARD_REQUESTS] = self.requests
        return 0

    cdef int register(self, int fd, object obj) except -1:
        while len(self.table) <= fd:
            self.table.extend([None] * (fd + 64 - len(self.table)))
        self.table[fd] = obj
        return 0

    # ---- control (called from signal handlers in worker.py)

    def stop(self, bint graceful=True, bint close_idle=True):
        """Graceful: stop accepting, finish what is in flight, then return from
        ``run``.  Otherwise return as soon as the loop wakes.

        ``close_idle``: close idle keep-alive connections at once (shutdown).
        Without it (a retiring or reloaded worker) each idle connection stays
        until its keep-alive deadline and its next request is answered with
        ``Connection: close``, so no client races a close on a connection it
        is about to reuse."""
        if not graceful:
            self.quitting = True
            return
        self.close_idle = self.close_idle or close_idle
        if not self.alive:
            return
        self.alive = False
        self.board[BOARD_STATE] = 2
        self.graceful_deadline = monotonic() + self.graceful_timeout
        self.close_listeners()
        self.watch_handoffs(False)   # queued handoffs are for the workers that stay
        self.next_sweep = 0   # close idle keep-alive connections on the next wakeup

    cdef int close_listeners(self) except -1:
        cdef Listener listener
        for listener in self.listeners:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, listener.fd, NULL)
            self.table[listener.fd] = None
        del self.listeners[:]
        return 0

    # ---- the loop

    def run(self):
        cdef epoll_event events[MAX_EVENTS]
        cdef int ready, i, fd, timeout_ms
        cdef unsigned int flags
        cdef object entry
        cdef double now
        refresh_date()
        self.board[BOARD_STATE] = 1
        while not self.quitting:
            if not self.alive and self.connections == 0:
                break
            timeout_ms = 1000
            with nogil:
                ready = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
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
                        self.take_handoff()
                        events[i].data.fd = -1
                        break
            for i in range(ready):
                fd = events[i].data.fd
                if fd < 0:
                    continue
                flags = events[i].events
                entry = self.table[fd]
                if entry is None:
                    continue
                if type(entry) is Listener:
                    self.accept(<Listener>entry)
                elif type(entry) is WakePipe:
                    self.take_back()
                elif type(entry) is HandoffQueue:
                    self.take_handoff()
                else:
                    self.on_event(<WSGIConnection>entry, flags)
            PyErr_CheckSignals()
            if self.max_requests and self.requests >= self.max_requests and self.alive:
                error_log.info("worker %d retiring after %d requests (max_requests)",
                               os.getpid(), self.requests)
                self.stop(True, False)
            now = monotonic()
            if now >= self.next_sweep:
                self.sweep(now)
                self.next_sweep = now + 1.0
        self.close_listeners()
        for entry in self.table:
            if type(entry) is WSGIConnection and not (<WSGIConnection>entry).busy:
                self.close_connection(<WSGIConnection>entry)
        if self.pool:
            for _ in self.pool:
                self.tasks.put(None)

    cdef int accept(self, Listener listener) except -1:
        cdef sockaddr_storage address
        cdef socklen_t length
        cdef int fd, count, one = 1
        cdef epoll_event event
        cdef WSGIConnection conn
        cdef str remote
        cdef dict base
        for count in range(ACCEPT_BATCH):
            length = sizeof(address)
            fd = accept4(listener.fd, <sockaddr *>&address, &length,
                         SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EAGAIN:
                    return 0
                if errno == EINTR or errno == ECONNABORTED or errno == EPROTO:
                    continue
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    # Out of descriptors or memory: leave the connection queued
                    # (the kernel keeps it) and try again after the next sweep.
                    error_log.error("accept failed: %s; pausing accepts for a second",
                                    os.strerror(errno))
                    self.pause_accepting()
                    return 0
                raise OSError(errno, "accept4 failed")
            base = listener.base_environ.copy()
            if listener.tcp:
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
                remote = peer_address(&address, base)
            else:
                remote = ""
                base["REMOTE_ADDR"] = ""
            conn = WSGIConnection(self, fd, base, remote)
            conn.trusted_proxy = self.trust_all_proxies or (
                listener.tcp and remote in self.trusted_proxies)
            if self.router is not None:
                conn.router = self.router
                conn.home_group = self.local_group
            self.add_connection(conn)
        return 0

    cdef bint add_connection(self, WSGIConnection conn) except -1:
        """Watch a new connection (accepted, or handed over); False if epoll
        refused it (it is closed)."""
        cdef epoll_event event
        conn.deadline = deadline_after(monotonic(), self.header_timeout)
        self.register(conn.fd, conn)
        memset(&event, 0, sizeof(event))
        event.events = EPOLLIN
        event.data.fd = conn.fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, conn.fd, &event) < 0:
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
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, listener.fd, NULL)
        return 0

    cdef int resume_accepting(self) except -1:
        cdef Listener listener
        cdef epoll_event event
        if not self.accept_paused:
            return 0
        self.accept_paused = False
        for listener in self.listeners:
            memset(&event, 0, sizeof(event))
            event.events = EPOLLIN
            event.data.fd = listener.fd
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, listener.fd, &event)
        return 0

    cdef int on_event(self, WSGIConnection conn, unsigned int flags) except -1:
        if conn.state == LINGERING:
            self.linger_read(conn)
        elif conn.want_write:
            if flags & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                self.advance(conn)
        else:
            self.read(conn)
        return 0

    cdef int read(self, WSGIConnection conn) except -1:
        cdef ssize_t received = recv(conn.fd, self.recv_buffer, RECV_SIZE, 0)
        if received > 0:
            conn.last_read = self.now
            conn.feed(self.recv_buffer, received)
        elif received == 0:
            conn.peer_closed = True
            conn.stop_reading = True
        elif errno == EAGAIN or errno == EINTR:
            return 0
        else:
            self.close_connection(conn)
            return 0
        self.advance(conn)
        return 0

    cdef bint has_ready_request(self, WSGIConnection conn):
        """The next request of ``conn`` can be answered: its body is all in,
        no response is still being sent, and the connection goes on."""
        return (conn.pending and not conn.closing and not conn.streaming
                and (<Request>conn.pending[0]).body_complete)

    cdef int advance(self, WSGIConnection conn) except -1:
        """Take ``conn`` as far as it goes without waiting for its client: go
        on with a streamed response, answer its ready requests in order (or
        hand them to an app thread), then ``settle`` what it waits for.  Every
        event of a connection in the loop comes through here."""
        cdef WSGIRequest request
        if conn.state == CLOSED:
            return 0
        if conn.streaming and conn.pump(False):
            return self.wait_writable(conn)
        if self.pool is not None:
            # Health checks are answered here, never queued behind app threads.
            while self.has_ready_request(conn) and self.is_health_request(
                    <Request>conn.pending[0]):
                conn.answer_health(<WSGIRequest>conn.pending.pop(0))
            if self.has_ready_request(conn):
                return self.give_to_thread(conn)
            return self.settle(conn)
        # Pipelined requests are answered into one buffer, sent at once --
        # unless the client is not reading it.
        while self.has_ready_request(conn) and conn.out.size <= HIGH_WATER:
            request = <WSGIRequest>conn.pending.pop(0)
            if self.is_health_request(request):
                conn.answer_health(request)
            else:
                conn.run_app(request)
                if conn.streaming and conn.pump(False):
                    return self.wait_writable(conn)
        return self.settle(conn)

    cdef int serve_in_thread(self, WSGIConnection conn) except -1:
        """An app thread's turn with ``conn``: its ready requests, in order,
        waiting on the socket as the connection needs (it is this thread's)."""
        cdef WSGIRequest request
        while self.has_ready_request(conn):
            request = <WSGIRequest>conn.pending.pop(0)
            if self.is_health_request(request):
                conn.answer_health(request)
            else:
                conn.run_app(request)
                if conn.streaming:
                    conn.pump(True)
        return 0

    cdef int give_to_thread(self, WSGIConnection conn) except -1:
        """Hand ``conn`` to an app thread; the loop forgets it until take_back.
        What is already answered goes out first."""
        try:
            conn.out.send_to(conn.fd)
        except OSError:
            pass   # the thread's own writes will find the peer gone
        conn.busy = True
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, conn.fd, NULL)
        conn.want_write = False
        self.tasks.put(conn)
        self.busy_threads += 1
        if self.busy_threads >= self.threads:
            self.watch_handoffs(False)   # no free thread: let other workers take them
        return 0

    cdef int settle(self, WSGIConnection conn) except -1:
        """Nothing more can be answered now: answer a protocol error, decide
        about closing, send, then wait for what comes next (EPOLLOUT while
        output is queued; else the client's next bytes, by the deadline of
        set_deadline), hand the connection over, or close it."""
        cdef epoll_event event
        if conn.state == CLOSED:
            return 0
        if conn.pending and not self.has_ready_request(conn) and not conn.streaming \
                and not conn.closing and conn.peer_closed:
            conn.pending.clear()     # a body the client will never finish
        if not conn.closing and not conn.pending and not conn.streaming:
            if conn.error_status:
                conn.out.write(error_response(conn.error_status, conn.error_reason or ""))
                conn.closing = True
            elif conn.peer_closed:
                conn.closing = True
            elif (not self.alive and conn.at_message_boundary()
                  and conn.handoff_group < 0):
                conn.closing = True  # (a request for another group is still handed over)
        if not conn.closing:
            conn.send_continue()
        if conn.out.size:
            try:
                conn.out.send_to(conn.fd)
            except OSError:
                self.close_connection(conn)
                return 0
            if conn.out.size:
                return self.wait_writable(conn)
        if conn.want_write:
            conn.want_write = False
            memset(&event, 0, sizeof(event))
            event.events = EPOLLIN
            event.data.fd = conn.fd
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, conn.fd, &event)
            if self.has_ready_request(conn):
                return self.advance(conn)     # pipelined requests waited for the output
        if conn.handoff_group >= 0 and not conn.closing and not conn.pending:
            return self.hand_off(conn)
        if conn.closing:
            return self.start_close(conn)
        return self.set_deadline(conn)

    cdef int wait_writable(self, WSGIConnection conn) except -1:
        """The client must read before the connection goes on: wait for
        EPOLLOUT (reading nothing meanwhile), within the send deadline."""
        cdef epoll_event event
        conn.deadline = deadline_after(monotonic(), self.header_timeout)
        if not conn.want_write:
            conn.want_write = True
            memset(&event, 0, sizeof(event))
            event.events = EPOLLOUT
            event.data.fd = conn.fd
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, conn.fd, &event)
        return 0

    cdef int set_deadline(self, WSGIConnection conn) except -1:
        """The deadline of a connection waiting for its client's bytes, the
        same rule as the ASGI worker's: a request's head must be in within
        header_timeout of its first byte; its body must keep arriving (each
        read restarts header_timeout); between requests a connection is kept
        keep_alive seconds.  (A new connection gets header_timeout for its
        first byte, in add_connection; the send and linger deadlines are set
        in wait_writable and start_close.)"""
        cdef Request current = conn.current
        if current is not None:
            if current.head_complete:
                conn.deadline = deadline_after(conn.last_read, self.header_timeout)
            else:
                conn.deadline = deadline_after(current.started, self.header_timeout)
        elif conn.pending:
            conn.deadline = deadline_after(monotonic(), self.header_timeout)
        elif conn.last_read:
            conn.deadline = monotonic() + self.keep_alive
        return 0

    cdef int start_close(self, WSGIConnection conn) except -1:
        """Close after a response.  If the client may still be sending (an unread
        body, a rejected request), shut our side and drain theirs for a moment
        first: closing with unread input would reset the connection and could
        destroy the response before the client reads it."""
        if conn.peer_closed or (conn.at_message_boundary() and not conn.error_status
                                and not conn.pending):
            self.close_connection(conn)
            return 0
        shutdown(conn.fd, SHUT_WR)
        conn.state = LINGERING
        conn.deadline = monotonic() + LINGER_SECONDS
        return 0

    cdef int linger_read(self, WSGIConnection conn) except -1:
        cdef ssize_t received
        cdef int rounds
        for rounds in range(LINGER_READS):
            received = recv(conn.fd, self.recv_buffer, RECV_SIZE, 0)
            if received > 0:
                continue
            if received < 0 and (errno == EAGAIN or errno == EINTR):
                return 0
            break
        else:
            return 0
        self.close_connection(conn)
        return 0

    cdef int close_connection(self, WSGIConnection conn) except -1:
        if conn.state == CLOSED:
            return 0
        conn.state = CLOSED
        if conn.request is not None and not conn.busy:
            conn.abort_response()     # a response still being sent: close the app's iterable
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, conn.fd, NULL)
        close(conn.fd)
        self.table[conn.fd] = None
        self.connections -= 1
        conn.pending.clear()
        conn.out.clear()
        # Drop the connection's self-references (its bound methods) so it is
        # freed at once, without the cyclic GC.
        conn.start_response_method = None
        conn.write_method = None
        return 0

    cdef int sweep(self, double now) except -1:
        """Once a second: deadlines, a vanished master, the end of a drain."""
        cdef object entry
        cdef WSGIConnection conn
        if self.master_pid and getppid() != self.master_pid:
            error_log.warning("master (pid %d) is gone; worker %d stopping",
                              self.master_pid, os.getpid())
            self.stop(True)
        if not self.alive and now >= self.graceful_deadline:
            self.quitting = True
            return 0
        if self.accept_paused:
            self.resume_accepting()
        for entry in self.table:
            if type(entry) is not WSGIConnection:
                continue
            conn = <WSGIConnection>entry
            if conn.busy:
                continue
            if (not self.alive and self.close_idle and conn.state == OPEN
                    and not conn.want_write and not conn.streaming and not conn.pending
                    and conn.at_message_boundary()):
                # Idle keep-alive during a shutdown -- unless its next request is
                # already waiting: that one is answered (with Connection: close).
                if not input_waiting(conn.fd):
                    self.close_connection(conn)
            elif now >= conn.deadline:
                self.expire(conn)
        return 0

    cdef int expire(self, WSGIConnection conn) except -1:
        """``conn`` missed its deadline (see set_deadline)."""
        if conn.state == LINGERING:
            return self.close_connection(conn)
        if conn.want_write or conn.streaming:
            error_log.info("closing the connection of %s: the client took no response bytes "
                           "for %g s", conn.remote_addr or "a unix socket client",
                           self.header_timeout)
            return self.close_connection(conn)
        if conn.pending or not conn.at_message_boundary():
            # A request started but did not arrive in time: 408, then a
            # lingering close (the client may still be sending).
            conn.pending.clear()
            conn.fail(408, "request not received in time")
            conn.parse_failed()
            return self.settle(conn)
        if input_waiting(conn.fd):
            # Bytes arrived while this worker was busy (the app ran longer
            # than the deadline): they are the client's next request, not a
            # timeout.  Give the loop a turn to read them.
            conn.deadline = monotonic() + 1.0
            return 0
        return self.close_connection(conn)


cdef bint input_waiting(int fd) noexcept:
    """Whether unread bytes wait on ``fd`` (peeked, not consumed)."""
    cdef char byte
    return recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0


cdef str peer_address(sockaddr_storage *address, dict environ):
    """Fill REMOTE_ADDR and REMOTE_PORT from an accepted peer address."""
    cdef tuple peer = peer_of(address)
    if peer is None:
        environ["REMOTE_ADDR"] = ""
        return ""
    environ["REMOTE_ADDR"] = peer[0]
    environ["REMOTE_PORT"] = str(peer[1])
    return <str>peer[0]

# cython: language_level=3
"""The HTTP/1.1 connection core shared by every worker kind.

Rules of this module:

* It does no I/O.  A worker feeds received bytes to ``HttpConnection.feed`` and
  reads complete request heads from ``pending``; it writes response bytes it
  builds with the serialiser below.  So the WSGI worker (epoll, blocking app)
  and the ASGI worker (asyncio) share one parser glue and one set of limits.
* Parsing is httptools (llhttp).  Its callbacks land in the ``on_*`` methods of
  ``HttpConnection``; a subclass decides how a request is represented (a WSGI
  environ, an ASGI scope) through ``new_request``, ``add_header`` and
  ``finish_head``.
* A protocol error is a status, not an exception: ``fail`` records it in
  ``error_status`` and stops the parser.  The worker answers the requests that
  came before it, then that status, then closes — the framing cannot be trusted
  any more.  Statuses: 400 malformed, 413 body too large, 414 request line too
  long, 431 header fields too many or too large, 501 unsupported
  Transfer-Encoding or unknown method, 505 HTTP version other than 1.0/1.1.
* httptools has no size limits, so every limit is counted here, in the
  callbacks, plus one check after each feed for a head that is still
  incomplete (a header that trickles in forever is never reported by httptools
  until it ends).
* Response heads are validated while they are serialised: a header name that
  is not a token, or a value with CR, LF or NUL, raises ``ValueError`` and is
  never sent.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy, memcmp, memmove
from libc.stdint cimport INT64_MAX as PY_SSIZE_T_MAX

from fastpool._posix cimport (
    iovec, writev, send, MSG_NOSIGNAL, errno, EAGAIN, EINTR,
    time, clock_gettime, timespec, CLOCK_MONOTONIC,
)

from email.utils import formatdate
from http import HTTPStatus

import httptools

cdef object HttpParserError = httptools.HttpParserError
cdef object HttpParserUpgrade = httptools.HttpParserUpgrade
cdef object HttpParserInvalidMethodError = httptools.HttpParserInvalidMethodError
cdef object HttpRequestParser = httptools.HttpRequestParser


class StopParsing(Exception):
    """Raised from a parser callback to abort httptools after ``fail``."""


cdef double monotonic() noexcept nogil:
    """The clock every deadline of the worker is measured on."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# ---------------------------------------------------------------- limits

@cython.final
cdef class Limits:
    def __init__(self, Py_ssize_t request_line=4094, Py_ssize_t request_fields=100,
                 Py_ssize_t request_field_size=8190, long long request_body=0):
        self.request_line = request_line
        self.request_fields = request_fields
        self.request_field_size = request_field_size
        self.request_body = request_body
        if request_line and request_fields and request_field_size:
            self.request_head = request_line + request_fields * (request_field_size + 2) + 4
        else:
            self.request_head = 0


# ---------------------------------------------------------------- request

@cython.freelist(64)
@cython.no_gc   # holds only str/bytes/bytearray: it can never be part of a cycle
cdef class Request:
    def __cinit__(self):
        self.content_length = -1

    # The body is kept as the bytes objects httptools hands over, so that
    # reading a body that arrived in one piece returns that very object.

    cdef int append_body(self, bytes chunk) except -1:
        if self.discard_body or PyBytes_GET_SIZE(chunk) == 0:
            return 0
        if self.body is None:
            self.body = [chunk]
        else:
            self.body.append(chunk)
        self.body_size += PyBytes_GET_SIZE(chunk)
        return 0

    cdef Py_ssize_t body_buffered(self):
        return self.body_size

    cdef bytes take_body(self, Py_ssize_t size):
        """Up to ``size`` buffered body bytes (all of them when size < 0)."""
        cdef bytes first
        cdef Py_ssize_t first_size, taken
        cdef list parts
        if size < 0 or size > self.body_size:
            size = self.body_size
        if size == 0:
            return b""
        first = <bytes>self.body[0]
        first_size = PyBytes_GET_SIZE(first) - self.body_pos
        if size <= first_size:
            if self.body_pos == 0 and size == first_size:
                del self.body[0]          # the whole chunk: no copy
                out = first
            else:
                out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(first) + self.body_pos, size)
                self.body_pos += size
                if self.body_pos == PyBytes_GET_SIZE(first):
                    del self.body[0]
                    self.body_pos = 0
            self.body_size -= size
            return out
        parts = []
        taken = 0
        while taken < size:
            first = <bytes>self.body[0]
            first_size = PyBytes_GET_SIZE(first) - self.body_pos
            if taken + first_size <= size:
                parts.append(first if self.body_pos == 0 else first[self.body_pos:])
                taken += first_size
                del self.body[0]
                self.body_pos = 0
            else:
                parts.append(first[self.body_pos:self.body_pos + size - taken])
                self.body_pos += size - taken
                taken = size
        self.body_size -= size
        return b"".join(parts)

    cdef Py_ssize_t find_in_body(self, char byte, Py_ssize_t limit):
        """Offset just past the first ``byte`` in the buffered body, or -1."""
        cdef Py_ssize_t seen = 0, start, size
        cdef const char *base
        cdef const char *hit
        cdef bytes chunk
        if self.body is None:
            return -1
        start = self.body_pos
        for chunk in self.body:
            base = PyBytes_AS_STRING(chunk) + start
            size = PyBytes_GET_SIZE(chunk) - start
            if limit >= 0 and seen + size > limit:
                size = limit - seen
            hit = <const char *>memchr(base, byte, size)
            if hit != NULL:
                return seen + (hit - base) + 1
            seen += size
            if limit >= 0 and seen >= limit:
                return -1
            start = 0
        return -1


# ---------------------------------------------------------------- parser glue

cdef bint name_is(bytes name, const char *lower, Py_ssize_t length):
    """Case-insensitive comparison of a header name with a lower-case C string."""
    cdef const char *raw
    cdef Py_ssize_t i
    cdef char c
    if PyBytes_GET_SIZE(name) != length:
        return False
    raw = PyBytes_AS_STRING(name)
    for i in range(length):
        c = raw[i]
        if 65 <= c <= 90:
            c = c + 32
        if c != lower[i]:
            return False
    return True


cdef dict METHODS = {}


cdef str method_name(bytes raw):
    cdef str name = METHODS.get(raw)
    if name is None:
        name = raw.decode("ascii")
        METHODS[raw] = name
    return name


cdef class HttpConnection:
    def __init__(self, Limits limits not None):
        self.limits = limits
        self.pending = []
        self.parser = HttpRequestParser(self)

    # ---- hooks for the worker kind (WSGI, ASGI)

    cdef Request new_request(self):
        return Request()

    cdef int add_header(self, Request request, bytes name, bytes value) except -1:
        return 0

    cdef int finish_head(self, Request request) except -1:
        return 0

    # ---- state

    cdef int fail(self, int status, str reason) except -1:
        if not self.error_status:
            self.error_status = status
            self.error_reason = reason
        self.stop_reading = True
        raise StopParsing(reason)

    cdef bint at_message_boundary(self):
        """True when no request is partly received."""
        return self.current is None

    # ---- httptools callbacks

    def on_message_begin(self):
        cdef Request request = self.new_request()
        request.started = monotonic()
        self.current = request
        self.in_head = True
        self.url = None
        self.begun_in_feed += 1
        self.version_hint = self.next_version_hint
        self.method_hint = self.next_method_hint
        self.next_version_hint = 0
        self.next_method_hint = None
        self.header_count = 0
        self.head_bytes = 0
        self.field_bytes = 0

    def on_url(self, bytes url):
        # Almost always one call per request; a URL split across reads is joined.
        cdef Py_ssize_t limit = self.limits.request_line
        cdef Py_ssize_t method_size
        self.url = url if self.url is None else self.url + url
        # The request line is METHOD SP URL SP HTTP/1.x: the URL plus 10 bytes
        # plus the method (at least 3), without the CRLF.
        if limit and PyBytes_GET_SIZE(self.url) + 13 > limit:
            if self.method_hint is not None:
                method_size = len(self.method_hint)
            else:
                method_size = len(self.parser.get_method())
            if PyBytes_GET_SIZE(self.url) + 10 + method_size > limit:
                self.fail(414, "request line too long")

    def on_header(self, bytes name, bytes value):
        cdef Request request = self.current
        cdef Limits limits = self.limits
        self.header_seen_in_feed = True
        self.header_count += 1
        if limits.request_fields and self.header_count > limits.request_fields:
            self.fail(431, "too many header fields")
        if limits.request_field_size and (
            PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 2 > limits.request_field_size
        ):
            self.fail(431, "header field too large")
        if name_is(name, b"content-length", 14):
            try:
                request.content_length = int(value)
            except ValueError:
                self.fail(400, "invalid Content-Length")
            if limits.request_body and request.content_length > limits.request_body:
                self.fail(413, "request body too large")
        elif name_is(name, b"transfer-encoding", 17):
            # Only "chunked" is understood; gzip and friends are 501 (RFC 9112 6.1),
            # checked here because llhttp reports them only after the head.
            if value.strip().lower() != b"chunked":
                self.fail(501, "unsupported Transfer-Encoding")
            request.chunked = True
        elif name_is(name, b"expect", 6):
            if value.strip().lower() == b"100-continue":
                request.expect_continue = True
        self.add_header(request, name, value)

    def on_headers_complete(self):
        cdef Request request = self.current
        cdef object parser = self.parser
        cdef str version
        if self.version_hint:
            request.http_minor = self.version_hint - 10
        else:
            # httptools formats a new string here; the hint above avoids it for
            # the first request of each read, which is nearly every request.
            version = parser.get_http_version()
            if version == "1.1":
                request.http_minor = 1
            elif version == "1.0":
                request.http_minor = 0
            else:
                self.fail(505, "HTTP version not supported")
        if self.method_hint is not None:
            request.method = self.method_hint
        else:
            request.method = method_name(parser.get_method())
        request.keep_alive = parser.should_keep_alive()
        request.target = self.url if self.url is not None else b""
        request.head_complete = True
        # A request without a body is complete now; on_message_complete also says so.
        if request.content_length <= 0 and not request.chunked:
            request.body_complete = True
        self.in_head = False
        self.finish_head(request)
        self.pending.append(request)

    def on_body(self, bytes chunk):
        cdef Request request = self.current
        request.body_received += PyBytes_GET_SIZE(chunk)
        if self.limits.request_body and request.body_received > self.limits.request_body:
            self.fail(413, "request body too large")
        request.append_body(chunk)

    def on_message_complete(self):
        self.current.body_complete = True
        self.current = None

    # ---- feeding

    cdef int feed(self, bytes data) except -1:
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef Request request
        cdef Limits limits = self.limits
        self.header_seen_in_feed = False
        self.begun_in_feed = 0
        self.feed_at_boundary = self.current is None
        if self.current is None:
            self.next_version_hint = version_hint(data)
            self.next_method_hint = method_hint(data) if self.next_version_hint else None
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            # The head (and, with no body, the message) is complete; what follows
            # belongs to another protocol that this worker does not speak.
            # Answer the request and close.
            # (setup.py compiles with wraparound=False: no negative indexes.)
            request = self.pending[len(self.pending) - 1]
            request.upgrade = True
            request.keep_alive = False
            request.body_complete = True
            self.current = None
            self.stop_reading = True
            return 0
        except HttpParserError as exc:
            if not self.error_status:
                # ``data`` starts with the failing request only if it began this read.
                self.error_status = parser_error_status(
                    exc, data if self.feed_at_boundary and self.begun_in_feed == 1 else b"")
                self.error_reason = str(exc)
            self.stop_reading = True
            # The request being parsed has broken framing: never dispatch it.
            if (self.current is not None and self.pending
                    and self.pending[len(self.pending) - 1] is self.current):
                self.pending.pop()
            self.current = None
            return 0
        if self.in_head:
            self.head_bytes += size
            if self.header_seen_in_feed:
                self.field_bytes = 0
            else:
                self.field_bytes += size
            # Bytes since the last complete header: a field that never ends.  Before
            # the first header they may still be the request line, which on_url
            # limits; count them as a field only past any line that limit allows.
            if limits.request_field_size and self.field_bytes > limits.request_field_size + 2 + (
                    0 if self.header_count else limits.request_line or PY_SSIZE_T_MAX // 2):
                self.error_status = 431
                self.error_reason = "header field too large"
            elif limits.request_head and self.head_bytes > limits.request_head:
                self.error_status = 431
                self.error_reason = "request head too large"
            if self.error_status:
                self.stop_reading = True
                self.current = None
        return 0


cdef int version_hint(bytes data):
    """11 or 10 when ``data`` starts with a complete ``... HTTP/1.1`` (or 1.0)
    request line, else 0 (unknown: ask the parser)."""
    cdef const char *raw = PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const char *newline = <const char *>memchr(raw, 10, size if size < 8192 else 8192)
    cdef Py_ssize_t end
    if newline == NULL:
        return 0
    end = newline - raw
    if end < 10 or raw[end - 1] != 13 or raw[end - 10] != 32:
        return 0
    if memcmp(raw + end - 9, b"HTTP/1.", 7) != 0:
        return 0
    if raw[end - 2] == 49:
        return 11
    if raw[end - 2] == 48:
        return 10
    return 0


cdef str method_hint(bytes data):
    """The method of the request line ``data`` starts with, for the common
    methods (None otherwise: ask the parser).  llhttp still validates it."""
    cdef const char *raw = PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    if size > 4 and memcmp(raw, b"GET ", 4) == 0:
        return "GET"
    if size > 5 and memcmp(raw, b"POST ", 5) == 0:
        return "POST"
    if size > 5 and memcmp(raw, b"HEAD ", 5) == 0:
        return "HEAD"
    if size > 4 and memcmp(raw, b"PUT ", 4) == 0:
        return "PUT"
    if size > 7 and memcmp(raw, b"DELETE ", 7) == 0:
        return "DELETE"
    if size > 6 and memcmp(raw, b"PATCH ", 6) == 0:
        return "PATCH"
    if size > 8 and memcmp(raw, b"OPTIONS ", 8) == 0:
        return "OPTIONS"
    return None


cdef int parser_error_status(object exc, bytes data):
    cdef str message = str(exc)
    cdef bytes method
    # llhttp's reasons for a version it does not know ("Invalid HTTP version",
    # "Invalid major version", ...) and for the HTTP/2 preface (PRI * HTTP/2.0);
    # other messages that mention the version ("Expected CRLF after version")
    # are malformed request lines.
    if message.startswith("Invalid") and message.endswith("version") or "PRI" in message:
        return 505
    if isinstance(exc, HttpParserInvalidMethodError):
        # An unknown method that is a well-formed token is "not implemented";
        # anything else is a malformed request.
        method = data.split(b" ", 1)[0]
        if 0 < len(method) <= 32 and method.isalpha() and method.isupper():
            return 501
    return 400


# ---------------------------------------------------------------- responses

# The Date header, rebuilt at most once a second (refresh_date is called by the
# worker loop once per wakeup; formatting happens only when the second changes).
cdef bytes _date_header = b""
cdef long _date_second = -1


cdef int refresh_date() except -1:
    global _date_header, _date_second
    cdef long now = time(NULL)
    if now != _date_second:
        _date_second = now
        _date_header = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
    return 0


cdef bytes date_header():
    return _date_header


cdef dict STATUS_LINES = {}


cdef tuple status_line(str status):
    """``(b"HTTP/1.1 200 OK\\r\\n", 200)`` for ``"200 OK"``; cached."""
    cdef tuple cached = STATUS_LINES.get(status)
    cdef int code
    if cached is not None:
        return cached
    if len(status) < 3 or not status[:3].isdigit() or (len(status) > 3 and status[3] != " "):
        raise ValueError(f"invalid status {status!r}: expected '<3 digits> <reason>'")
    if "\r" in status or "\n" in status or "\0" in status:
        raise ValueError(f"invalid status {status!r}: contains CR, LF or NUL")
    code = int(status[:3])
    if code < 100:
        raise ValueError(f"invalid status {status!r}")
    cached = (b"HTTP/1.1 " + status.encode("latin-1") + b"\r\n", code)
    if len(STATUS_LINES) < 512:
        STATUS_LINES[status] = cached
    return cached


# RFC 9110 token characters, for header names.
cdef bint TOKEN_CHARS[256]


cdef _init_token_chars():
    cdef int i
    for i in range(256):
        TOKEN_CHARS[i] = False
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        TOKEN_CHARS[c] = True


_init_token_chars()


cdef int check_header(bytes name, bytes value) except -1:
    cdef const unsigned char *raw = <const unsigned char *>PyBytes_AS_STRING(name)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t i
    cdef unsigned char c
    if size == 0:
        raise ValueError("empty header name")
    for i in range(size):
        if not TOKEN_CHARS[raw[i]]:
            raise ValueError(f"invalid header name {name!r}")
    raw = <const unsigned char *>PyBytes_AS_STRING(value)
    size = PyBytes_GET_SIZE(value)
    for i in range(size):
        c = raw[i]
        if c == 13 or c == 10 or c == 0:
            raise ValueError(f"invalid header value for {name!r}: contains CR, LF or NUL")
    return 0


cdef enum HeaderKind:
    PLAIN = 0
    CONTENT_LENGTH = 1
    DATE = 2
    SERVER = 3
    CONNECTION = 4
    TRANSFER_ENCODING = 5


# name -> {value -> (line or None, kind, number)}: validated, encoded header
# lines.  Apps send the same few headers on every response, so encoding and
# validating them once is the common case.  Bounded so varying values
# (cookies, ETags) cannot grow it without limit.
cdef dict HEADER_LINES = {}


cdef tuple encode_header(str name, str value):
    cdef bytes raw_name = name.encode("latin-1")
    cdef bytes raw_value = value.encode("latin-1")
    cdef Py_ssize_t size = PyBytes_GET_SIZE(raw_name)
    cdef int kind = PLAIN
    cdef long long number = 0
    check_header(raw_name, raw_value)
    if size == 14 and name_is(raw_name, b"content-length", 14):
        if not raw_value.strip().isdigit():
            raise ValueError(f"invalid Content-Length {value!r}")
        kind = CONTENT_LENGTH
        number = int(raw_value)
    elif size == 4 and name_is(raw_name, b"date", 4):
        kind = DATE
    elif size == 6 and name_is(raw_name, b"server", 6):
        kind = SERVER
    elif size == 10 and name_is(raw_name, b"connection", 10):
        # The connection's framing is the server's business; an app may only
        # ask for it to be closed.  The line itself is never copied.
        return (None, CONNECTION, 1 if raw_value.strip().lower() == b"close" else 0)
    elif size == 17 and name_is(raw_name, b"transfer-encoding", 17):
        return (None, TRANSFER_ENCODING, 0)
    return (raw_name + b": " + raw_value + b"\r\n", kind, number)


cdef int append_str_header(HeadBuf *head, object name, object value,
                           HeadFlags *flags) except -1:
    """Validate one WSGI (str, str) header and append ``name: value\\r\\n``."""
    cdef dict by_value
    cdef tuple entry = None
    cdef object line
    cdef int kind
    if type(name) is not str or type(value) is not str:
        raise TypeError(f"header name and value must be str, got {name!r}: {value!r}")
    by_value = HEADER_LINES.get(name)
    if by_value is not None:
        entry = by_value.get(value)
    if entry is None:
        entry = encode_header(name, value)
        if by_value is None and len(HEADER_LINES) < 256:
            by_value = HEADER_LINES[name] = {}
        if by_value is not None and len(by_value) < 64:
            by_value[value] = entry
    line = entry[0]
    kind = entry[1]
    if kind == CONTENT_LENGTH:
        flags.content_length = entry[2]
    elif kind == DATE:
        flags.has_date = True
    elif kind == SERVER:
        flags.has_server = True
    elif kind == CONNECTION:
        if entry[2]:
            flags.connection_close = True
        return 0
    elif kind == TRANSFER_ENCODING:
        flags.has_transfer_encoding = True
        return 0
    head_put_bytes(head, <bytes>line)
    return 0


cdef int put_content_length(HeadBuf *head, long long length) except -1:
    # Hand-rolled: snprintf costs more than the rest of the head together.
    cdef char line[48]
    cdef char digits[24]
    cdef int count = 0, i
    memcpy(line, b"Content-Length: ", 16)
    while True:
        digits[count] = 48 + <char>(length % 10)
        length //= 10
        count += 1
        if length == 0:
            break
    for i in range(count):
        line[16 + i] = digits[count - 1 - i]
    line[16 + count] = 13
    line[17 + count] = 10
    return head_put(head, line, 18 + count)


cdef void head_free(HeadBuf *head) noexcept:
    if head.on_heap:
        free(head.data)
        head.on_heap = False


# ---------------------------------------------------------------- output buffer

cdef enum:
    MAX_IOV = 64
    SMALL_WRITE = 16384
    BUF_LIMIT = 262144
    SHRINK_ABOVE = 65536


@cython.final
cdef class OutBuffer:
    """Bytes waiting to be sent on one connection, in order (see _http.pxd)."""

    def __cinit__(self):
        self.chunks = []

    def __dealloc__(self):
        free(self.buf)

    cdef int write_raw(self, const char *data, Py_ssize_t size) except -1:
        cdef Py_ssize_t wanted
        cdef char *grown
        if size <= 0:
            return 0
        if not self.chunks and self.buf_end + size <= BUF_LIMIT:
            if self.buf_end + size > self.buf_capacity:
                if self.buf_start:
                    memmove(self.buf, self.buf + self.buf_start, self.buf_end - self.buf_start)
                    self.buf_end -= self.buf_start
                    self.buf_start = 0
                if self.buf_end + size > self.buf_capacity:
                    wanted = max(self.buf_capacity * 2, self.buf_end + size, 4096)
                    grown = <char *>realloc(self.buf, wanted)
                    if grown == NULL:
                        raise MemoryError()
                    self.buf = grown
                    self.buf_capacity = wanted
            memcpy(self.buf + self.buf_end, data, size)
            self.buf_end += size
        else:
            if self.tail is None:
                self.tail = bytearray()
                self.chunks.append(self.tail)
            extend(self.tail, data, size)
        self.size += size
        return 0

    cdef int write(self, object data) except -1:
        cdef Py_ssize_t size
        if type(data) is not bytes:
            data = bytes(data)
        size = PyBytes_GET_SIZE(data)
        if size < SMALL_WRITE:
            return self.write_raw(PyBytes_AS_STRING(data), size)
        self.chunks.append(data)
        self.tail = None
        self.size += size
        return 0

    cdef int clear(self) except -1:
        del self.chunks[:]
        self.tail = None
        self.first_offset = 0
        self.size = 0
        self.buf_start = self.buf_end = 0
        if self.buf_capacity > SHRINK_ABOVE:
            # A one-off large burst: give the memory back.
            free(self.buf)
            self.buf = NULL
            self.buf_capacity = 0
        return 0

    cdef Py_ssize_t send_to(self, int fd) except -2:
        """Send what the socket takes without blocking; return bytes sent, or -1
        when the socket would block before any byte.  Raises OSError when the
        peer is gone."""
        cdef iovec iov[MAX_IOV]
        cdef int count = 0
        cdef Py_ssize_t sent, remaining, chunk_size, taken
        cdef object chunk
        cdef char *base
        if self.size == 0:
            return 0
        if self.buf_end > self.buf_start:
            iov[0].iov_base = self.buf + self.buf_start
            iov[0].iov_len = self.buf_end - self.buf_start
            count = 1
        for chunk in self.chunks:
            if count == MAX_IOV:
                break
            if type(chunk) is bytes:
                base = PyBytes_AS_STRING(chunk)
                chunk_size = PyBytes_GET_SIZE(chunk)
            else:
                base = PyByteArray_AS_STRING(chunk)
                chunk_size = PyByteArray_GET_SIZE(chunk)
            if chunk is self.chunks[0]:
                base += self.first_offset
                chunk_size -= self.first_offset
            iov[count].iov_base = base
            iov[count].iov_len = chunk_size
            count += 1
        while True:
            if count == 1:
                sent = send(fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL)
            else:
                sent = writev(fd, iov, count)
            if sent >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return -1
            raise OSError(errno, "send failed")
        self.size -= sent
        if self.size == 0:
            self.clear()
            return sent
        remaining = sent
        taken = self.buf_end - self.buf_start
        if taken > remaining:
            taken = remaining
        self.buf_start += taken
        remaining -= taken
        if self.buf_start == self.buf_end:
            self.buf_start = self.buf_end = 0
        while remaining:
            chunk = self.chunks[0]
            chunk_size = len(chunk) - self.first_offset
            if remaining >= chunk_size:
                remaining -= chunk_size
                del self.chunks[0]
                self.first_offset = 0
                if chunk is self.tail:
                    self.tail = None
            else:
                self.first_offset += remaining
                remaining = 0
        return sent


cdef int append_chunk(OutBuffer out, object data) except -1:
    """Append ``data`` in chunked transfer coding."""
    cdef Py_ssize_t size = len(data)
    cdef char prefix[24]
    if size == 0:
        return 0
    out.write_raw(prefix, snprintf(prefix, sizeof(prefix), "%zx\r\n", size))
    out.write(data)
    out.write_raw("\r\n", 2)
    return 0


cpdef bytes error_response(int status, str detail=""):
    """A complete response the server sends on its own (the connection closes)."""
    cdef str phrase
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = f"{status} {phrase}\n".encode("latin-1")
    if detail:
        body += detail.encode("latin-1", "replace") + b"\n"
    refresh_date()
    return (
        f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
        + _date_header
        + b"Server: fastpool\r\nContent-Type: text/plain; charset=utf-8\r\n"
        + b"Content-Length: " + str(len(body)).encode("ascii")
        + b"\r\nConnection: close\r\n\r\n" + body
    )

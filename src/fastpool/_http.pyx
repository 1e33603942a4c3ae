# cython: language_level=3
"""The HTTP/1.1 connection core shared by every worker kind.

Rules of this module:

* It does no I/O.  A worker feeds received bytes to ``HttpConnection.feed`` and
  reads complete request heads from ``pending``; it writes response bytes it
  builds with the serialiser below.  So the WSGI worker (epoll, blocking app)
  and the ASGI worker (asyncio) share one parser glue and one set of limits.
* Parsing is the llhttp inside httptools, driven through its C API: its
  callbacks call the C-level event methods of ``HttpConnection``
  (``message_begin``, ``url_span`` ...) with no Python call in between.  A
  subclass decides how a request is represented (a WSGI environ, an ASGI
  scope) through ``new_request``, ``add_header`` and ``finish_head``.
* A protocol error is a status, not an exception: ``fail`` records it in
  ``error_status`` and stops the parser.  The worker answers the requests that
  came before it, then that status, then closes — the framing cannot be trusted
  any more.  Statuses: 400 malformed, 413 body too large, 414 request line too
  long, 431 header fields too many or too large, 501 unsupported
  Transfer-Encoding or unknown method, 505 HTTP version other than 1.0/1.1.
* llhttp has no size limits, so every limit is counted here, in the span
  callbacks, as the bytes arrive: a header that trickles in forever is refused
  as soon as it passes its limit.
* Response heads are validated while they are serialised: a header name that
  is not a token, or a value with CR, LF or NUL, raises ``ValueError`` and is
  never sent.
"""

cimport cython
from fastpool._consts cimport *
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.stdio cimport snprintf
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset

from fastpool._posix cimport (
    iovec, writev, send, MSG_NOSIGNAL, errno, EAGAIN, EINTR,
    time, clock_gettime, timespec, CLOCK_MONOTONIC,
    sockaddr_storage, sockaddr_in, sockaddr_in6, AF_INET, AF_INET6, inet_ntop, inet_pton,
    ntohs, INET6_ADDRSTRLEN,
)

from email.utils import formatdate
from http import HTTPStatus

import httptools
from ssl import SSLWantReadError, SSLWantWriteError
from tempfile import TemporaryFile
from urllib.parse import unquote_to_bytes

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
@cython.no_gc   # holds only str/bytes/bytearray and a file: it can never be part of a cycle
cdef class Request:
    def __cinit__(self):
        self.content_length = -1

    # The body is kept as the bytes objects the parser hands over, so that
    # reading a body that arrived in one piece returns that very object.

    cdef int append_body(self, bytes chunk) except -1:
        if self.discard_body or PyBytes_GET_SIZE(chunk) == 0:
            return 0
        if self.spool is None and self.spool_above and (
                self.body_size + PyBytes_GET_SIZE(chunk) > self.spool_above):
            # Too large to hold in memory: what is buffered and all that
            # follows go to an anonymous temporary file.
            self.spool = TemporaryFile()
            if self.body is not None:
                for part in self.take_body_parts():
                    self.spool.write(part)
                self.body = None
                self.body_pos = 0
        if self.spool is not None:
            self.spool.write(chunk)
            self.body_size += PyBytes_GET_SIZE(chunk)
            return 0
        if self.body is None:
            self.body = [chunk]
        else:
            self.body.append(chunk)
        self.body_size += PyBytes_GET_SIZE(chunk)
        return 0

    cdef Py_ssize_t body_buffered(self):
        return self.body_size

    cdef list take_body_parts(self):
        """Every buffered chunk, in order (the first one from body_pos)."""
        cdef list parts = [chunk for chunk in self.body]
        if parts and self.body_pos:
            parts[0] = (<bytes>parts[0])[self.body_pos:]
        return parts

    cdef bytes take_body(self, Py_ssize_t size):
        """Up to ``size`` buffered body bytes (all of them when size < 0).
        A spooled body is read from its file, from where the last read ended
        (the caller rewinds it once the body is complete)."""
        cdef bytes first
        cdef Py_ssize_t first_size, taken
        cdef list parts
        if size < 0 or size > self.body_size:
            size = self.body_size
        if size == 0:
            return b""
        if self.spool is not None:
            out = self.spool.read(size)
            self.body_size -= len(out)
            return out
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
            return -1     # (nothing in memory, or a spooled body: its reader reads the file)
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

cdef inline bint name_is(bytes name, const char *lower, Py_ssize_t length) noexcept:
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


# ---------------------------------------------------------------- llhttp

# fastpool parses with the llhttp that httptools ships, calling its C API
# directly (httptools' own Python callbacks cost more than the rest of a
# request).  The functions are looked up by name in httptools' extension
# module; the one thing the C API does not pin down across llhttp versions is
# the order of the callbacks in llhttp_settings_t, so discover_layout() finds
# it at import by asking llhttp itself (see there).  Anything unrecognised is
# an ImportError: no guessing.

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    enum:
        RTLD_NOW
        RTLD_LOCAL

cdef struct LLHttp:
    void (*init)(void *parser, int kind, const void *settings) noexcept nogil
    void (*settings_init)(void *settings) noexcept nogil
    int (*execute)(void *parser, const char *data, size_t size) noexcept nogil
    const char *(*errno_name)(int code) noexcept nogil
    const char *(*get_error_reason)(const void *parser) noexcept nogil
    const char *(*get_error_pos)(const void *parser) noexcept nogil
    int (*should_keep_alive)(const void *parser) noexcept nogil
    unsigned char (*get_http_major)(void *parser) noexcept nogil
    unsigned char (*get_http_minor)(void *parser) noexcept nogil
    unsigned char (*get_method)(void *parser) noexcept nogil
    const char *(*method_name)(int method) noexcept nogil
    void (*resume)(void *parser) noexcept nogil
    void (*set_lenient_transfer_encoding)(void *parser, int enabled) noexcept nogil

cdef enum:
    HTTP_REQUEST = 1      # llhttp_type_t
    HTTP_CONNECT = 5      # llhttp_method_t of CONNECT (stable since http_parser)
    STOP = 1              # an event method's "stop parsing" (0: go on; -1: exception)
    PAUSE = 2             # an event method's "pause here" (see feed)

cdef LLHttp llhttp
cdef int HPE_PAUSED = -1     # llhttp's code for a pause, looked up by name at import
cdef void *SETTINGS[SETTINGS_SLOTS]
cdef dict ERRNO_NAMES = {}
cdef list METHOD_NAMES = [None] * 256


cdef void *symbol(void *handle, const char *name) except NULL:
    cdef void *found = dlsym(handle, name)
    if found == NULL:
        raise ImportError(f"httptools' parser module does not export {name.decode()}; "
                          "fastpool needs httptools 0.6.1 or later")
    return found


cdef str errno_name(int code):
    """llhttp's name for an error code it returned (never called with others:
    llhttp_errno_name aborts on unknown values)."""
    cdef str name = ERRNO_NAMES.get(code)
    if name is None:
        name = llhttp.errno_name(code).decode("ascii")
        ERRNO_NAMES[code] = name
    return name


cdef int probe_fail(void *parser, const char *at, size_t size) noexcept:
    # Never touches its arguments: in a slot llhttp calls with one argument
    # they are garbage, and that must be harmless.
    return -1


# A request that exercises every callback fastpool uses, and where each data
# span ends in it.
cdef bytes SAMPLE = (b"PATCH /abcdefg HTTP/1.1\r\nXy: 1234567890\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nb\r\nabcdefghijk\r\n0\r\n\r\n")
cdef dict SPAN_ENDS = {
    SAMPLE.index(b" /abcdefg"): "method",
    SAMPLE.index(b" HTTP/1.1"): "url",
    SAMPLE.index(b":"): "header_field",
    SAMPLE.index(b"\r\nTransfer"): "header_value",
    SAMPLE.index(b"abcdefghijk") + 11: "body",
}
cdef dict CALLBACK_ERRORS = {
    "HPE_CB_MESSAGE_BEGIN": "message_begin",
    "HPE_CB_HEADERS_COMPLETE": "headers_complete",
    "HPE_CB_MESSAGE_COMPLETE": "message_complete",
}


cdef dict discover_layout():
    """Which slot of llhttp_settings_t holds which callback.

    For each slot in turn, only that slot gets a callback that fails, and the
    sample request is parsed.  llhttp then says which callback failed: by its
    error code (HPE_CB_MESSAGE_BEGIN, ...) for the plain callbacks, and by the
    position it stopped at (the end of the span) for the data callbacks.
    """
    cdef void *probe[SETTINGS_SLOTS]
    cdef ParserBox box
    cdef int slot, code, delta
    cdef Py_ssize_t at
    cdef dict layout = {}
    cdef const char *sample = SAMPLE
    for slot in range(SETTINGS_SLOTS):
        memset(probe, 0, sizeof(probe))
        llhttp.settings_init(probe)
        probe[slot] = <void *>probe_fail
        llhttp.init(box.state, HTTP_REQUEST, probe)
        code = llhttp.execute(box.state, sample, PyBytes_GET_SIZE(SAMPLE))
        if code == 0:
            continue
        name = errno_name(code)
        if name == "HPE_USER":
            at = llhttp.get_error_pos(box.state) - sample
            for delta in (0, 1, -1):
                if at + delta in SPAN_ENDS:
                    layout.setdefault(SPAN_ENDS[at + delta], slot)
                    break
        elif name in CALLBACK_ERRORS:
            layout.setdefault(CALLBACK_ERRORS[name], slot)
    return layout


cdef inline int callback_result(int result) noexcept:
    if result == 0:
        return 0
    return HPE_PAUSED if result == PAUSE else -1


cdef int cb_message_begin(void *parser) noexcept:
    cdef HttpConnection conn = <HttpConnection>(<ParserBox *>parser).owner
    try:
        return callback_result(conn.message_begin())
    except BaseException as exc:
        conn.callback_error = exc
        return -1


cdef int cb_url(void *parser, const char *at, size_t size) noexcept:
    cdef HttpConnection conn = <HttpConnection>(<ParserBox *>parser).owner
    try:
        return -1 if conn.url_span(at, size) else 0
    except BaseException as exc:
        conn.callback_error = exc
        return -1


cdef int cb_header_field(void *parser, const char *at, size_t size) noexcept:
    cdef HttpConnection conn = <HttpConnection>(<ParserBox *>parser).owner
    try:
        return -1 if conn.field_span(at, size) else 0
    except BaseException as exc:
        conn.callback_error = exc
        return -1


cdef int cb_header_value(void *parser, const char *at, size_t size) noexcept:
    cdef HttpConnection conn = <HttpConnection>(<ParserBox *>parser).owner
    try:
        return -1 if conn.value_span(at, size) else 0
    except BaseException as exc:
        conn.callback_error = exc
        return -1


cdef int cb_headers_complete(void *parser) noexcept:
    cdef HttpConnection conn = <HttpConnection>(<ParserBox *>parser).owner
    try:
        return callback_result(conn.headers_complete())
    except BaseException as exc:
        conn.callback_error = exc
        return -1


cdef int cb_body(void *parser, const char *at, size_t size) noexcept:
    cdef HttpConnection conn = <HttpConnection>(<ParserBox *>parser).owner
    try:
        return -1 if conn.body_span(at, size) else 0
    except BaseException as exc:
        conn.callback_error = exc
        return -1


cdef int cb_message_complete(void *parser) noexcept:
    cdef HttpConnection conn = <HttpConnection>(<ParserBox *>parser).owner
    try:
        return -1 if conn.message_complete() else 0
    except BaseException as exc:
        conn.callback_error = exc
        return -1


cdef int bind_llhttp() except -1:
    import httptools.parser.parser as compiled
    cdef bytes path = compiled.__file__.encode()
    cdef void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL)
    if handle == NULL:
        raise ImportError(f"cannot open httptools' parser module: {dlerror().decode()}")
    llhttp.init = <void (*)(void *, int, const void *) noexcept nogil>symbol(
        handle, b"llhttp_init")
    llhttp.settings_init = <void (*)(void *) noexcept nogil>symbol(
        handle, b"llhttp_settings_init")
    llhttp.execute = <int (*)(void *, const char *, size_t) noexcept nogil>symbol(
        handle, b"llhttp_execute")
    llhttp.errno_name = <const char *(*)(int) noexcept nogil>symbol(
        handle, b"llhttp_errno_name")
    llhttp.get_error_reason = <const char *(*)(const void *) noexcept nogil>symbol(
        handle, b"llhttp_get_error_reason")
    llhttp.get_error_pos = <const char *(*)(const void *) noexcept nogil>symbol(
        handle, b"llhttp_get_error_pos")
    llhttp.should_keep_alive = <int (*)(const void *) noexcept nogil>symbol(
        handle, b"llhttp_should_keep_alive")
    llhttp.get_http_major = <unsigned char (*)(void *) noexcept nogil>symbol(
        handle, b"llhttp_get_http_major")
    llhttp.get_http_minor = <unsigned char (*)(void *) noexcept nogil>symbol(
        handle, b"llhttp_get_http_minor")
    llhttp.get_method = <unsigned char (*)(void *) noexcept nogil>symbol(
        handle, b"llhttp_get_method")
    llhttp.method_name = <const char *(*)(int) noexcept nogil>symbol(
        handle, b"llhttp_method_name")
    llhttp.resume = <void (*)(void *) noexcept nogil>symbol(handle, b"llhttp_resume")
    llhttp.set_lenient_transfer_encoding = <void (*)(void *, int) noexcept nogil>symbol(
        handle, b"llhttp_set_lenient_transfer_encoding")
    global HPE_PAUSED
    for code in range(LLHTTP_ERRNO_MAX):
        if llhttp.errno_name(code) == b"HPE_PAUSED":
            HPE_PAUSED = code
            break
    else:
        raise ImportError("the llhttp inside httptools has no HPE_PAUSED code")
    layout = discover_layout()
    missing = [name for name in ("message_begin", "url", "header_field", "header_value",
                                 "headers_complete", "body", "message_complete")
               if name not in layout]
    if missing:
        raise ImportError(
            f"the llhttp inside httptools {httptools.__version__} has a callback layout "
            f"fastpool does not recognise (no {', '.join(missing)} found); "
            "fastpool needs httptools 0.6.1 or later")
    memset(SETTINGS, 0, sizeof(SETTINGS))
    llhttp.settings_init(SETTINGS)
    SETTINGS[<int>layout["message_begin"]] = <void *>cb_message_begin
    SETTINGS[<int>layout["url"]] = <void *>cb_url
    SETTINGS[<int>layout["header_field"]] = <void *>cb_header_field
    SETTINGS[<int>layout["header_value"]] = <void *>cb_header_value
    SETTINGS[<int>layout["headers_complete"]] = <void *>cb_headers_complete
    SETTINGS[<int>layout["body"]] = <void *>cb_body
    SETTINGS[<int>layout["message_complete"]] = <void *>cb_message_complete
    return 0


bind_llhttp()


cdef str method_of(void *parser):
    cdef int method = llhttp.get_method(parser)
    cdef object name = METHOD_NAMES[method]
    if name is None:
        name = llhttp.method_name(method).decode("ascii")
        METHOD_NAMES[method] = name
    return <str>name


cdef bytes normalise_path(bytes path):
    """A decoded path with ``.`` and ``..`` segments resolved and repeated
    slashes merged (as nginx does), so that no spelling of a path escapes
    its route."""
    cdef list segments = []
    if b"/." not in path and b"//" not in path:
        return path
    for segment in path.split(b"/"):
        if segment == b"" or segment == b".":
            continue
        if segment == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return b"/" + b"/".join(segments) + (b"/" if path.endswith(b"/") and segments else b"")


# ---------------------------------------------------------------- character classes

# RFC 9110 tchar: method tokens, header names, transfer codings, chunk
# extension names and values.
cdef bint TOKEN_CHARS[256]
# RFC 3986 reg-name characters (unreserved and sub-delims; "%" is handled
# apart): a Host value or an absolute-form target's host.
cdef bint HOST_CHARS[256]
# A field value's characters (RFC 9110 5.5): HTAB, SP, VCHAR, obs-text.
cdef bint FIELD_CHARS[256]
# A quoted-string's qdtext (RFC 9110 5.6.4).
cdef bint QDTEXT_CHARS[256]
# Hex digit values, -1 for any other byte.
cdef signed char HEX_VALUES[256]


cdef _init_char_classes():
    cdef int i
    for i in range(256):
        TOKEN_CHARS[i] = False
        HOST_CHARS[i] = False
        FIELD_CHARS[i] = i == 9 or 32 <= i <= 126 or i >= 128
        QDTEXT_CHARS[i] = (i == 9 or i == 32 or i == 33 or 35 <= i <= 91 or 93 <= i <= 126
                           or i >= 128)
        HEX_VALUES[i] = -1
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        TOKEN_CHARS[c] = True
    for c in b"-._~!$&'()*+,;=0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        HOST_CHARS[c] = True
    for i in range(10):
        HEX_VALUES[48 + i] = i          # 0-9
    for i in range(6):
        HEX_VALUES[97 + i] = 10 + i     # a-f
        HEX_VALUES[65 + i] = 10 + i     # A-F


_init_char_classes()


cdef inline bint is_ows(unsigned char c) noexcept:
    return c == 32 or c == 9


cdef inline bytes trim_ows(bytes value):
    """A field value without its leading and trailing SP/HTAB (RFC 9110 5.5:
    they are not part of the value).  llhttp drops the leading ones; the
    trailing ones reach the callbacks."""
    cdef const unsigned char *raw = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(value)
    cdef Py_ssize_t first = 0, last = size
    if size == 0 or not (is_ows(raw[0]) or is_ows(raw[size - 1])):
        return value
    while first < last and is_ows(raw[first]):
        first += 1
    while last > first and is_ows(raw[last - 1]):
        last -= 1
    return PyBytes_FromStringAndSize(<const char *>raw + first, last - first)


# The last Host value found valid: clients send the same one request after
# request, and comparing bytes costs less than checking or hashing them.
cdef bytes LAST_HOST = b""


cdef inline bint same_bytes(bytes a, bytes b) noexcept:
    return (PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b)
            and memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), PyBytes_GET_SIZE(a)) == 0)


cdef void set_last_host(bytes value) noexcept:
    global LAST_HOST
    LAST_HOST = value


cdef bint valid_host(const unsigned char *raw, Py_ssize_t size, bint need_host) noexcept:
    """``uri-host [ ":" port ]`` (RFC 9112 3.2, RFC 3986 3.2.2): a reg-name or
    IPv4 address, or an IP literal in brackets, then digits after a colon.
    ``need_host``: an empty host is invalid (an http(s) URI's authority)."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    if size == 0:
        return not need_host
    if raw[0] == 91:                              # "[" IP-literal "]"
        i = 1
        while i < size and raw[i] != 93:
            if not (HOST_CHARS[raw[i]] or raw[i] == 58):
                return False
            i += 1
        if i == size or i == 1:
            return False
        i += 1
    else:
        while i < size and raw[i] != 58:          # up to ":"
            c = raw[i]
            if c == 37:                           # "%" HEXDIG HEXDIG
                if i + 2 >= size or HEX_VALUES[raw[i + 1]] < 0 or HEX_VALUES[raw[i + 2]] < 0:
                    return False
                i += 3
                continue
            if not HOST_CHARS[c]:
                return False
            i += 1
        if need_host and i == 0:
            return False
    if i < size:
        if raw[i] != 58:
            return False
        i += 1
        while i < size:
            if not 48 <= raw[i] <= 57:
                return False
            i += 1
    return True


cdef bint valid_percent_path(const unsigned char *raw, Py_ssize_t start, Py_ssize_t size) noexcept:
    """Every "%" of the path part (up to "?" or "#") is followed by two hex
    digits (RFC 3986 2.1), as nginx requires of the path it decodes."""
    cdef const unsigned char *hit
    cdef Py_ssize_t i, end = size
    hit = <const unsigned char *>memchr(raw + start, 37, size - start)
    if hit == NULL:
        return True
    for i in range(start, size):
        if raw[i] == 63 or raw[i] == 35:          # "?" or "#": the query is not checked
            end = i
            break
    i = hit - raw
    while i < end:
        if raw[i] == 37 and (i + 2 >= end or HEX_VALUES[raw[i + 1]] < 0
                             or HEX_VALUES[raw[i + 2]] < 0):
            return False
        i += 1
    return True


# ---------------------------------------------------------------- the chunked decoder

# States of HttpConnection.feed_chunked (RFC 9112 7.1):
#   chunked-body = *chunk last-chunk trailer-section CRLF
#   chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
#   chunk-ext    = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
cdef enum ChunkState:
    CH_SIZE_START = 0     # the first hex digit of a size
    CH_SIZE               # more hex digits
    CH_EXT                # after the size or an extension: BWS ";" or CR
    CH_EXT_NAME_START     # after ";": BWS, then a token
    CH_EXT_NAME
    CH_EXT_AFTER_NAME     # BWS, then "=" or ";"
    CH_EXT_VALUE_START    # after "=": BWS, then a token or a quoted string
    CH_EXT_VALUE
    CH_EXT_QUOTED
    CH_EXT_QUOTED_PAIR
    CH_SIZE_LF            # the LF that ends a size line
    CH_DATA
    CH_DATA_CR            # the CRLF after a chunk's data
    CH_DATA_LF
    CH_TRAILER_START      # a trailer field, or the CR of the final CRLF
    CH_TRAILER_NAME
    CH_TRAILER_VALUE
    CH_TRAILER_LF
    CH_END_LF             # the LF that ends the message


# ---------------------------------------------------------------- routing

@cython.final
cdef class Router:
    """The server's routes, as seen from one worker (see _http.pxd)."""

    def __init__(self, routes, int local_group, health_path=None):
        """``routes``: (prefix str, group index) pairs."""
        self.local_group = local_group
        self.prefixes = sorted(
            ((normalise_path(prefix.encode("utf-8")).rstrip(b"/"), group)
             for prefix, group in routes), key=lambda entry: -len(entry[0]))
        self.cache = {}
        self.health = health_path.encode("latin-1") if health_path else None

    def group_for(self, bytes target, int home=-1):
        """The group index for a request-target (for tests and tools)."""
        return self.route(target, home)

    cdef int route(self, bytes target, int home) except -2:
        cdef object cached = self.cache.get(target)
        cdef bytes path, prefix
        cdef int group = -1
        if cached is not None:
            group = <int>cached
        else:
            if self.health is not None and is_health_target(self.health, target):
                return self.local_group
            path = normalise_path(<bytes>split_request_target(target)[0])
            for prefix, routed in self.prefixes:
                # Whole segments: /tast matches /tast and /tast/x, not /tasty.
                if path.startswith(prefix) and (
                        PyBytes_GET_SIZE(path) == PyBytes_GET_SIZE(prefix)
                        or PyBytes_AS_STRING(path)[PyBytes_GET_SIZE(prefix)] == 47):   # "/"
                    group = routed
                    break
            remember(self.cache, target, group, ROUTE_CACHE_SIZE)
        if group < 0:
            return home if home >= 0 else self.local_group
        return group


cdef class HttpConnection:
    """Parser glue: llhttp for request lines and header fields (and
    Content-Length bodies), the core for the rules llhttp leaves open and for
    chunked bodies.

    How ``feed`` walks the bytes (every state change is here or in the event
    methods it names):

    * ``MODE_HEAD``: llhttp runs.  Its callbacks call the event methods.  At a
      message's first byte ``message_begin`` records where the message starts
      (from ``boundary`` when the message starts this read, else by pausing
      llhttp), so that the message's bytes can be handed over (routes) or its
      method re-read (below).  At the end of a head, ``headers_complete``
      checks it (``check_head``) and either hands the connection over
      (``PAUSE_HANDOFF``), or switches to ``MODE_CHUNKED`` (``PAUSE_BODY``), or
      lets llhttp read a Content-Length body.
    * ``MODE_CHUNKED``: ``feed_chunked`` decodes the body and its trailer
      section (parsed and dropped: trailers never reach the app's headers,
      RFC 9110 6.5.1), then llhttp, reset, goes on with the next message.
      llhttp never frames a chunked body, so what it would refuse or read
      differently (whitespace in the Transfer-Encoding list, chunk extensions
      with whitespace) is decided here, by RFC 9112.
    * ``MODE_METHOD``: llhttp knows a fixed set of methods; any other token
      (``QUERY``, ``get``, ``X_Y.Z~1``) makes it fail at the method.  The token
      is then read here (``custom_method``), llhttp is reset and fed a stand-in
      method, and the request carries the real one.

    A protocol error ends parsing for good: ``fail`` records the status, and
    nothing after it is parsed.
    """

    def __cinit__(self):
        self.box = <ParserBox *>PyMem_Malloc(sizeof(ParserBox))
        if self.box == NULL:
            raise MemoryError()
        self.box.owner = <void *>self
        self.reset_parser()

    def __dealloc__(self):
        PyMem_Free(self.box)

    def __init__(self, Limits limits not None):
        self.limits = limits
        self.pending = []
        self.handoff_group = -1
        self.message_offset = -1

    def parse(self, bytes data):
        """Feed bytes from Python (tests and tools; workers call feed)."""
        self.feed(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    # ---- hooks for the worker kind (WSGI, ASGI)

    cdef Request new_request(self):
        return Request()

    cdef int add_header(self, Request request, bytes name, bytes value) except -1:
        return 0

    cdef int finish_head(self, Request request) except -1:
        return 0

    # ---- state

    cdef int reset_parser(self) except -1:
        """llhttp back to the start of a message.  Its Transfer-Encoding
        leniency only lets a list llhttp would refuse reach ``check_head``,
        which decides; llhttp never frames such a body itself."""
        llhttp.init(self.box.state, HTTP_REQUEST, SETTINGS)
        llhttp.set_lenient_transfer_encoding(self.box.state, 1)
        return 0

    cdef int fail(self, int status, str reason) noexcept:
        """Record a protocol error; returns STOP, which an event method returns
        so that its callback stops llhttp."""
        if not self.error_status:
            self.error_status = status
            self.error_reason = reason
        self.stop_reading = True
        return STOP

    cdef bint at_message_boundary(self):
        """True when no request is partly received."""
        return self.current is None

    # ---- parser events

    cdef int message_begin(self) except -1:
        cdef Request request = self.new_request()
        cdef const char *first
        if self.substituting:
            # The stand-in method of a custom one: the same message goes on.
            request.started = self.current.started
            self.current = request
            return 0
        request.started = monotonic()
        self.current = request
        self.completed = None
        self.url = None
        self.field_name = None
        self.field_value = None
        self.header_count = 0
        self.host_count = 0
        self.te_present = False
        self.te_members = 0
        self.te_chunked = 0
        self.te_last_chunked = False
        self.upgrade_field = False
        self.carry = None
        if self.boundary != NULL:
            # The first message of this read: it starts at its first byte
            # that is not CR or LF (llhttp skips empty lines between messages).
            first = self.boundary
            while first < self.feed_end and (first[0] == 13 or first[0] == 10):
                first += 1
            self.message_offset = first - self.feed_start
            self.boundary = NULL
            return 0
        # Another message in the same read: pause so that feed learns where.
        self.pause_reason = PAUSE_BEGIN
        return PAUSE

    cdef int url_span(self, const char *at, size_t size) except -1:
        cdef Py_ssize_t limit = self.limits.request_line
        cdef bytes piece = PyBytes_FromStringAndSize(at, size)
        cdef Py_ssize_t method_size
        # One span per request unless the URL is split across reads.
        self.url = piece if self.url is None else self.url + piece
        # The request line is METHOD SP URL SP HTTP/1.x: the URL plus 10 bytes
        # plus the method, without the CRLF.  llhttp's methods are at most
        # LLHTTP_METHOD_MAX long, so theirs is looked up only when even that
        # length could make the line too long.
        if limit:
            if self.method_override is not None:
                method_size = len(self.method_override)
            elif PyBytes_GET_SIZE(self.url) + 10 + LLHTTP_METHOD_MAX > limit:
                method_size = len(method_of(self.box.state))
            else:
                return 0
            if PyBytes_GET_SIZE(self.url) + 10 + method_size > limit:
                return self.fail(414, "request line too long")
        return 0

    cdef int field_span(self, const char *at, size_t size) except -1:
        cdef bytes piece = PyBytes_FromStringAndSize(at, size)
        if self.field_value is not None:
            if self.header_complete():
                return STOP
        if self.field_name is None:
            self.field_name = piece
        else:
            self.field_name += piece
        if self.limits.request_field_size and (
                PyBytes_GET_SIZE(self.field_name) + 2 > self.limits.request_field_size):
            return self.fail(431, "header field too large")
        return 0

    cdef int value_span(self, const char *at, size_t size) except -1:
        cdef bytes piece = PyBytes_FromStringAndSize(at, size)
        if self.field_value is None:
            self.field_value = piece
        else:
            self.field_value += piece
        # Checked as the bytes arrive, so a value that never ends is refused
        # as soon as it is too long.
        if self.limits.request_field_size and (
                PyBytes_GET_SIZE(self.field_name or b"") + PyBytes_GET_SIZE(self.field_value)
                + 2 > self.limits.request_field_size):
            return self.fail(431, "header field too large")
        return 0

    cdef int header_complete(self) except -1:
        """One header field is in: the fields the core must understand are
        looked at here; every field goes to ``add_header``."""
        cdef Request request = self.current
        cdef Limits limits = self.limits
        cdef bytes name = self.field_name if self.field_name is not None else b""
        cdef bytes value = trim_ows(self.field_value) if self.field_value is not None else b""
        cdef Py_ssize_t size
        self.field_name = None
        self.field_value = None
        self.header_count += 1
        if limits.request_fields and self.header_count > limits.request_fields:
            return self.fail(431, "too many header fields")
        # The fields the core reads, told apart by length first (one compare
        # for most fields).
        size = PyBytes_GET_SIZE(name)
        if size == 4 and name_is(name, b"host", 4):
            self.host_count += 1
            if self.host_count > 1:
                return self.fail(400, "more than one Host field")
            if not same_bytes(value, LAST_HOST):
                if not valid_host(<const unsigned char *>PyBytes_AS_STRING(value),
                                  PyBytes_GET_SIZE(value), False):
                    return self.fail(400, "invalid Host")
                set_last_host(value)
        elif size == 14 and name_is(name, b"content-length", 14):
            # llhttp has refused a second Content-Length, a list and any
            # Content-Length beside Transfer-Encoding.
            request.content_length = parse_length(value)
            if request.content_length < 0:
                return self.fail(400, "invalid Content-Length")
            if limits.request_body and request.content_length > limits.request_body:
                return self.fail(413, "request body too large")
        elif size == 17 and name_is(name, b"transfer-encoding", 17):
            self.read_transfer_codings(value)
        elif size == 6 and name_is(name, b"expect", 6):
            if value.lower() == b"100-continue":
                request.expect_continue = True
        elif size == 7 and name_is(name, b"upgrade", 7):
            self.upgrade_field = True
        self.add_header(request, name, value)
        return 0

    cdef int read_transfer_codings(self, bytes value) except -1:
        """Count the members of a Transfer-Encoding list (several fields make
        one list): whitespace around members and empty members are allowed
        (RFC 9110 5.6.1); check_head decides."""
        cdef bytes member
        self.te_present = True
        for member in value.split(b","):
            member = trim_ows(member)
            if not member:
                continue
            self.te_members += 1
            self.te_last_chunked = member.lower() == b"chunked"
            if self.te_last_chunked:
                self.te_chunked += 1
        return 0

    cdef int headers_complete(self) except -1:
        cdef Request request = self.current
        cdef void *state = self.box.state
        if self.field_name is not None:
            if self.header_complete():
                return STOP
        if llhttp.get_http_major(state) != 1 or llhttp.get_http_minor(state) > 1:
            return self.fail(505, "HTTP version not supported")
        request.http_minor = llhttp.get_http_minor(state)
        if self.method_override is not None:
            request.method = self.method_override
            self.method_override = None
            self.llhttp_method = -1
        else:
            request.method = method_of(state)
            self.llhttp_method = llhttp.get_method(state)
        request.keep_alive = llhttp.should_keep_alive(state)
        request.target = self.url if self.url is not None else b""
        request.head_complete = True
        # The common head (HTTP/1.1, one Host, no Transfer-Encoding, a known
        # method other than CONNECT, an origin-form target without "%")
        # passes check_head's rules as they are written there; only the rest
        # goes through it.
        if not (self.host_count == 1 and not self.te_present and request.http_minor == 1
                and self.llhttp_method >= 0 and self.llhttp_method != HTTP_CONNECT
                and PyBytes_GET_SIZE(request.target) and PyBytes_AS_STRING(request.target)[0] == 47
                and memchr(PyBytes_AS_STRING(request.target), 37,
                           PyBytes_GET_SIZE(request.target)) == NULL) and self.check_head(request):
            return STOP
        if self.router is not None and self.route(request):
            self.pause_reason = PAUSE_HANDOFF
            return PAUSE
        # A request without a body is complete now; message_complete also says so.
        if request.content_length <= 0 and not request.chunked:
            request.body_complete = True
        self.finish_head(request)
        self.pending.append(request)
        if request.chunked:
            self.pause_reason = PAUSE_BODY
            return PAUSE
        return 0

    cdef int check_head(self, Request request) except -1:
        """The head's rules llhttp does not enforce; True (after fail) when
        the request is refused."""
        if self.llhttp_method == HTTP_CONNECT:
            # No tunnels here; the app never sees one (RFC 9110 9.3.6).
            return self.fail(501, "CONNECT is not supported")
        if self.te_present:
            if request.http_minor == 0:
                # RFC 9112 6.1: faulty framing; refusing it closes the connection.
                return self.fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            if self.te_chunked != 1 or not self.te_last_chunked:
                # RFC 9112 6.3: chunked must be the final coding, and once.
                return self.fail(400, "invalid Transfer-Encoding")
            if self.te_members > 1:
                return self.fail(501, "unsupported Transfer-Encoding")
            request.chunked = True
        if self.host_count == 0 and request.http_minor == 1:
            return self.fail(400, "missing Host")     # RFC 9112 3.2
        if request.http_minor == 0:
            request.expect_continue = False           # RFC 9110 10.1.1
        return self.check_target(request)

    cdef int check_target(self, Request request) except -1:
        """The request-target's form (RFC 9112 3.2): origin-form, absolute-form
        (http/https, a host, no userinfo), "*" for OPTIONS only; and a valid
        percent-encoding in the path.  True (after fail) when refused."""
        cdef bytes target = request.target
        cdef const unsigned char *raw = <const unsigned char *>PyBytes_AS_STRING(target)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(target)
        cdef Py_ssize_t i = 0, start
        if size == 0:
            return self.fail(400, "empty request target")
        if raw[0] == 47:                                  # "/": origin-form
            if not valid_percent_path(raw, 0, size):
                return self.fail(400, "invalid percent-encoding in the path")
            return 0
        if raw[0] == 42:                                  # "*": asterisk-form
            if size == 1 and request.method == "OPTIONS":
                return 0
            return self.fail(400, "the asterisk form is for OPTIONS only")
        # absolute-form: scheme "://" authority path-abempty [ "?" query ]
        while i < size and (TOKEN_CHARS[raw[i]] and raw[i] != 58):
            i += 1
        if (i + 3 > size or raw[i] != 58 or raw[i + 1] != 47 or raw[i + 2] != 47
                or target[:i].lower() not in (b"http", b"https")):
            return self.fail(400, "invalid request target")
        start = i + 3
        i = start
        while i < size and raw[i] != 47 and raw[i] != 63 and raw[i] != 35:
            if raw[i] == 64:                              # "@"
                return self.fail(400, "userinfo in the request target")
            i += 1
        if not valid_host(raw + start, i - start, True):
            return self.fail(400, "invalid host in the request target")
        if not valid_percent_path(raw, i, size):
            return self.fail(400, "invalid percent-encoding in the path")
        request.authority = target[start:i]
        return 0

    cdef int body_span(self, const char *at, size_t size) except -1:
        cdef Request request = self.current
        request.body_received += size
        if self.limits.request_body and request.body_received > self.limits.request_body:
            return self.fail(413, "request body too large")
        request.append_body(PyBytes_FromStringAndSize(at, size))
        return 0

    cdef int message_complete(self) except -1:
        self.current.body_complete = True
        self.completed = self.current
        self.current = None
        return 0

    cdef int route(self, Request request) except -1:
        """True (and the handoff recorded) when ``request`` belongs to another group."""
        cdef int group = self.router.route(request.target, self.home_group)
        if group == self.router.local_group:
            return False
        self.handoff_group = group
        self.handoff_started = request.started
        self.stop_reading = True
        self.current = None
        return True

    cdef int set_upgrade(self, Request request, bytes data) except -1:
        """The message of ``request`` asked for another protocol: what follows
        (``data``) is not HTTP.  The worker either switches to it (ASGI
        WebSocket), or answers the request and closes."""
        self.upgrade_data = data
        request.upgrade = True
        request.keep_alive = False
        request.body_complete = True
        self.current = None
        self.stop_reading = True
        return 0

    cdef int keep_head(self, const char *start, Py_ssize_t size) except -1:
        """At the end of a read: keep the bytes of a head that is not complete
        yet when they may be needed again -- the whole head with routes (the
        request may be handed over once its path is known), else while the
        method is not known (custom_method re-reads it)."""
        cdef Request current = self.current
        cdef Py_ssize_t offset = self.message_offset if self.message_offset >= 0 else 0
        if (self.mode == MODE_METHOD or current is not None and not current.head_complete
                and (self.router is not None
                     or self.url is None and self.method_override is None)):
            if self.carry is None:
                self.carry = bytearray()
            extend(self.carry, start + offset, size - offset)
        else:
            self.carry = None
        self.message_offset = -1
        return 0

    cdef bytes message_bytes(self, const char *start, const char *end):
        """The current message's bytes: those carried from earlier reads, then
        this read's from where the message (or what is not carried) starts."""
        cdef const char *first = start + (self.message_offset if self.message_offset >= 0 else 0)
        cdef bytes tail = PyBytes_FromStringAndSize(first, end - first)
        if self.carry:
            return bytes(self.carry) + tail
        return tail

    # ---- feeding

    cdef int feed(self, const char *start, Py_ssize_t size) except -1:
        """Parse ``size`` received bytes (read straight from the caller's
        buffer: nothing is copied but what a request keeps)."""
        cdef const char *position = start
        cdef const char *end = start + size
        cdef const char *pause
        cdef const char *first
        cdef int code
        cdef str name
        cdef PauseReason reason
        cdef Request request
        if self.stop_reading:
            return 0      # nothing after an error, a handoff, an upgrade or a close is HTTP
        self.feed_start = start
        self.feed_end = end
        self.boundary = start if self.current is None and self.mode == MODE_HEAD else NULL
        while True:
            if self.mode == MODE_CHUNKED:
                if position == end:
                    break
                position = self.feed_chunked(position, end)
                if position == NULL:
                    return self.parse_failed()
                if self.mode == MODE_CHUNKED or self.stop_reading:
                    break
                self.boundary = position          # the next message starts here
                continue
            if self.mode == MODE_METHOD:
                if position == end:
                    break
                position = self.custom_method(start, position, end)
                if position == NULL:
                    return self.parse_failed()
                if self.mode == MODE_METHOD:
                    break
                continue
            code = llhttp.execute(self.box.state, position, end - position)
            if self.callback_error is not None:
                error = self.callback_error
                self.callback_error = None
                raise error
            if code == 0:
                break
            if code == HPE_PAUSED:
                pause = llhttp.get_error_pos(self.box.state)
                reason = self.pause_reason
                self.pause_reason = PAUSE_NONE
                if reason == PAUSE_BEGIN:
                    llhttp.resume(self.box.state)
                    self.message_offset = pause - start
                    position = pause
                    continue
                if reason == PAUSE_HANDOFF:
                    self.handoff_data = self.message_bytes(start, end)
                    self.carry = None
                    return 0
                # PAUSE_BODY: the core decodes the chunked body from here.
                self.reset_parser()
                self.mode = MODE_CHUNKED
                self.chunk_state = CH_SIZE_START
                self.chunk_remaining = 0
                self.chunk_line = 0
                self.chunk_space = False
                self.trailer_count = 0
                position = pause
                continue
            name = errno_name(code)
            if name == "HPE_PAUSED_UPGRADE":
                pause = llhttp.get_error_pos(self.box.state)
                request = self.completed if self.completed is not None else self.current
                if request is None or not request.head_complete:
                    self.fail(400, "invalid upgrade request")
                    return self.parse_failed()
                self.set_upgrade(request, PyBytes_FromStringAndSize(pause, end - pause)
                                 if pause != NULL and start <= pause <= end else b"")
                return 0
            if (name == "HPE_INVALID_METHOD" and self.current is not None and self.url is None
                    and not self.error_status):
                # A method llhttp does not know: maybe a token all the same.
                pause = llhttp.get_error_pos(self.box.state)
                if pause == NULL or not start <= pause <= end:
                    pause = position
                if self.carry is None:
                    self.carry = bytearray()
                first = start + (self.message_offset if self.message_offset >= 0 else 0)
                extend(self.carry, first, pause - first)
                self.message_offset = pause - start
                self.mode = MODE_METHOD
                position = pause
                continue
            if name == "HPE_CLOSED_CONNECTION":
                # Bytes after a request that closes the connection (Connection:
                # close, HTTP/1.0): never read as a request (RFC 9112 9.6).
                self.stop_reading = True
                return 0
            if not self.error_status:
                self.error_reason = llhttp.get_error_reason(self.box.state).decode("latin-1")
                self.error_status = parser_error_status(name, self.error_reason)
                if self.error_status == 400 and self.error_reason == "Content-Length overflow" \
                        and self.limits.request_body:
                    self.error_status = 413    # larger than any limit, whatever its digits
            return self.parse_failed()
        if self.current is None and self.mode == MODE_HEAD:
            self.carry = None             # (the common case: every message of the read is whole)
            self.message_offset = -1
        else:
            self.keep_head(start, size)
        return 0

    cdef int parse_failed(self) except -1:
        """The stream can no longer be trusted: nothing more is parsed, and
        the request being received is never dispatched."""
        self.stop_reading = True
        if (self.current is not None and self.pending
                and self.pending[len(self.pending) - 1] is self.current):
            self.pending.pop()
        self.current = None
        self.carry = None
        return 0

    cdef const char *custom_method(self, const char *start, const char *position,
                                   const char *end) except? NULL:
        """MODE_METHOD: collect the method token into ``carry`` up to its SP,
        then let llhttp parse the rest of the request behind a stand-in
        method.  Returns where parsing goes on, or NULL after fail."""
        cdef const char *cursor = position
        cdef Py_ssize_t limit = self.limits.request_line
        cdef int code
        while cursor < end and TOKEN_CHARS[<unsigned char>cursor[0]]:
            cursor += 1
        extend(self.carry, position, cursor - position)
        self.message_offset = cursor - start
        if limit and PyByteArray_GET_SIZE(self.carry) > limit:
            self.fail(414, "request line too long")
            return NULL
        if cursor == end:
            return end                                    # the token goes on in the next read
        if cursor[0] != 32 or PyByteArray_GET_SIZE(self.carry) == 0:
            self.fail(400, "invalid method")
            return NULL
        self.method_override = self.carry.decode("latin-1")
        self.mode = MODE_HEAD
        self.reset_parser()
        self.substituting = True
        try:
            code = llhttp.execute(self.box.state, "GET", 3)
        finally:
            self.substituting = False
        if self.callback_error is not None:
            error = self.callback_error
            self.callback_error = None
            raise error
        if code != 0:
            self.fail(400, "invalid method")
            return NULL
        return cursor

    cdef const char *feed_chunked(self, const char *position,
                                  const char *end) except? NULL:
        """MODE_CHUNKED: decode a chunked body and its trailer section (see
        ChunkState).  Returns where the next message starts, or ``end`` when
        the body goes on in the next read, or NULL after fail."""
        cdef const char *p = position
        cdef unsigned char c
        cdef int digit
        cdef long long size
        cdef Limits limits = self.limits
        cdef Request request = self.current
        cdef int state
        while p < end:
            state = self.chunk_state
            if state == CH_DATA:
                size = min(self.chunk_remaining, end - p)
                if self.body_span(p, size):
                    return NULL
                p += size
                self.chunk_remaining -= size
                if self.chunk_remaining == 0:
                    self.chunk_state = CH_DATA_CR
                continue
            c = <unsigned char>p[0]
            p += 1
            if state <= CH_SIZE_LF:
                self.chunk_line += 1
                if self.chunk_line > CHUNK_LINE_LIMIT:
                    self.fail(400, "chunk size line too long")
                    return NULL
            if state == CH_SIZE_START or state == CH_SIZE:
                digit = HEX_VALUES[c]
                if digit >= 0:
                    if self.chunk_remaining >= CHUNK_SIZE_LIMIT >> 4:
                        self.fail(400, "chunk size overflow")
                        return NULL
                    self.chunk_remaining = self.chunk_remaining * 16 + digit
                    self.chunk_state = CH_SIZE
                    continue
                if state == CH_SIZE_START:
                    self.fail(400, "invalid chunk size")
                    return NULL
                self.chunk_state = CH_EXT
                p -= 1
                self.chunk_line -= 1
                continue
            if state == CH_EXT:
                if is_ows(c):
                    self.chunk_space = True
                elif c == 59:                             # ";"
                    self.chunk_space = False
                    self.chunk_state = CH_EXT_NAME_START
                elif c == 13 and not self.chunk_space:
                    self.chunk_state = CH_SIZE_LF
                else:
                    self.fail(400, "invalid chunk size line")
                    return NULL
            elif state == CH_EXT_NAME_START:
                if TOKEN_CHARS[c]:
                    self.chunk_state = CH_EXT_NAME
                elif not is_ows(c):
                    self.fail(400, "invalid chunk extension")
                    return NULL
            elif state == CH_EXT_NAME:
                if TOKEN_CHARS[c]:
                    pass
                elif is_ows(c):
                    self.chunk_state = CH_EXT_AFTER_NAME
                elif c == 61:                             # "="
                    self.chunk_state = CH_EXT_VALUE_START
                elif c == 59:
                    self.chunk_state = CH_EXT_NAME_START
                elif c == 13:
                    self.chunk_state = CH_SIZE_LF
                else:
                    self.fail(400, "invalid chunk extension")
                    return NULL
            elif state == CH_EXT_AFTER_NAME:
                if c == 61:
                    self.chunk_state = CH_EXT_VALUE_START
                elif c == 59:
                    self.chunk_state = CH_EXT_NAME_START
                elif not is_ows(c):
                    self.fail(400, "invalid chunk extension")
                    return NULL
            elif state == CH_EXT_VALUE_START:
                if c == 34:                               # '"'
                    self.chunk_state = CH_EXT_QUOTED
                elif TOKEN_CHARS[c]:
                    self.chunk_state = CH_EXT_VALUE
                elif not is_ows(c):
                    self.fail(400, "invalid chunk extension")
                    return NULL
            elif state == CH_EXT_VALUE:
                if TOKEN_CHARS[c]:
                    pass
                elif is_ows(c):
                    self.chunk_space = True
                    self.chunk_state = CH_EXT
                elif c == 59:
                    self.chunk_state = CH_EXT_NAME_START
                elif c == 13:
                    self.chunk_state = CH_SIZE_LF
                else:
                    self.fail(400, "invalid chunk extension")
                    return NULL
            elif state == CH_EXT_QUOTED:
                if c == 34:
                    self.chunk_state = CH_EXT
                elif c == 92:                             # "\\"
                    self.chunk_state = CH_EXT_QUOTED_PAIR
                elif not QDTEXT_CHARS[c]:
                    self.fail(400, "invalid chunk extension")
                    return NULL
            elif state == CH_EXT_QUOTED_PAIR:
                if not FIELD_CHARS[c]:
                    self.fail(400, "invalid chunk extension")
                    return NULL
                self.chunk_state = CH_EXT_QUOTED
            elif state == CH_SIZE_LF:
                if c != 10:
                    self.fail(400, "missing LF after the chunk size")
                    return NULL
                self.chunk_line = 0
                if self.chunk_remaining == 0:
                    self.chunk_state = CH_TRAILER_START
                else:
                    if limits.request_body and (
                            request.body_received + self.chunk_remaining > limits.request_body):
                        self.fail(413, "request body too large")
                        return NULL
                    self.chunk_state = CH_DATA
            elif state == CH_DATA_CR:
                if c != 13:
                    self.fail(400, "missing CRLF after chunk data")
                    return NULL
                self.chunk_state = CH_DATA_LF
            elif state == CH_DATA_LF:
                if c != 10:
                    self.fail(400, "missing CRLF after chunk data")
                    return NULL
                self.chunk_state = CH_SIZE_START
                self.chunk_line = 0
                self.chunk_space = False
            elif state == CH_TRAILER_START:
                if c == 13:
                    self.chunk_state = CH_END_LF
                elif TOKEN_CHARS[c]:
                    self.trailer_count += 1
                    if limits.request_fields and (
                            self.header_count + self.trailer_count > limits.request_fields):
                        self.fail(431, "too many header fields")
                        return NULL
                    self.chunk_line = 1
                    self.chunk_state = CH_TRAILER_NAME
                else:
                    # Whitespace here would be obs-fold; anything else is garbage.
                    self.fail(400, "invalid trailer field")
                    return NULL
            elif state == CH_TRAILER_NAME or state == CH_TRAILER_VALUE:
                self.chunk_line += 1
                if limits.request_field_size and self.chunk_line + 2 > limits.request_field_size:
                    self.fail(431, "header field too large")
                    return NULL
                if state == CH_TRAILER_NAME:
                    if c == 58:                           # ":"
                        self.chunk_state = CH_TRAILER_VALUE
                    elif not TOKEN_CHARS[c]:
                        self.fail(400, "invalid trailer field")
                        return NULL
                elif c == 13:
                    self.chunk_state = CH_TRAILER_LF
                elif not FIELD_CHARS[c]:
                    self.fail(400, "invalid trailer field")
                    return NULL
            elif state == CH_TRAILER_LF:
                if c != 10:
                    self.fail(400, "missing LF after a trailer field")
                    return NULL
                self.chunk_state = CH_TRAILER_START
            elif state == CH_END_LF:
                if c != 10:
                    self.fail(400, "missing LF at the end of the chunked body")
                    return NULL
                # The message is complete; llhttp (reset) reads the next one.
                self.mode = MODE_HEAD
                self.message_complete()
                if self.upgrade_field:
                    # Nothing after an upgrade request is HTTP.
                    self.set_upgrade(request, PyBytes_FromStringAndSize(p, end - p))
                return p
        return end


cdef long long parse_length(bytes value):
    """A Content-Length value (llhttp has checked its syntax), or -1."""
    cdef const char *raw = PyBytes_AS_STRING(value)
    cdef Py_ssize_t i, size = PyBytes_GET_SIZE(value)
    cdef long long number = 0
    if size == 0 or size > 18:
        return -1
    for i in range(size):
        if not 48 <= raw[i] <= 57:
            return -1
        number = number * 10 + (raw[i] - 48)
    return number


cdef int parser_error_status(str name, str reason):
    """The status for an llhttp error: its code, refined by its reason where
    llhttp uses one code for several faults."""
    if name == "HPE_PAUSED_H2_UPGRADE" or (
            name == "HPE_INVALID_VERSION" and reason.startswith("Invalid")):
        return 505      # "Invalid HTTP version", "Invalid major version", ...
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


cdef dict CODE_LINES = {}


cdef bytes status_line_of(object code):
    """``b"HTTP/1.1 200 OK\\r\\n"`` for a status given as an int (ASGI); cached."""
    cdef bytes line = CODE_LINES.get(code)
    cdef str phrase
    if line is not None:
        return line
    if type(code) is not int or not 100 <= code <= 999:
        raise ValueError(f"invalid ASGI response status {code!r}: expected an int 100-999")
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return remember(CODE_LINES, code, f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1"),
                    STATUS_CACHE_SIZE)


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
    return remember(STATUS_LINES, status,
                    (b"HTTP/1.1 " + status.encode("latin-1") + b"\r\n", code),
                    STATUS_CACHE_SIZE)


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
# lines, one table for WSGI's str headers and one for ASGI's bytes headers.
# Apps send the same few headers on every response, so encoding and
# validating them once is the common case.  Bounded so varying values
# (cookies, ETags) cannot grow them without limit.
cdef dict STR_HEADER_LINES = {}
cdef dict BYTES_HEADER_LINES = {}


cdef tuple encode_header(bytes raw_name, bytes raw_value):
    cdef Py_ssize_t size = PyBytes_GET_SIZE(raw_name)
    cdef int kind = PLAIN
    cdef long long number = 0
    check_header(raw_name, raw_value)
    if size == 14 and name_is(raw_name, b"content-length", 14):
        if not raw_value.strip().isdigit():
            raise ValueError(f"invalid Content-Length {raw_value.decode('latin-1')!r}")
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


cdef int append_header(HeadBuf *head, dict cache, object name, object value,
                       HeadFlags *flags) except -1:
    """Validate one header (both str or both bytes) and append ``name: value\\r\\n``."""
    cdef dict by_value
    cdef tuple entry = None
    cdef object line
    cdef int kind
    by_value = cache.get(name)
    if by_value is not None:
        entry = by_value.get(value)
    if entry is None:
        if type(name) is str:
            entry = encode_header(name.encode("latin-1"), value.encode("latin-1"))
        else:
            entry = encode_header(name, value)
        if by_value is None:
            by_value = remember(cache, name, {}, RESPONSE_HEADER_NAMES)
        remember(by_value, value, entry, RESPONSE_HEADER_VALUES)
    line = entry[0]
    kind = entry[1]
    if kind == CONTENT_LENGTH:
        flags.content_length = entry[2]
        if flags.no_length:
            return 0
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


cdef int append_str_header(HeadBuf *head, object name, object value,
                           HeadFlags *flags) except -1:
    """A WSGI header: a (str, str) pair."""
    if type(name) is not str or type(value) is not str:
        raise TypeError(f"header name and value must be str, got {name!r}: {value!r}")
    return append_header(head, STR_HEADER_LINES, name, value, flags)


cdef int append_bytes_header(HeadBuf *head, object name, object value,
                             HeadFlags *flags) except -1:
    """An ASGI header: a pair of byte strings."""
    if type(name) is not bytes:
        if not isinstance(name, (bytes, bytearray)):
            raise TypeError(f"header name and value must be bytes, got {name!r}: {value!r}")
        name = bytes(name)
    if type(value) is not bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"header name and value must be bytes, got {name!r}: {value!r}")
        value = bytes(value)
    return append_header(head, BYTES_HEADER_LINES, name, value, flags)


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


# ---------------------------------------------------------------- framing

cdef void framing_reset(Framing *framing) noexcept:
    framing.status_code = 0
    framing.served_by = SERVED_APP
    framing.declared_length = -1
    framing.body_sent = 0
    framing.headers_sent = False
    framing.chunked = False
    framing.body_suppressed = False
    framing.close = False


cdef void flags_reset(HeadFlags *flags) noexcept:
    flags.content_length = -1
    flags.no_length = False
    flags.has_date = False
    flags.has_server = False
    flags.connection_close = False
    flags.has_transfer_encoding = False


cdef int end_head(HeadBuf *head, Framing *framing, HeadFlags *flags, Request request,
                  int code, long long body_length, bint reusable) except -1:
    """Finish a head whose status line and app headers are in ``head``: add
    Server and Date unless the app set them, decide how the body is delimited,
    and whether the connection survives.

    ``body_length``: the whole body's size when the server knows it, else -1.
    ``reusable``: the worker keeps connections (it is not stopping, and
    keep-alive is on)."""
    framing.status_code = code
    if not flags.has_server:
        head_put(head, b"Server: fastpool\r\n", 18)
    if not flags.has_date:
        head_put_bytes(head, _date_header)
    if code < 200 or code == 204 or code == 304:
        framing.body_suppressed = True
        framing.declared_length = 0
    elif flags.content_length >= 0:
        framing.declared_length = flags.content_length
    elif body_length >= 0:
        put_content_length(head, body_length)
        framing.declared_length = body_length
    elif request.http_minor == 1:
        head_put(head, b"Transfer-Encoding: chunked\r\n", 28)
        framing.chunked = True
    else:
        framing.close = True   # HTTP/1.0 without a length: close-delimited
    if request.method == "HEAD":
        framing.body_suppressed = True
        framing.chunked = False
    # A body the app left unread cannot be skipped safely: close after it.
    if (flags.connection_close or not request.keep_alive or not reusable
            or not request.body_complete):
        framing.close = True
    if framing.close:
        head_put(head, b"Connection: close\r\n", 19)
    elif request.http_minor == 0:
        head_put(head, b"Connection: keep-alive\r\n", 24)
    head_put(head, b"\r\n", 2)
    framing.headers_sent = True
    return 0


cdef int queue_head(OutBuffer out, Framing *framing, Request request, bytes line, int code,
                    object headers, bint asgi, long long body_length,
                    bint reusable) except -1:
    """Serialise a response head (status ``line``, the app's ``headers``: str
    pairs for WSGI, byte pairs for ASGI) into ``out``, framed by end_head.
    Nothing is queued unless every header is valid."""
    cdef HeadFlags flags
    cdef char stack[HEAD_STACK]
    cdef HeadBuf head
    flags_reset(&flags)
    flags.no_length = code < 200 or code == 204
    head_init(&head, stack, HEAD_STACK)
    try:
        head_put_bytes(&head, line)
        for name, value in headers:
            if asgi:
                append_bytes_header(&head, name, value, &flags)
            else:
                append_str_header(&head, name, value, &flags)
        if flags.has_transfer_encoding and not asgi:
            raise ValueError("an app must not set Transfer-Encoding (PEP 3333 hop-by-hop)")
        end_head(&head, framing, &flags, request, code, body_length, reusable)
        out.write_raw(head.data, head.length)
    finally:
        head_free(&head)
    return 0


cdef bint frame_body(OutBuffer out, Framing *framing, object data) except -1:
    """Queue one piece of body (bytes) as the framing says.  Returns True the
    first time the app sends more than its Content-Length: the excess is
    dropped and the connection will close, so it cannot pass for a next
    response; the caller says so in the log."""
    cdef long long size = PyBytes_GET_SIZE(data)
    cdef long long allowed
    cdef bint overrun = False
    if size == 0 or framing.body_suppressed:
        return False
    if framing.declared_length >= 0:
        allowed = framing.declared_length - framing.body_sent
        if size > allowed:
            overrun = not framing.close
            framing.close = True
            data = data[:allowed]
            size = allowed
            if size == 0:
                return overrun
    framing.body_sent += size
    if framing.chunked:
        append_chunk(out, data)
    else:
        out.write(data)
    return overrun


cdef int end_body(OutBuffer out, Framing *framing) except -1:
    """The app's body is complete."""
    if framing.chunked:
        out.write_raw(b"0\r\n\r\n", 5)
    elif framing.declared_length > framing.body_sent and not framing.body_suppressed:
        # Shorter than announced: the client would wait for the rest.
        framing.close = True
    return 0


# ---------------------------------------------------------------- output buffer


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
        if not self.chunks and self.buf_end + size <= OUT_BUFFER_LIMIT:
            if self.buf_end + size > self.buf_capacity:
                if self.buf_start:
                    memmove(self.buf, self.buf + self.buf_start, self.buf_end - self.buf_start)
                    self.buf_end -= self.buf_start
                    self.buf_start = 0
                if self.buf_end + size > self.buf_capacity:
                    wanted = max(self.buf_capacity * 2, self.buf_end + size, HEAD_STACK)
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
        if self.buf_capacity > OUT_BUFFER_SHRINK:
            # A one-off large burst: give the memory back.
            free(self.buf)
            self.buf = NULL
            self.buf_capacity = 0
        return 0

    cdef list take(self):
        """Everything queued, as byte strings in order, and the buffer emptied
        (for a writer that is not a file descriptor: an asyncio transport)."""
        cdef list parts = []
        cdef Py_ssize_t skip = self.first_offset   # already sent of the first chunk
        if self.buf_end > self.buf_start:
            parts.append(PyBytes_FromStringAndSize(self.buf + self.buf_start,
                                                   self.buf_end - self.buf_start))
        for chunk in self.chunks:
            if skip:
                chunk = chunk[skip:]
                skip = 0
            parts.append(chunk if type(chunk) is bytes else bytes(chunk))
        self.clear()
        return parts

    cdef Py_ssize_t send_to(self, int fd) except -2:
        """Send what the socket takes without blocking; return bytes sent, or -1
        when the socket would block before any byte.  Raises OSError when the
        peer is gone."""
        cdef iovec iov[MAX_IOV]
        cdef int count = 0
        cdef Py_ssize_t sent, chunk_size
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
        self.consume(sent)
        return sent

    cdef Py_ssize_t send_through(self, object tls) except -2:
        """send_to for a TLS connection: the queued bytes through its record
        layer (``tls.write`` encrypts and sends them), piece by piece, in
        order; bytes sent, or -1 when the socket would block first.  After a
        block, OpenSSL wants the same bytes again: the next call starts from
        the same place with at least as many bytes, as it must."""
        cdef Py_ssize_t sent, total = 0
        cdef object piece
        while self.size:
            if self.buf_end > self.buf_start:
                piece = PyBytes_FromStringAndSize(self.buf + self.buf_start,
                                                  self.buf_end - self.buf_start)
            else:
                piece = self.chunks[0]
                if self.first_offset or type(piece) is not bytes:
                    piece = bytes(piece[self.first_offset:])
            try:
                sent = tls.write(piece)
            except (SSLWantWriteError, SSLWantReadError):
                return total if total else -1
            self.consume(sent)
            total += sent
        return total

    cdef int consume(self, Py_ssize_t sent) except -1:
        """``sent`` bytes from the start went out: drop them."""
        cdef Py_ssize_t remaining, taken, chunk_size
        self.size -= sent
        if self.size == 0:
            self.clear()
            return 0
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
        return 0


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


cpdef bytes error_response(int status, str detail="", bytes headers=b""):
    """A complete response the server sends on its own (the connection closes).
    ``headers``: extra header lines, each ending in CRLF."""
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
        + b"Server: fastpool\r\nContent-Type: text/plain; charset=utf-8\r\n" + headers
        + b"Content-Length: " + str(len(body)).encode("ascii")
        + b"\r\nConnection: close\r\n\r\n" + body
    )


# ---------------------------------------------------------------- request targets

cdef class TargetCache:
    """Request-target -> its parts in one worker kind's types (WSGI: str,
    ASGI: str and bytes), so a target seen again costs one dict lookup.  The
    split is split_request_target's; a worker kind overrides ``convert``."""

    def __cinit__(self):
        self.entries = {}

    cdef tuple get(self, bytes target):
        cdef tuple cached = self.entries.get(target)
        if cached is None:
            cached = remember(self.entries, target,
                              self.convert(target, split_request_target(target)),
                              TARGET_CACHE_SIZE)
        return cached

    cdef tuple convert(self, bytes target, tuple parts):
        return parts


class ClientDisconnected(OSError):
    """The client went away, or stopped reading for too long (for an ASGI app:
    ``send`` after a disconnect, an OSError subclass as the spec asks)."""


cdef tuple split_request_target(bytes target):
    """``(path, raw_path, query)`` of a request-target: the path percent-decoded,
    the raw path as received (both without the query), and the query.  An
    absolute-form target (``GET http://host/p``) yields its path part."""
    cdef bytes path = target
    cdef bytes query = b""
    cdef Py_ssize_t mark
    mark = path.find(b"#")
    if mark >= 0:
        path = path[:mark]
    mark = path.find(b"?")
    if mark >= 0:
        query = path[mark + 1:]
        path = path[:mark]
    if path[:1] != b"/" and path != b"*":
        mark = path.find(b"://")
        if mark >= 0:
            mark = path.find(b"/", mark + 3)
            path = path[mark:] if mark >= 0 else b"/"
    return (unquote_to_bytes(path) if b"%" in path else path, path, query)


cdef bint is_health_target(bytes health, bytes target):
    """The target is the health path, exactly or followed by a query."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(health)
    return target.startswith(health) and (
        PyBytes_GET_SIZE(target) == size or PyBytes_AS_STRING(target)[size] == 63)   # "?"


# ---------------------------------------------------------------- peers and proxies

cdef int ipv4_text(const unsigned char *octets, char *text) noexcept nogil:
    """The dotted quad of an IPv4 address into ``text`` (NUL-terminated; room
    for 16 bytes): what inet_ntop writes, without its printf (a third of a
    handoff's address work)."""
    cdef int i, n = 0, octet
    for i in range(4):
        octet = octets[i]
        if octet >= 100:
            text[n] = c'0' + octet // 100
            n += 1
        if octet >= 10:
            text[n] = c'0' + octet // 10 % 10
            n += 1
        text[n] = c'0' + octet % 10
        n += 1
        text[n] = c'.' if i < 3 else 0
        n += 1
    return n - 1


cdef tuple peer_of(sockaddr_storage *address):
    """``(host, port)`` of an accepted IPv4 or IPv6 peer, else None."""
    cdef char text[INET6_ADDRSTRLEN + 1]
    cdef int port
    if address.ss_family == AF_INET:
        ipv4_text(<const unsigned char *>&(<sockaddr_in *>address).sin_addr, text)
        port = ntohs((<sockaddr_in *>address).sin_port)
    elif address.ss_family == AF_INET6:
        inet_ntop(AF_INET6, &(<sockaddr_in6 *>address).sin6_addr, text, sizeof(text))
        port = ntohs((<sockaddr_in6 *>address).sin6_port)
    else:
        return None
    return (text.decode("ascii"), port)


cdef str forwarded_client(str chain, frozenset trusted, bint trust_all):
    """The client behind a trusted proxy's X-Forwarded-For (gunicorn's and
    uvicorn's forwarded_allow_ips): the nearest address in the chain that is not
    itself a trusted proxy.  None without a usable header."""
    cdef list hops
    if not chain:
        return None
    hops = [hop.strip() for hop in chain.split(",") if hop.strip()]
    if not hops:
        return None
    for hop in reversed(hops):
        if not (trust_all or hop in trusted):
            return hop
    return hops[0]


cdef str forwarded_scheme(str proto):
    """``http`` or ``https`` from X-Forwarded-Proto, else None."""
    if not proto:
        return None
    proto = proto.split(",", 1)[0].strip().lower()
    return proto if proto == "http" or proto == "https" else None


# ---------------------------------------------------------------- shared counters
# (fastpool_atomic_add: _http.pxd)


def atomic_add(memory, Py_ssize_t index, long long delta):
    """Add ``delta`` to the index-th 64-bit counter of a shared mapping (one
    that several processes write, like the handoff queues' pending counts),
    atomically; return the new value."""
    cdef long long[::1] counters = memoryview(memory).cast("B").cast("q")
    if not 0 <= index < counters.shape[0]:
        raise IndexError(f"counter {index} out of range")
    return fastpool_atomic_add(&counters[index], delta)


# ---------------------------------------------------------------- the core alone (tests, tools)

@cython.final
cdef class RecordedRequest(Request):
    """A request as the core alone sees it: its header fields as received."""

    cdef public list headers

    def read_body(self):
        """The body received so far (and taken: a second call returns the rest)."""
        if self.spool is not None:
            self.spool.seek(0)
        return self.take_body(-1)


@cython.final
cdef class RecordingConnection(HttpConnection):
    """The connection core with no worker on top, for tests and tools (the
    request corpus is replayed through it): every request whose head is
    complete stays in ``pending``, a ``RecordedRequest`` with its header fields
    (name and value as bytes, in order) and its body."""

    def __init__(self, Limits limits not None, Router router=None, int home_group=-1):
        HttpConnection.__init__(self, limits)
        self.router = router
        self.home_group = home_group

    cdef Request new_request(self):
        cdef RecordedRequest request = RecordedRequest.__new__(RecordedRequest)
        request.headers = []
        return request

    cdef int add_header(self, Request request, bytes name, bytes value) except -1:
        (<RecordedRequest>request).headers.append((name, value))
        return 0

    @property
    def receiving(self):
        """Whether a request is partly received (its head or its body)."""
        return self.current is not None


# ---------------------------------------------------------------- the PROXY protocol

# HAProxy's proxy-protocol.txt: a v1 header begins with this text, a v2 header
# with this binary signature.
cdef bytes PROXY_V1_PREFIX = b"PROXY "
cdef bytes PROXY_V2_SIGNATURE_BYTES = b"\r\n\r\n\x00\r\nQUIT\n"
cdef tuple PROXY_NEED_MORE = (0, None, None)


cdef tuple proxy_header(const unsigned char *data, Py_ssize_t size):
    """Parse the PROXY protocol header (v1 or v2) at the start of the ``size``
    bytes read so far from a connection: ``(consumed, client, server)``.

    ``consumed`` is 0 when more bytes are needed (``data`` is the beginning of
    a valid header so far), -1 when they cannot begin one (then ``client`` is
    the reason, for the log), else the header's length; ``client`` and
    ``server`` are ``(host, port)``, or None for a v2 LOCAL or v1 UNKNOWN
    header (the socket's own addresses stand), and TLVs are skipped."""
    cdef Py_ssize_t length
    cdef int family
    cdef const unsigned char *addresses
    if size == 0:
        return PROXY_NEED_MORE
    if data[0] == b"P"[0]:
        return proxy_v1(data, size)
    if memcmp(data, PyBytes_AS_STRING(PROXY_V2_SIGNATURE_BYTES),
              min(size, <Py_ssize_t>PROXY_V2_SIGNATURE)) != 0:
        return (-1, "no PROXY protocol header", None)
    if size < PROXY_V2_FIXED:
        return PROXY_NEED_MORE
    if data[12] & 0xF0 != PROXY_V2_VERSION:
        return (-1, "PROXY v2: unknown version", None)
    length = (data[14] << 8) | data[15]
    if size < PROXY_V2_FIXED + length:
        return PROXY_NEED_MORE
    if data[12] & 0x0F == PROXY_V2_LOCAL:
        return (PROXY_V2_FIXED + length, None, None)
    if data[12] & 0x0F != PROXY_V2_PROXY:
        return (-1, "PROXY v2: unknown command", None)
    family = data[13] & 0xF0
    addresses = data + PROXY_V2_FIXED
    if family == PROXY_V2_INET:
        if length < PROXY_V2_INET_SIZE:
            return (-1, "PROXY v2: IPv4 addresses cut short", None)
        return (PROXY_V2_FIXED + length, v2_address(AF_INET, addresses, addresses + 8),
                v2_address(AF_INET, addresses + 4, addresses + 10))
    if family == PROXY_V2_INET6:
        if length < PROXY_V2_INET6_SIZE:
            return (-1, "PROXY v2: IPv6 addresses cut short", None)
        return (PROXY_V2_FIXED + length, v2_address(AF_INET6, addresses, addresses + 32),
                v2_address(AF_INET6, addresses + 16, addresses + 34))
    # AF_UNSPEC or AF_UNIX: nothing the server could use as a client address.
    return (PROXY_V2_FIXED + length, None, None)


cdef tuple v2_address(int family, const unsigned char *address, const unsigned char *port):
    cdef char text[INET6_ADDRSTRLEN + 1]
    inet_ntop(family, address, text, sizeof(text))
    return (text.decode("ascii"), (port[0] << 8) | port[1])


cdef tuple proxy_v1(const unsigned char *data, Py_ssize_t size):
    """proxy_header for a v1 (text) header: ``PROXY TCP4|TCP6 source
    destination source-port destination-port\\r\\n`` or ``PROXY UNKNOWN ...``."""
    cdef Py_ssize_t prefix = min(size, PyBytes_GET_SIZE(PROXY_V1_PREFIX))
    cdef const unsigned char *end
    cdef list fields
    cdef int family
    cdef tuple client, server
    if memcmp(data, PyBytes_AS_STRING(PROXY_V1_PREFIX), prefix) != 0:
        return (-1, "no PROXY protocol header", None)
    end = <const unsigned char *>memchr(data, b"\n"[0], min(size, <Py_ssize_t>PROXY_V1_MAX))
    if end == NULL:
        if size >= PROXY_V1_MAX:
            return (-1, "PROXY v1: header too long", None)
        return PROXY_NEED_MORE
    if end == data or (end - 1)[0] != b"\r"[0]:
        return (-1, "PROXY v1: bare LF", None)
    fields = data[:end - 1 - data].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return (end + 1 - data, None, None)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        return (-1, "PROXY v1: malformed header", None)
    family = AF_INET if fields[1] == b"TCP4" else AF_INET6
    client = v1_address(family, fields[2], fields[4])
    server = v1_address(family, fields[3], fields[5])
    if client is None or server is None:
        return (-1, "PROXY v1: bad address or port", None)
    return (end + 1 - data, client, server)


cdef tuple v1_address(int family, bytes host, bytes port):
    """``(host, port)`` of a v1 header's address and port (the address in its
    canonical text), None when either is invalid."""
    cdef unsigned char binary[16]
    cdef char text[INET6_ADDRSTRLEN + 1]
    if not (0 < len(port) <= 5 and port.isdigit()) or int(port) > 65535 or (
            len(port) > 1 and port[0] == b"0"[0]):
        return None
    if inet_pton(family, host, binary) != 1:
        return None
    inet_ntop(family, binary, text, sizeof(text))
    return (text.decode("ascii"), int(port))


def parse_proxy_header(bytes data):
    """proxy_header for Python (the tests' and tools' view of it)."""
    return proxy_header(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

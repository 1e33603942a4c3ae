from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.stdlib cimport malloc, realloc
from libc.math cimport INFINITY
from libc.string cimport memcpy

from fastpool._posix cimport sockaddr_storage

# Declarations of the connection core shared by every worker kind (WSGI today,
# ASGI next): request parsing glue over httptools, limits, and the response
# serialiser.  See _http.pyx for the rules.

cdef class Limits:
    cdef readonly Py_ssize_t request_line
    cdef readonly Py_ssize_t request_fields
    cdef readonly Py_ssize_t request_field_size
    cdef readonly long long request_body
    # Upper bound of a whole request head, derived from the three above; it
    # catches a header that trickles in forever (httptools only reports a
    # header once it is complete).
    cdef readonly Py_ssize_t request_head


cdef class Request:
    cdef public str method
    cdef public bytes target          # the request-target exactly as received
    # An absolute-form target's authority (``host[:port]``), which replaces
    # the Host field for the app (RFC 9112 3.2.2); None for other forms.
    cdef public bytes authority
    cdef public int http_minor        # 0 or 1 (HTTP/1.x only)
    cdef public bint keep_alive
    cdef public bint expect_continue  # HTTP/1.1 with Expect: 100-continue
    cdef public bint upgrade
    cdef public bint head_complete
    cdef public bint body_complete
    cdef public long long content_length   # -1 when the request has none
    cdef public bint chunked
    cdef public double started        # monotonic time the first byte arrived
    # Body bytes received and not yet read by the app: bytes chunks, the
    # first one read up to body_pos.  Past ``spool_above`` bytes (when it is
    # non-zero) the body goes to ``spool``, an anonymous temporary file, and
    # the chunks stay empty: a reader then reads the file (see spooled).
    cdef list body
    cdef Py_ssize_t body_pos
    cdef Py_ssize_t body_size
    cdef public long long body_received
    cdef bint discard_body
    cdef public Py_ssize_t spool_above
    cdef public object spool

    cdef int append_body(self, bytes chunk) except -1
    cdef list take_body_parts(self)
    cdef Py_ssize_t body_buffered(self)
    cdef bytes take_body(self, Py_ssize_t size)
    cdef Py_ssize_t find_in_body(self, char byte, Py_ssize_t limit)


# llhttp's parser state, allocated by us and initialised by llhttp_init; its
# size is llhttp's business, so it gets generous room.  ``owner`` leads back
# from a callback's parser pointer to the connection (borrowed reference).
cdef struct ParserBox:
    char state[1024]
    void *owner


# Which group serves a request: the server's routes (longest path prefix on
# whole segments of the decoded, normalised path), else the connection's home
# group (the group whose listener accepted it).
cdef class Router:
    cdef readonly int local_group      # the group of this worker
    cdef list prefixes                 # [(prefix bytes, group)], longest first
    cdef dict cache                    # request-target -> group
    cdef bytes health                  # the local health_path: always answered here

    cdef int route(self, bytes target, int home) except -2


# What the connection is parsing (see HttpConnection.feed).
cdef enum ParseMode:
    MODE_HEAD = 0       # llhttp: request lines, header fields, Content-Length bodies
    MODE_CHUNKED = 1    # the core's own decoder: a chunked body and its trailers
    MODE_METHOD = 2     # collecting a method token llhttp does not know


# Why llhttp was paused (an event method returned PAUSE).
cdef enum PauseReason:
    PAUSE_NONE = 0
    PAUSE_BEGIN = 1     # a message's first byte: feed learns its offset
    PAUSE_HANDOFF = 2   # the end of the head of a request for another group
    PAUSE_BODY = 3      # the end of a chunked request's head: the core decodes the body


cdef class HttpConnection:
    cdef ParserBox *box
    cdef Limits limits
    # Requests whose head is complete, oldest first (pipelining keeps order).
    cdef public list pending
    cdef Request current
    # The request whose message completed last (an upgrade refers to it even
    # after the worker took it from ``pending``).
    cdef Request completed
    cdef bytes url
    # The header being received: name, then value (each may arrive in pieces).
    cdef bytes field_name
    cdef bytes field_value
    cdef Py_ssize_t header_count
    # Per message: Host fields seen; Transfer-Encoding list members seen, how
    # many were "chunked", whether the last one was; an Upgrade field.
    cdef int host_count
    cdef bint te_present
    cdef int te_members
    cdef int te_chunked
    cdef bint te_last_chunked
    cdef bint upgrade_field
    cdef int llhttp_method             # llhttp's number of the method, -1 for a custom one
    # When non-zero, the stream can no longer be trusted: answer this status
    # after the requests before it, then close.
    cdef public int error_status
    cdef public str error_reason
    cdef public bint stop_reading
    # After an upgrade request (Connection: upgrade): the bytes that followed
    # its head, which belong to the new protocol.
    cdef public bytes upgrade_data
    # An unexpected exception raised inside a parser callback, re-raised by feed.
    cdef object callback_error
    # Routing (None when the server has no routes).  A request for another
    # group stops the parser at the end of its head: ``handoff_group`` is then
    # that group and ``handoff_data`` every byte read from the request's first
    # byte on (its head, and whatever followed), for the worker to hand over.
    cdef public Router router
    cdef public int home_group
    cdef public int handoff_group
    cdef public bytes handoff_data
    cdef public double handoff_started
    # Where a connection came from when the socket cannot say (a TLS connection
    # relayed through a socket pair): fastpool.handoff's origin text, passed on
    # with every handoff of the connection; None for a plain socket.
    cdef public bytes handoff_origin
    # The socket's family and addresses as a handoff carries them (a
    # HandoffAddresses of _worker.pxd), once a handoff brought them: handed on
    # again, the connection's socket is asked nothing.  None until then.
    cdef public bytes handoff_addresses
    # Parsing state of feed (see there).
    cdef ParseMode mode
    cdef PauseReason pause_reason
    cdef const char *feed_start        # the read being parsed (valid inside feed only)
    cdef const char *feed_end
    cdef const char *boundary          # where the next message starts in this read, or NULL
    cdef Py_ssize_t message_offset     # where the current message began in this read
    cdef bytearray carry               # the current head's bytes from earlier reads
    cdef str method_override           # a method token llhttp does not know
    cdef bint substituting             # feeding llhttp the stand-in method
    # The chunked decoder (MODE_CHUNKED).
    cdef int chunk_state
    cdef long long chunk_remaining
    cdef Py_ssize_t chunk_line         # bytes of the current size or trailer line
    cdef bint chunk_space              # whitespace seen that only a ";" may follow
    cdef int trailer_count

    cdef Request new_request(self)
    cdef int add_header(self, Request request, bytes name, bytes value) except -1
    cdef int finish_head(self, Request request) except -1
    cdef int feed(self, const char *data, Py_ssize_t size) except -1
    cdef int fail(self, int status, str reason) noexcept
    cdef bint at_message_boundary(self)
    # Parser events, called from llhttp's callbacks: 0 goes on, 1 (STOP, after
    # fail) stops the parser; an exception also stops it and feed re-raises it.
    cdef int route(self, Request request) except -1
    cdef int keep_head(self, const char *start, Py_ssize_t size) except -1
    cdef int message_begin(self) except -1
    cdef int url_span(self, const char *at, size_t size) except -1
    cdef int field_span(self, const char *at, size_t size) except -1
    cdef int value_span(self, const char *at, size_t size) except -1
    cdef int header_complete(self) except -1
    cdef int headers_complete(self) except -1
    cdef int read_transfer_codings(self, bytes value) except -1
    cdef int check_head(self, Request request) except -1
    cdef int check_target(self, Request request) except -1
    cdef int body_span(self, const char *at, size_t size) except -1
    cdef int message_complete(self) except -1
    # feed's helpers
    cdef int reset_parser(self) except -1
    cdef int parse_failed(self) except -1
    cdef bytes message_bytes(self, const char *start, const char *end)
    cdef const char *feed_chunked(self, const char *position, const char *end) except? NULL
    cdef const char *custom_method(self, const char *start, const char *position,
                                   const char *end) except? NULL
    cdef int set_upgrade(self, Request request, bytes data) except -1


cdef struct HeadFlags:
    long long content_length
    bint no_length              # 1xx, 204: an app's Content-Length is not sent (RFC 9110 8.6)
    bint has_date
    bint has_server
    bint connection_close
    bint has_transfer_encoding


# How one response is delimited on the wire, decided when its head is built.
# Every worker kind frames its responses with the functions below, so WSGI and
# ASGI answer alike (Content-Length, chunked, close-delimited, keep-alive).
# Who answered a request, for the scoreboard's response counts (one of the
# ``served_by`` labels of fastpool_requests_total): the app, the static files,
# the health path, admission control (503), or the server itself refusing a
# request it could not parse or wait for (4xx).
cdef enum ServedBy:
    SERVED_APP = 0
    SERVED_STATIC = 1
    SERVED_HEALTH = 2
    SERVED_SHED = 3
    SERVED_ERROR = 4
    SERVED_KINDS = 5


cdef struct Framing:
    int status_code
    int served_by               # a ServedBy value; framing_reset makes it SERVED_APP
    long long declared_length   # the body's announced length, -1 when unknown
    long long body_sent
    bint headers_sent
    bint chunked
    bint body_suppressed        # HEAD, 1xx, 204, 304: no body bytes on the wire
    bint close                  # close the connection once this response is out


cdef class OutBuffer:
    # Small writes land in ``buf`` (C memory reused for the connection's life),
    # so a response head plus a small body costs no allocation and one send.
    cdef char *buf
    cdef Py_ssize_t buf_start
    cdef Py_ssize_t buf_end
    cdef Py_ssize_t buf_capacity
    # What follows buf's content, in order: large bytes objects, and a
    # bytearray collecting small writes that come after one of them.
    cdef list chunks
    cdef bytearray tail
    cdef Py_ssize_t first_offset
    cdef public Py_ssize_t size

    cdef int write_raw(self, const char *data, Py_ssize_t size) except -1
    cdef int write(self, object data) except -1
    cdef int clear(self) except -1
    cdef Py_ssize_t send_to(self, int fd) except -2
    cdef Py_ssize_t send_through(self, object tls) except -2
    cdef int consume(self, Py_ssize_t sent) except -1
    cdef list take(self)


# A response head being built: in a caller's stack buffer, moved to the heap
# only when the head outgrows it.
cdef struct HeadBuf:
    char *data
    Py_ssize_t length
    Py_ssize_t capacity
    bint on_heap


cdef inline void head_init(HeadBuf *head, char *stack, Py_ssize_t capacity) noexcept:
    head.data = stack
    head.length = 0
    head.capacity = capacity
    head.on_heap = False


cdef inline int head_put(HeadBuf *head, const char *data, Py_ssize_t size) except -1:
    cdef Py_ssize_t wanted = head.length + size
    cdef char *grown
    if wanted > head.capacity:
        wanted = wanted * 2
        if head.on_heap:
            grown = <char *>realloc(head.data, wanted)
        else:
            grown = <char *>malloc(wanted)
            if grown != NULL:
                memcpy(grown, head.data, head.length)
        if grown == NULL:
            raise MemoryError()
        head.data = grown
        head.capacity = wanted
        head.on_heap = True
    memcpy(head.data + head.length, data, size)
    head.length += size
    return 0


cdef inline int head_put_bytes(HeadBuf *head, bytes data) except -1:
    return head_put(head, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef bytes date_header()
cdef int refresh_date() except -1
cdef tuple status_line(str status)
cdef int append_str_header(HeadBuf *head, object name, object value, HeadFlags *flags) except -1
cdef int append_bytes_header(HeadBuf *head, object name, object value, HeadFlags *flags) except -1
cdef void framing_reset(Framing *framing) noexcept
cdef void flags_reset(HeadFlags *flags) noexcept
cdef int end_head(HeadBuf *head, Framing *framing, HeadFlags *flags, Request request,
                  int code, long long body_length, bint reusable) except -1
cdef int queue_head(OutBuffer out, Framing *framing, Request request, bytes line, int code,
                    object headers, bint asgi, long long body_length,
                    bint reusable) except -1
cdef bint frame_body(OutBuffer out, Framing *framing, object data) except -1
cdef int end_body(OutBuffer out, Framing *framing) except -1
cdef int put_content_length(HeadBuf *head, long long length) except -1
cdef void head_free(HeadBuf *head) noexcept
cdef double monotonic() noexcept nogil
cdef int append_chunk(OutBuffer out, object data) except -1
cpdef bytes error_response(int status, str detail=*, bytes headers=*)


cdef inline double deadline_after(double start, double seconds) noexcept:
    """``start + seconds``: a deadline; a limit of 0 means none (infinity)."""
    return start + seconds if seconds > 0 else INFINITY


cdef inline object remember(dict cache, object key, object value, Py_ssize_t size):
    """Keep ``value`` under ``key`` in one of the per-process caches (targets,
    header names, status lines ...).  One rule for all: a cache that reaches
    its size is emptied first -- the few entries in use come back at once,
    and a stream of distinct keys cannot grow it."""
    if len(cache) >= size:
        cache.clear()
    cache[key] = value
    return value


cdef inline object take_first(list items):
    """``items.pop(0)`` without a method call (pending requests, in order)."""
    cdef object item = items[0]
    del items[0]
    return item


cdef inline int extend(bytearray target, const char *data, Py_ssize_t size) except -1:
    """Append raw bytes to a bytearray (no buffer-protocol round trip)."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(target)
    PyByteArray_Resize(target, old + size)
    memcpy(PyByteArray_AS_STRING(target) + old, data, size)
    return 0


cdef tuple split_request_target(bytes target)
cdef bytes normalise_path(bytes path)
cdef bytes status_line_of(object code)


cdef class TargetCache:
    cdef dict entries
    cdef tuple get(self, bytes target)
    cdef tuple convert(self, bytes target, tuple parts)


cdef inline tuple target_parts(TargetCache cache, bytes target):
    """``cache.get(target)``, with the hit inline (the common case)."""
    cdef object cached = cache.entries.get(target)
    if cached is not None:
        return <tuple>cached
    return cache.get(target)

cdef tuple peer_of(sockaddr_storage *address)
cdef tuple proxy_header(const unsigned char *data, Py_ssize_t size)
cdef str forwarded_client(str chain, frozenset trusted, bint trust_all)
cdef str forwarded_scheme(str proto)
cdef bint is_health_target(bytes health, bytes target)


# Shared counters (the handoff queues' pending and shed counts): an atomic add
# on a 64-bit counter that several processes write; returns the new value.
cdef extern from *:
    """
    static inline long long fastpool_atomic_add(long long *target, long long delta) {
        return __atomic_add_fetch(target, delta, __ATOMIC_SEQ_CST);
    }
    """
    long long fastpool_atomic_add(long long *target, long long delta) nogil

# Every tuning constant of the compiled modules, named once (uvloop keeps its
# consts.pxi the same way).  Rules: no size, count, limit or time written as a
# bare number in a .pyx; each constant says why it has its value.  Integers
# are an enum; times (seconds, floats) are C constants below.

cdef enum:
    # ---- reading
    RECV_SIZE = 262144              # one recv() takes this much at most: few reads per large body
    MAX_EVENTS = 256                # epoll events handled per wakeup
    ACCEPT_BATCH = 64               # connections accepted per readiness of a listener
    HANDOFF_BATCH = 64              # handed-over connections taken per readiness of the queue

    # ---- handoffs (fastpool.handoff: the message; its sizes are that module's)
    HANDOFF_VERSION = 3             # the message header's layout (HandoffHeader, _worker.pxd)
    HANDOFF_FDS = 2                 # descriptors per message: the client's socket, a memfd
    # An address in a message: room for a sockaddr_in6 (28 bytes), the larger of the two
    # that a TCP connection has.
    HANDOFF_ADDRESS_SIZE = 28
    # The control message (the descriptors) is built in this many 8-byte words: CMSG_SPACE
    # of two ints is 24 bytes on Linux; the worker checks the room when it starts.
    HANDOFF_CONTROL_WORDS = 8
    BODY_MEMORY_LIMIT = 1048576     # request body bytes held in memory; past this: a temporary file
    BODY_HIGH_WATER = 262144        # ASGI: unread body past which the socket is not read
    MAX_PIPELINED = 32              # ASGI: complete heads waiting behind the running request

    # ---- writing
    # Response bytes queued for a slow client before the producer waits; also
    # a streamed response's turn before the loop serves the other connections.
    HIGH_WATER = 262144
    SENDFILE_CHUNK = 1048576        # sendfile(2) per call, so one file does not hog the loop
    # A file over TLS (no kernel TLS) is read and encrypted this much per turn:
    # sixteen full TLS records.
    TLS_FILE_CHUNK = 262144
    MAX_IOV = 64                    # iovecs per writev(2)
    SMALL_WRITE = 16384             # writes below this are copied into the output buffer
    # A static file up to this size is read and sent with its head in one
    # send(); a larger one goes out with sendfile(2).
    SMALL_FILE = 16384
    OUT_BUFFER_LIMIT = 262144       # the output buffer's own memory; past it, writes queue
    OUT_BUFFER_SHRINK = 65536       # an emptied output buffer above this gives its memory back
    HEAD_STACK = 4096               # a response head is built in a stack buffer of this size first

    # ---- closing
    LINGER_READS = 16               # reads per wakeup while draining a lingering connection
    WAKE_PIPE_READ = 4096           # bytes read per drain of the app threads' wake-up pipe

    # ---- caches: each is cleared when it reaches its size (one rule, see remember())
    TARGET_CACHE_SIZE = 1024        # request-target -> its parts, per worker kind
    ROUTE_CACHE_SIZE = 4096         # request-target -> group
    HEADER_NAME_CACHE_SIZE = 2048   # request header name -> environ key / lower-cased name
    STATUS_CACHE_SIZE = 512         # status -> status line
    RESPONSE_HEADER_NAMES = 256     # response header name -> {value -> encoded line}
    RESPONSE_HEADER_VALUES = 64     # values kept per response header name
    STATIC_TYPE_CACHE_SIZE = 256    # static files: file name suffix -> Content-Type
    STATIC_VALIDATOR_CACHE_SIZE = 4096   # static files: file version -> (ETag, Last-Modified)
    STATIC_PLACE_CACHE_SIZE = 4096  # static files: request-target -> where under the mounts

    # ---- TLS
    TLS_HANDSHAKE_RECORD = 22       # a TLS connection's first byte: a handshake record (RFC 8446)

    # ---- metrics (the scoreboard's response counts, fastpool.metrics)
    STATUS_CLASSES = 5              # 1xx .. 5xx
    # A response given up before its status went out (the client left, or
    # stopped reading) is counted as nginx logs it: 499.
    CLIENT_CLOSED_REQUEST = 499
    DURATION_BUCKETS = 16           # the bounds of FASTPOOL_DURATION_BOUNDS below
    # ---- the PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2)
    PROXY_V1_MAX = 107              # the longest v1 header the spec allows, CRLF included
    PROXY_V2_FIXED = 16             # v2: signature (12), version/command, family, length (2)
    PROXY_V2_SIGNATURE = 12         # v2: the signature's length
    PROXY_V2_VERSION = 0x20         # v2: the version nibble of the 13th byte (version 2)
    PROXY_V2_LOCAL = 0x00           # v2 command LOCAL: the balancer's own connection
    PROXY_V2_PROXY = 0x01           # v2 command PROXY: addresses follow
    PROXY_V2_INET = 0x10            # v2 address family nibbles (the 14th byte's high half)
    PROXY_V2_INET6 = 0x20
    PROXY_V2_INET_SIZE = 12         # v2: two IPv4 addresses and two ports
    PROXY_V2_INET6_SIZE = 36        # v2: two IPv6 addresses and two ports
    PROXY_PEEK = 4096               # a header is peeked at this much per read (see ProxyReader)

    # ---- the parser
    SETTINGS_SLOTS = 64             # room for any llhttp_settings_t (25 callbacks in llhttp 9.2)
    LLHTTP_ERRNO_MAX = 64           # llhttp error codes looked up by name at import are below this
    LLHTTP_METHOD_MAX = 13          # the longest method name llhttp knows (GET_PARAMETER)
    CHUNK_LINE_LIMIT = 4096         # a longer chunk size line (with its extensions) is refused


cdef extern from *:
    """
    /* Chunk sizes from 2**60 on are an overflow: no real body is that large,
       and the arithmetic stays far from the 64-bit edge. */
    #define FASTPOOL_CHUNK_SIZE_LIMIT 1152921504606846976LL
    /* The lingering close drains a client's input at most this long (s). */
    #define FASTPOOL_LINGER_SECONDS 2.0
    /* The deadline sweep (and the ASGI tick) runs this often (s). */
    #define FASTPOOL_SWEEP_SECONDS 1.0
    /* A connection whose next request arrived while the worker was busy
       gets this long for the loop to read it (s). */
    #define FASTPOOL_READ_GRACE_SECONDS 1.0
    /* ASGI: a handoff waits for the transport to send what precedes it,
       looking again this often (s). */
    #define FASTPOOL_HANDOFF_RETRY_SECONDS 0.001
    /* The request duration histogram's upper bounds (s): from a cached
       hello (0.5 ms) to a report that runs into the default timeout (60 s),
       about three per decade as Prometheus's defaults.  fastpool.metrics
       reads them through fastpool._worker.DURATION_BOUNDS. */
    static const double FASTPOOL_DURATION_BOUNDS[] __attribute__((unused)) = {
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
        0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0};
    /* TCP_INFO gives times in milliseconds. */
    #define FASTPOOL_MS_PER_SECOND 1000.0
    """
    const long long CHUNK_SIZE_LIMIT "FASTPOOL_CHUNK_SIZE_LIMIT"
    const double LINGER_SECONDS "FASTPOOL_LINGER_SECONDS"
    const double SWEEP_SECONDS "FASTPOOL_SWEEP_SECONDS"
    const double READ_GRACE_SECONDS "FASTPOOL_READ_GRACE_SECONDS"
    const double HANDOFF_RETRY_SECONDS "FASTPOOL_HANDOFF_RETRY_SECONDS"
    const double MS_PER_SECOND "FASTPOOL_MS_PER_SECOND"
    const double BUCKET_BOUNDS "FASTPOOL_DURATION_BOUNDS"[DURATION_BUCKETS]

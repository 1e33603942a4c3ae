# The worker base shared by the WSGI and ASGI workers (see _worker.pyx for the
# rules): what a worker is to the master and to the other groups, whatever
# runs its connections.

from libc.stdint cimport uint8_t, uint16_t, uint64_t
from fastpool._consts cimport STATUS_CLASSES, DURATION_BUCKETS, HANDOFF_ADDRESS_SIZE
from fastpool._http cimport HttpConnection, Limits, Router, SERVED_KINDS
from fastpool._posix cimport sockaddr_storage
from fastpool._static cimport StaticFiles


# The scoreboard record of a worker: BOARD_SIZE doubles in memory shared with
# the master.  This enum is the layout; fastpool.scoreboard reads it through
# BOARD_LAYOUT (the _worker module's Python view of it), never by its own count.
# Everything but the state and the gauges (busy since, in flight, connections)
# only grows while the worker lives: the master folds a dead worker's counts
# into its group's totals (fastpool.metrics), so no counter goes backwards.
cdef enum:
    BOARD_REQUESTS = 0     # requests served
    BOARD_BUSY_SINCE = 1   # monotonic time app code has been running since; 0 = idle
    BOARD_STATE = 2        # one of the WorkerState values
    BOARD_IN_FLIGHT = 3    # app calls running now
    BOARD_HANDED_IN = 4    # connections taken from the group's handoff queue
    BOARD_HANDED_OUT = 5   # connections handed to another group
    BOARD_SHED = 6         # requests answered 503 by admission control on the group's own port
    BOARD_CONNECTIONS = 7  # client connections open (updated by the once-a-second sweep)
    # Responses by status class and by who answered: the count of class C
    # (1 for 1xx .. 5) answered by S (a ServedBy) is at
    # BOARD_RESPONSES + (C - 1) * SERVED_KINDS + S.
    BOARD_RESPONSES = 8
    # The request duration histogram: DURATION_BUCKETS + 1 counts (not
    # cumulative; the last: above every bound), then the sum of the durations.
    BOARD_DURATIONS = BOARD_RESPONSES + STATUS_CLASSES * SERVED_KINDS
    BOARD_DURATION_SUM = BOARD_DURATIONS + DURATION_BUCKETS + 1
    BOARD_SIZE = BOARD_DURATION_SUM + 1

cpdef enum WorkerState:
    BOOTING = 0
    SERVING = 1
    DRAINING = 2


cdef class WorkerOptions:
    cdef readonly Limits limits
    cdef readonly double keep_alive
    cdef readonly double client_timeout
    cdef readonly double graceful_timeout
    cdef readonly str root_path
    cdef readonly object access_log
    cdef readonly int master_pid
    cdef readonly long long max_requests
    cdef readonly bytes health_target
    cdef readonly frozenset trusted_proxies
    cdef readonly bint trust_all_proxies
    cdef readonly object scoreboard
    cdef readonly Router router
    cdef readonly object handoff
    cdef readonly StaticFiles static   # the group's static mounts, or None
    # Admission control on the group's own listeners (and its handoff queue)
    cdef readonly int max_pending
    cdef readonly double max_queue_wait
    cdef readonly int retry_after      # the Retry-After of a shed request's 503
    # one worker kind's own
    cdef readonly int threads          # WSGI
    cdef readonly str loop             # ASGI
    cdef readonly object lifespan      # ASGI: a fastpool.lifespan.Lifespan or None
    cdef readonly object websocket_options   # ASGI: fastpool.websocket.Options or None
    cdef readonly bint proxy_protocol


cdef class Listener:
    """One listening socket a worker accepts from (the master owns it)."""
    cdef readonly int fd
    cdef readonly bint tcp
    cdef readonly bint shared          # one socket for all the group's workers
    cdef readonly dict base            # the environ (WSGI) or scope (ASGI) keys it gives
    cdef readonly object tls           # a tls_listen socket: the group's ssl.SSLContext


# A socket's family and addresses as a handoff message carries them: read by
# the first sender (getsockname/getpeername), then passed on with the
# connection (HttpConnection.handoff_addresses), so no worker asks again.
cdef packed struct HandoffAddresses:
    uint16_t family                # AF_INET, AF_INET6, AF_UNIX; 0 unknown
    uint8_t server_size            # sockaddr sizes; 0: unknown (or not a TCP socket)
    uint8_t peer_size
    unsigned char server[HANDOFF_ADDRESS_SIZE]
    unsigned char peer[HANDOFF_ADDRESS_SIZE]


# The header of a handoff message (see fastpool.handoff), in the native byte
# order: the sender and the receiver are workers of one server on one machine.
cdef packed struct HandoffHeader:
    uint16_t version               # HANDOFF_VERSION
    uint16_t home                  # the connection's home group
    double started                 # monotonic time the routed request began
    double queued                  # monotonic time it was queued
    uint64_t size                  # payload bytes (after the origin, or in the memfd)
    uint8_t in_memfd               # the payload is in the second descriptor
    uint16_t origin_size           # origin bytes after the header
    HandoffAddresses addresses     # the client's socket (addresses: without an origin)


cdef class Handover:
    """A connection taken from the group's handoff queue."""
    cdef readonly int fd
    cdef readonly int family           # the socket's (AF_INET, AF_INET6, AF_UNIX), 0 unknown
    cdef readonly int home
    cdef readonly bytes data
    cdef readonly bint tcp
    cdef readonly tuple server         # (host, port) or None
    cdef readonly tuple peer           # (host, port) or None
    cdef readonly str scheme           # "https" for a relayed TLS connection, else None
    cdef readonly bytes origin         # fastpool.handoff's origin text, to pass on, or None
    cdef readonly bytes addresses      # its HandoffAddresses, to pass on
    # The host forwarded_allow_ips is checked against: the peer's, or the
    # proxy's that sent a PROXY header for the client in ``peer``; "" for none.
    cdef readonly str via


# What ProxyReader.step found.
cdef enum ProxyStep:
    PROXY_WAIT = 0        # the header is not complete: wait for the socket
    PROXY_DONE = 1        # complete and consumed: client and server are set
    PROXY_BAD = 2         # not a valid header (error says why): answer 400
    PROXY_GONE = 3        # the client closed or reset the connection


cdef class ProxyReader:
    """The PROXY protocol header of a connection on a proxy_protocol group."""
    cdef bytes head                    # header bytes taken from the socket so far
    cdef readonly tuple client         # (host, port) from the header, None for LOCAL/UNKNOWN
    cdef readonly tuple server
    cdef readonly str error

    cdef int step(self, int fd) except -1


# Whether unread bytes wait on a connection's socket (peeked, not consumed):
# closing with them would reset the connection (see the workers' close).
cdef bint input_waiting(int fd) noexcept


cdef class WorkerBase:
    cdef readonly object app
    cdef readonly WorkerOptions options
    cdef readonly Limits limits
    cdef readonly bint alive           # serving; False once a graceful stop began
    cdef readonly bint close_idle      # on a stop: close idle keep-alive connections at once
    cdef readonly long long requests
    cdef readonly double keep_alive
    cdef readonly double client_timeout
    cdef double graceful_deadline
    cdef readonly str root_path
    cdef object access_log
    cdef double[::1] board
    cdef object board_owner
    cdef list running                  # start times of the app code running now
    cdef readonly Router router        # routes (None without), this group's index, its queue
    cdef readonly int local_group
    cdef object handoff                # the fastpool.handoff.Handoff, or None
    # The handoff queues in C (taken from ``handoff`` once; see hand_off, take_handoff)
    cdef int handoff_groups            # queues (one per group): the size of the arrays
    cdef int *handoff_senders          # send end of each group's queue
    cdef int *handoff_max_pending      # each group's max_pending (0: none)
    cdef int *handoff_retry_after      # each group's Retry-After of a 503
    cdef int handoff_receiver          # this group's receive end, -1 without routes
    cdef long long[::1] handoff_counters   # pending[g], then shed[g] from handoff_shed_base
    cdef int handoff_shed_base
    cdef Py_ssize_t handoff_inline_limit   # a larger payload goes in a memfd
    cdef double handoff_max_queue_wait
    cdef char *handoff_buffer          # one received message
    cdef Py_ssize_t handoff_buffer_size
    cdef readonly StaticFiles static   # the group's static mounts, or None
    cdef bint master_reported          # the master's death is logged once
    cdef readonly bint admission       # max_pending or max_queue_wait is set
    cdef readonly int waiting          # accepted connections whose first request waits
    cdef readonly bint proxy_protocol  # every connection begins with a PROXY header
    cdef bint proxy_warned             # an untrusted peer's PROXY header is logged once

    cdef int set_state(self, WorkerState state) except -1
    cdef object app_started(self)
    cdef int app_finished(self, object token) except -1
    cdef int request_done(self) except -1
    cdef int count_response(self, int status, double started, int served_by) except -1
    cdef int count_connections(self, Py_ssize_t count) except -1
    cdef bint retirement_due(self) except -1
    cdef bint master_gone(self) except -1
    cdef bint is_health(self, bytes target)
    cdef tuple health_answer(self)
    cdef str forwarded_client(self, str chain)
    cdef str forwarded_scheme(self, str proto)
    cdef bytes proxy_origin(self, ProxyReader reader, str peer, str scheme)
    cdef Handover take_handoff(self)
    cdef bytes hand_off(self, HttpConnection conn, int fd)
    cdef bytes refuse_handoff(self, int group)
    cdef int open_handoffs(self) except -1
    cdef object relay_off(self, HttpConnection conn, tuple peer, tuple server)
    cdef double arrival(self, Listener listener, int fd)
    cdef bint too_late(self, double arrived, double started)
    cdef double stop_waiting(self, double arrived)
    cdef bytes shed(self)
    cdef int begin_stop(self, bint close_idle) except -1
    cdef int quit(self) except -1
    cdef int stop_accepting(self) except -1
    cdef int accept_next(self, Listener listener, sockaddr_storage *address) except -2
    cdef int pause_accepting(self) except -1

# cython: language_level=3
"""The worker base: what every worker is to the master and to the other groups.

Rules of this module:

* ``WorkerBase`` is inherited by the WSGI worker (``_wsgi.WSGIWorker``, an
  epoll loop) and the ASGI worker (``_asgi.ASGIWorker``, an asyncio loop).  It
  owns what does not depend on how connections are run: the scoreboard record
  (requests served, since when app code has run, the worker's state, the
  routing counts), retirement after ``max_requests``, the graceful stop and
  its deadline, the master-gone check, the health path's answer, the trusted
  proxies' forwarded headers and PROXY protocol headers (``ProxyReader``
  reads one off a socket for either worker kind, ``proxy_origin`` decides
  whether it is believed), and both ends of a handoff (taking a
  connection from the group's queue, refusing it with 503; giving one to
  another group, or for a TLS connection one end of a socket pair that the
  worker kind then relays: ``relay_off``).  A handoff's message is sent and
  taken here in C (``sendmsg``/``recvmsg``, the ``HandoffHeader`` of
  _worker.pxd): the one implementation, with no Python call on the way.
  A worker kind supplies only the loop-specific parts: ``stop_accepting``,
  ``quit``, and how a taken connection starts.
* ``WorkerOptions`` is built once per worker from its group's settings
  (``WorkerOptions.from_group``); a worker reads its options, never a list
  of keyword arguments.
* The scoreboard layout is the ``BOARD_*`` enum of _worker.pxd; Python reads it
  through ``BOARD_LAYOUT`` and ``STATE_NAMES`` (fastpool.scoreboard).
* Only the loop's thread calls these methods, except ``app_started``,
  ``app_finished`` and ``request_done``, which a WSGI app thread calls too
  (they hold the GIL throughout).
"""

cimport cython
from fastpool._consts cimport *
from libc.math cimport INFINITY
from fastpool._http cimport (
    HttpConnection, Limits, monotonic, peer_of, fastpool_atomic_add, SERVED_APP, SERVED_STATIC,
    SERVED_HEALTH, SERVED_SHED, SERVED_ERROR, SERVED_KINDS, is_health_target, proxy_header,
    forwarded_client as client_in_chain, forwarded_scheme as scheme_in,
)
from fastpool._static cimport StaticFiles
from fastpool._posix cimport (
    getppid, accept4, setsockopt, sockaddr, sockaddr_storage, socklen_t, SOCK_NONBLOCK,
    SOCK_CLOEXEC, IPPROTO_TCP, TCP_NODELAY, errno, EAGAIN, EINTR, ECONNABORTED, EPROTO,
    EMFILE, ENFILE, ENOBUFS, ENOMEM, recv, MSG_PEEK, MSG_DONTWAIT, getsockopt, TCP_INFO,
    tcp_info, AF_INET, AF_INET6, SOL_SOCKET, MSG_NOSIGNAL, iovec, msghdr, cmsghdr,
    sendmsg, recvmsg, SCM_RIGHTS, MSG_CMSG_CLOEXEC, CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_DATA,
    CMSG_SPACE, CMSG_LEN, getpeername, getsockname, memfd_create, MFD_CLOEXEC, write, close,
    pread, fcntl, F_GETFL, F_SETFL, O_NONBLOCK,
)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memcpy, memset

import logging
import os
import socket

from fastpool.handoff import (
    INLINE_LIMIT, MAX_GROUPS, ORIGIN_LIMIT, busy_answer, origin_text, parse_origin,
)

cdef object error_log = logging.getLogger("fastpool.error")

# The record layout, for fastpool.scoreboard (the master's side).
BOARD_LAYOUT = {
    "size": BOARD_SIZE, "requests": BOARD_REQUESTS, "busy_since": BOARD_BUSY_SINCE,
    "state": BOARD_STATE, "handed_in": BOARD_HANDED_IN, "handed_out": BOARD_HANDED_OUT,
    "shed": BOARD_SHED, "in_flight": BOARD_IN_FLIGHT, "connections": BOARD_CONNECTIONS,
    "responses": BOARD_RESPONSES, "durations": BOARD_DURATIONS,
    "duration_sum": BOARD_DURATION_SUM, "status_classes": STATUS_CLASSES,
    "served_kinds": SERVED_KINDS,
}
# The histogram's upper bounds (s), and who answered, by ServedBy value.
DURATION_BOUNDS = tuple(BUCKET_BOUNDS[i] for i in range(DURATION_BUCKETS))
SERVED_BY_NAMES = {SERVED_APP: "app", SERVED_STATIC: "static", SERVED_HEALTH: "health",
                   SERVED_SHED: "shed", SERVED_ERROR: "error"}
STATE_NAMES = {BOOTING: "booting", SERVING: "serving", DRAINING: "draining"}


# ---------------------------------------------------------------- options

@cython.final
cdef class WorkerOptions:
    """A worker's settings, built once from its group (see from_group)."""

    @staticmethod
    def from_group(group, *, access_log=None, int master_pid=0, long long max_requests=0,
                   scoreboard=None, routing=None, lifespan=None, websocket_options=None):
        """From a fastpool.settings.GroupConfig, and what the master decides at
        fork time: the access log, the scoreboard record, this worker's
        max_requests (jittered), the routing (Router, Handoff) when the server
        has routes, and for ASGI the lifespan and WebSocket options."""
        cdef WorkerOptions options = WorkerOptions.__new__(WorkerOptions)
        options.limits = Limits(group.limit_request_line, group.limit_request_fields,
                                group.limit_request_field_size, group.limit_request_body)
        options.keep_alive = group.keep_alive
        options.client_timeout = group.client_timeout
        options.graceful_timeout = group.graceful_timeout
        options.root_path = group.root_path.rstrip("/")
        options.access_log = access_log
        options.master_pid = master_pid
        options.max_requests = max_requests
        options.health_target = group.health_path.encode("latin-1") if group.health_path \
            else None
        allowed = tuple(group.forwarded_allow_ips)
        options.trust_all_proxies = "*" in allowed
        options.trusted_proxies = frozenset(allowed)
        options.scoreboard = scoreboard
        if routing is not None:
            options.router, options.handoff = routing
        if group.static:
            options.static = StaticFiles(group.static, group.static_max_age,
                                         group.static_precompressed,
                                         group.static_follow_symlinks)
        options.max_pending = group.max_pending
        options.max_queue_wait = group.max_queue_wait
        options.retry_after = group.retry_after
        options.threads = group.threads
        options.loop = group.loop
        options.lifespan = lifespan
        options.websocket_options = websocket_options
        options.proxy_protocol = group.proxy_protocol
        return options


cdef bint input_waiting(int fd) noexcept:
    """Whether unread bytes wait on ``fd`` (peeked, not consumed)."""
    cdef char byte
    return recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0


# ---------------------------------------------------------------- listeners

@cython.final
cdef class Listener:

    def __init__(self, int fd, bint tcp, bint shared, dict base, tls=None):
        self.fd = fd
        self.tcp = tcp
        self.shared = shared
        self.base = base
        self.tls = tls


# ---------------------------------------------------------------- the PROXY protocol

@cython.final
cdef class ProxyReader:
    """Reads the PROXY header a connection of a proxy_protocol group begins
    with, for both worker kinds (the parse is _http's proxy_header).  The
    socket is peeked at and only the header's own bytes are taken from it, so
    what follows stays in the socket for whoever reads next: the HTTP parser,
    or OpenSSL's handshake on a tls_listen socket."""

    cdef int step(self, int fd) except -1:
        """Read what the socket has of the header (non-blocking); a ProxyStep."""
        cdef unsigned char buffer[PROXY_PEEK]
        cdef ssize_t peeked = recv(fd, buffer, PROXY_PEEK, MSG_PEEK | MSG_DONTWAIT)
        cdef Py_ssize_t have = 0, take
        cdef bytes joined
        cdef tuple found
        if peeked == 0:
            return PROXY_GONE
        if peeked < 0:
            return PROXY_WAIT if errno == EAGAIN or errno == EINTR else PROXY_GONE
        if self.head is None:
            found = proxy_header(buffer, peeked)
        else:
            have = len(self.head)
            joined = self.head + buffer[:peeked]
            found = proxy_header(<const unsigned char *><char *>joined, len(joined))
        if found[0] < 0:
            self.error = found[1]
            return PROXY_BAD
        # Incomplete, every byte peeked is the header's; else only its rest.
        take = peeked if found[0] == 0 else found[0] - have
        if recv(fd, buffer, take, MSG_DONTWAIT) != take:
            return PROXY_GONE     # (the bytes just peeked are there: this is a reset)
        if found[0] == 0:
            self.head = buffer[:take] if self.head is None else self.head + buffer[:take]
            return PROXY_WAIT
        self.head = None
        self.client, self.server = found[1], found[2]
        return PROXY_DONE


# ---------------------------------------------------------------- handoffs

@cython.final
cdef class Handover:
    pass


# ---------------------------------------------------------------- the base

cdef class WorkerBase:

    def __init__(self, app, WorkerOptions options not None):
        self.app = app
        self.options = options
        self.limits = options.limits
        self.keep_alive = options.keep_alive
        self.client_timeout = options.client_timeout
        self.root_path = options.root_path
        self.access_log = options.access_log
        self.alive = True
        self.running = []
        self.board_owner = (options.scoreboard if options.scoreboard is not None
                            else bytearray(8 * BOARD_SIZE))
        self.board = memoryview(self.board_owner).cast("B").cast("d")
        self.router = options.router
        self.handoff = options.handoff
        self.static = options.static
        self.admission = options.max_pending > 0 or options.max_queue_wait > 0
        if self.router is not None:
            self.local_group = self.router.local_group
        self.proxy_protocol = options.proxy_protocol
        self.handoff_receiver = -1
        if self.handoff is not None:
            self.open_handoffs()

    def __dealloc__(self):
        PyMem_Free(self.handoff_senders)
        PyMem_Free(self.handoff_max_pending)
        PyMem_Free(self.handoff_retry_after)
        PyMem_Free(self.handoff_buffer)

    cdef int open_handoffs(self) except -1:
        """The queues, the counters and the admission of fastpool.handoff's
        Handoff, in C: a handoff then makes no Python call."""
        cdef int group, count = len(self.handoff.senders)
        if CMSG_SPACE(HANDOFF_FDS * sizeof(int)) > HANDOFF_CONTROL_WORDS * 8:
            raise RuntimeError("HANDOFF_CONTROL_WORDS is too small for this system")
        self.handoff_senders = <int *>PyMem_Malloc(count * sizeof(int))
        self.handoff_max_pending = <int *>PyMem_Malloc(count * sizeof(int))
        self.handoff_retry_after = <int *>PyMem_Malloc(count * sizeof(int))
        self.handoff_buffer_size = sizeof(HandoffHeader) + ORIGIN_LIMIT + INLINE_LIMIT
        self.handoff_buffer = <char *>PyMem_Malloc(self.handoff_buffer_size)
        if (self.handoff_senders == NULL or self.handoff_max_pending == NULL
                or self.handoff_retry_after == NULL or self.handoff_buffer == NULL):
            raise MemoryError()
        self.handoff_groups = count
        for group in range(count):
            self.handoff_senders[group] = self.handoff.senders[group].fileno()
            admission = self.handoff.admission.get(group)
            # (A group without admission settings: no limit, and Retry-After: 1
            # when its queue itself is full.)
            self.handoff_max_pending[group] = admission.max_pending if admission else 0
            self.handoff_retry_after[group] = admission.retry_after if admission else 1
        self.handoff_receiver = self.handoff.receiver.fileno()
        self.handoff_counters = memoryview(self.handoff.counters).cast("B").cast("q")
        self.handoff_shed_base = MAX_GROUPS
        self.handoff_inline_limit = INLINE_LIMIT
        self.handoff_max_queue_wait = self.handoff.max_queue_wait
        return 0

    # ---- the scoreboard

    cdef int set_state(self, WorkerState state) except -1:
        self.board[BOARD_STATE] = <int>state
        return 0

    cdef object app_started(self):
        """App code starts running (an app call, a step of a streamed body);
        returns the token app_finished takes."""
        cdef object now = monotonic()
        self.running.append(now)
        if len(self.running) == 1:
            self.board[BOARD_BUSY_SINCE] = now
        self.board[BOARD_IN_FLIGHT] = len(self.running)
        return now

    cdef int app_finished(self, object token) except -1:
        if len(self.running) == 1:
            del self.running[0]
            self.board[BOARD_BUSY_SINCE] = 0.0
        else:
            # App threads finish in any order: the oldest still running counts.
            self.running.remove(token)
            self.board[BOARD_BUSY_SINCE] = min(self.running)
        self.board[BOARD_IN_FLIGHT] = len(self.running)
        return 0

    cdef int request_done(self) except -1:
        """A response the app gave is over (sent, or given up)."""
        self.requests += 1
        self.board[BOARD_REQUESTS] = self.requests
        return 0

    cdef int count_response(self, int status, double started, int served_by) except -1:
        """A response went out (or was given up): count it by status class and
        by who answered (``served_by``, a ServedBy), and, when the request's
        start is known (``started`` > 0), its duration in the histogram.  A
        few additions in shared memory: no Python call, no lock (only this
        worker writes its record, under the GIL)."""
        cdef int status_class
        cdef int bucket = 0
        cdef double duration
        if status == 0:
            status = CLIENT_CLOSED_REQUEST     # given up before a status went out
        status_class = status // 100
        if status_class < 1 or status_class > STATUS_CLASSES:
            status_class = STATUS_CLASSES    # (no such status leaves a worker; never lost)
        self.board[BOARD_RESPONSES + (status_class - 1) * SERVED_KINDS + served_by] += 1
        if started > 0:
            duration = monotonic() - started
            while bucket < DURATION_BUCKETS and duration > BUCKET_BOUNDS[bucket]:
                bucket += 1
            self.board[BOARD_DURATIONS + bucket] += 1
            self.board[BOARD_DURATION_SUM] += duration
        return 0

    cdef int count_connections(self, Py_ssize_t count) except -1:
        """The open client connections, for the master (each sweep)."""
        self.board[BOARD_CONNECTIONS] = count
        return 0

    cdef bint retirement_due(self) except -1:
        """``max_requests`` reached: retire (called from the loop's thread)."""
        if self.options.max_requests and self.requests >= self.options.max_requests \
                and self.alive:
            error_log.info("worker %d retiring after %d requests (max_requests)",
                           os.getpid(), self.requests)
            self.begin_stop(False)
            return True
        return False

    cdef bint master_gone(self) except -1:
        """The master died (the loop's once-a-second check; PR_SET_PDEATHSIG
        is the other guard)."""
        if not self.options.master_pid or getppid() == self.options.master_pid:
            return False
        if not self.master_reported:
            self.master_reported = True
            error_log.warning("master (pid %d) is gone; worker %d stopping",
                              self.options.master_pid, os.getpid())
        return True

    # ---- what any request gets the same answer for

    cdef bint is_health(self, bytes target):
        """The group's health_path (exactly, or followed by a query)."""
        return (self.options.health_target is not None
                and is_health_target(self.options.health_target, target))

    cdef tuple health_answer(self):
        """``(status, body)`` of the health path: 200 while the worker serves,
        503 once its graceful stop has begun (a balancer takes it out)."""
        if self.alive:
            return (200, b"OK\n")
        return (503, b"stopping\n")

    cdef str forwarded_client(self, str chain):
        """The client from a trusted proxy's X-Forwarded-For (gunicorn's and
        uvicorn's forwarded_allow_ips): the nearest address of the chain that
        is not itself a trusted proxy; None when the header gives nothing."""
        if not chain:
            return None
        return client_in_chain(chain, self.options.trusted_proxies,
                               self.options.trust_all_proxies)

    cdef str forwarded_scheme(self, str proto):
        """``http`` or ``https`` from a trusted proxy's X-Forwarded-Proto, else None."""
        return scheme_in(proto)

    cdef bytes proxy_origin(self, ProxyReader reader, str peer, str scheme):
        """A connection's PROXY header is complete: the origin (fastpool.handoff's
        origin_text: scheme, the header's client and server, and ``peer`` as
        the proxy it came through) its worker then serves it with and hands
        it over with; None when the socket's own addresses stand -- a LOCAL
        or UNKNOWN header, or one from a peer (``peer``, "" for a unix
        socket's) not in forwarded_allow_ips, which is logged once per worker."""
        if reader.client is None or reader.server is None:
            return None
        if not (self.options.trust_all_proxies or (peer and peer in self.options.trusted_proxies)):
            if not self.proxy_warned:
                self.proxy_warned = True
                error_log.warning(
                    "PROXY protocol header from %s ignored: not in forwarded_allow_ips "
                    "(the connection's own address is the client; logged once per worker)",
                    peer or "a unix socket client")
            return None
        return origin_text(scheme, reader.client, reader.server, peer or None)

    # ---- routes: taking connections and handing them over

    cdef Handover take_handoff(self):
        """One connection from this group's queue (recvmsg here, no Python
        call); None when the queue is empty.  One that waited past
        max_queue_wait is answered 503 here and closed: its Handover has fd -1."""
        cdef Handover handover
        cdef HandoffHeader header
        cdef msghdr message
        cdef iovec part
        cdef cmsghdr *control
        cdef int fds[HANDOFF_FDS]
        cdef int count = 0, fd, flags, i
        cdef size_t taken
        cdef Py_ssize_t received, size, start
        cdef sockaddr_storage address
        cdef bytes data, refusal
        cdef unsigned long long space[HANDOFF_CONTROL_WORDS]   # (aligned for cmsghdr)
        part.iov_base = self.handoff_buffer
        part.iov_len = self.handoff_buffer_size
        memset(&message, 0, sizeof(message))
        message.msg_iov = &part
        message.msg_iovlen = 1
        message.msg_control = space
        message.msg_controllen = CMSG_SPACE(HANDOFF_FDS * sizeof(int))
        received = recvmsg(self.handoff_receiver, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
        if received < 0:
            return None         # empty (EAGAIN), or interrupted: the loop comes back
        fastpool_atomic_add(&self.handoff_counters[self.local_group], -1)
        control = CMSG_FIRSTHDR(&message)
        while control != NULL:
            if control.cmsg_level == SOL_SOCKET and control.cmsg_type == SCM_RIGHTS:
                taken = (control.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                for i in range(<int>taken):
                    if count < HANDOFF_FDS:
                        memcpy(&fds[count], CMSG_DATA(control) + i * sizeof(int), sizeof(int))
                        count += 1
            control = CMSG_NXTHDR(&message, control)
        if count == 0 or received < <Py_ssize_t>sizeof(HandoffHeader):
            for i in range(count):
                close(fds[i])
            return None
        memcpy(&header, self.handoff_buffer, sizeof(HandoffHeader))
        fd = fds[0]
        self.board[BOARD_HANDED_IN] += 1
        flags = fcntl(fd, F_GETFL)
        if flags >= 0 and not flags & O_NONBLOCK:
            fcntl(fd, F_SETFL, flags | O_NONBLOCK)   # (a relayed TLS connection's pair)
        size = <Py_ssize_t>header.size
        if header.in_memfd and count > 1:
            data = PyBytes_FromStringAndSize(NULL, size)
            if pread(fds[1], PyBytes_AS_STRING(data), size, 0) != size:
                data = b""
        else:
            start = <Py_ssize_t>sizeof(HandoffHeader) + header.origin_size
            received = min(received, start + size)
            data = self.handoff_buffer[start:received] if received > start else b""
        for i in range(1, count):
            close(fds[i])
        if self.handoff_max_queue_wait and \
                monotonic() - header.queued > self.handoff_max_queue_wait:
            refusal = self.refuse_handoff(self.local_group)
            write(fd, PyBytes_AS_STRING(refusal), PyBytes_GET_SIZE(refusal))
            close(fd)
            handover = Handover.__new__(Handover)
            handover.fd = -1
            return handover
        handover = Handover.__new__(Handover)
        handover.fd = fd
        handover.family = header.addresses.family
        handover.home = header.home
        handover.data = data
        handover.addresses = PyBytes_FromStringAndSize(<char *>&header.addresses,
                                                       sizeof(HandoffAddresses))
        if header.origin_size == 0:
            # The client's own socket: its addresses came with the message.
            handover.tcp = header.addresses.family == AF_INET or \
                header.addresses.family == AF_INET6
            if handover.tcp and header.addresses.server_size and header.addresses.peer_size:
                memset(&address, 0, sizeof(address))
                memcpy(&address, header.addresses.server, header.addresses.server_size)
                handover.server = peer_of(&address)
                memcpy(&address, header.addresses.peer, header.addresses.peer_size)
                handover.peer = peer_of(&address)
            handover.via = handover.peer[0] if handover.peer is not None else ""
        else:
            # A relayed TLS connection (the socket pair knows nothing of the
            # client), or a PROXY protocol one (its socket's peer is the proxy).
            origin = self.handoff_buffer[sizeof(HandoffHeader):
                                         sizeof(HandoffHeader) + header.origin_size]
            handover.scheme, handover.peer, handover.server, via = parse_origin(origin)
            handover.via = via if via is not None else (
                handover.peer[0] if handover.peer is not None else "")
            handover.tcp = True
            handover.origin = origin
        return handover

    cdef bytes hand_off(self, HttpConnection conn, int fd):
        """Give ``conn`` (its socket ``fd``) to the group its next request
        belongs to (sendmsg here, no Python call).  None when it is on its way
        (the caller drops its copy); else the 503 to answer, because that
        group is full."""
        cdef int group = conn.handoff_group
        cdef bytes data = conn.handoff_data if conn.handoff_data is not None else b""
        cdef bytes origin = conn.handoff_origin if conn.handoff_origin is not None else b""
        cdef HandoffHeader header
        cdef msghdr message
        cdef iovec parts[3]
        cdef cmsghdr *control
        cdef int fds[HANDOFF_FDS]
        cdef int count = 1, memfd = -1
        cdef socklen_t length
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data), done = 0, wrote
        cdef sockaddr_storage address
        cdef unsigned long long space[HANDOFF_CONTROL_WORDS]   # (aligned for cmsghdr)
        conn.handoff_group = -1
        conn.handoff_data = None
        if group < 0 or group >= self.handoff_groups:
            return self.refuse_handoff(self.local_group)    # (no such queue: never happens)
        if self.handoff_max_pending[group] and fastpool_atomic_add(
                &self.handoff_counters[group], 0) >= self.handoff_max_pending[group]:
            return self.refuse_handoff(group)
        memset(&header, 0, sizeof(header))
        header.version = HANDOFF_VERSION
        header.home = conn.home_group
        header.started = conn.handoff_started
        header.size = size
        header.origin_size = PyBytes_GET_SIZE(origin)
        # The receiver learns the socket's family and addresses from the
        # message, not from the socket (an origin names the addresses itself);
        # a connection that came by a handoff has them already.
        if conn.handoff_addresses is not None and \
                PyBytes_GET_SIZE(conn.handoff_addresses) == sizeof(HandoffAddresses):
            memcpy(&header.addresses, PyBytes_AS_STRING(conn.handoff_addresses),
                   sizeof(HandoffAddresses))
        else:
            length = sizeof(address)
            if getsockname(fd, <sockaddr *>&address, &length) == 0:
                header.addresses.family = address.ss_family
                if header.origin_size == 0 and length <= HANDOFF_ADDRESS_SIZE and (
                        address.ss_family == AF_INET or address.ss_family == AF_INET6):
                    memcpy(header.addresses.server, &address, length)
                    header.addresses.server_size = length
                    length = sizeof(address)
                    if getpeername(fd, <sockaddr *>&address, &length) == 0 \
                            and length <= HANDOFF_ADDRESS_SIZE:
                        memcpy(header.addresses.peer, &address, length)
                        header.addresses.peer_size = length
        fds[0] = fd
        if size > self.handoff_inline_limit:
            memfd = memfd_create(b"fastpool-handoff", MFD_CLOEXEC)
            while memfd >= 0 and done < size:
                wrote = write(memfd, PyBytes_AS_STRING(data) + done, size - done)
                if wrote <= 0:
                    close(memfd)
                    memfd = -1
                done += wrote
            if memfd < 0:
                return self.refuse_handoff(group)        # (no memory for it: as a full queue)
            header.in_memfd = 1
            fds[1] = memfd
            count = 2
        parts[0].iov_base = &header
        parts[0].iov_len = sizeof(header)
        parts[1].iov_base = PyBytes_AS_STRING(origin)
        parts[1].iov_len = PyBytes_GET_SIZE(origin)
        parts[2].iov_base = PyBytes_AS_STRING(data)
        parts[2].iov_len = 0 if memfd >= 0 else size
        memset(&message, 0, sizeof(message))
        message.msg_iov = parts
        message.msg_iovlen = 3
        message.msg_control = space
        message.msg_controllen = CMSG_SPACE(count * sizeof(int))
        control = CMSG_FIRSTHDR(&message)
        control.cmsg_level = SOL_SOCKET
        control.cmsg_type = SCM_RIGHTS
        control.cmsg_len = CMSG_LEN(count * sizeof(int))
        memcpy(CMSG_DATA(control), fds, count * sizeof(int))
        header.queued = monotonic()
        fastpool_atomic_add(&self.handoff_counters[group], 1)
        wrote = sendmsg(self.handoff_senders[group], &message, MSG_DONTWAIT | MSG_NOSIGNAL)
        if memfd >= 0:
            close(memfd)
        if wrote < 0:
            # The queue itself is full (or gone): the same answer as max_pending.
            fastpool_atomic_add(&self.handoff_counters[group], -1)
            return self.refuse_handoff(group)
        self.board[BOARD_HANDED_OUT] += 1
        return None

    cdef bytes refuse_handoff(self, int group):
        """A request for ``group`` refused (max_pending, a full queue, or
        max_queue_wait): counted as shed for the group, and its 503 (with the
        group's Retry-After) returned to answer it with."""
        fastpool_atomic_add(&self.handoff_counters[self.handoff_shed_base + group], 1)
        self.count_response(503, 0, SERVED_SHED)
        return busy_answer(self.handoff_retry_after[group])

    cdef object relay_off(self, HttpConnection conn, tuple peer, tuple server):
        """Hand a TLS connection's next request to another group: its TLS
        state cannot travel with the descriptor, so the group gets one end of
        a socket pair (with the bytes read, and where the connection came
        from) and this worker relays between the client and the other end.
        Returns that end's descriptor (non-blocking; the caller relays), or
        the 503 to answer when the group is full."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # (the proxy of a PROXY protocol connection stays its trusted hop)
            via = parse_origin(conn.handoff_origin)[3] if conn.handoff_origin else None
            conn.handoff_origin = origin_text("https", peer, server, via)
            refusal = self.hand_off(conn, theirs.fileno())
        finally:
            theirs.close()          # the other group's worker has its own copy
        if refusal is not None:
            ours.close()
            return refusal
        ours.setblocking(False)
        return ours.detach()

    # ---- admission control on the group's own listeners

    cdef double arrival(self, Listener listener, int fd):
        """When a connection just accepted from ``listener`` began to wait
        (monotonic time), for admission control: its last bytes' arrival as
        TCP_INFO tells it (the client's request waited in the kernel while
        every worker was busy).  -INFINITY when more than max_pending
        connections wait -- in the listener's accept queue, and accepted by
        this worker with their first request not yet at the app (``waiting``,
        which stop_waiting counts down): this one is then shed, so a burst
        drains by 503s until the wait is short again."""
        cdef tcp_info info
        cdef socklen_t size = sizeof(info)
        cdef double now = monotonic()
        if listener.tcp and self.options.max_pending:
            if getsockopt(listener.fd, IPPROTO_TCP, TCP_INFO, &info, &size) == 0 and \
                    info.tcpi_unacked + self.waiting > <unsigned int>self.options.max_pending:
                return -INFINITY
            size = sizeof(info)
        self.waiting += 1          # (stop_waiting counts it down, whatever the listener)
        if listener.tcp and getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &size) == 0:
            return now - info.tcpi_last_data_recv / MS_PER_SECOND
        return now

    cdef double stop_waiting(self, double arrived):
        """A connection's first request reached the app (or was shed, or the
        connection closed): it no longer waits.  Returns 0, its new
        ``arrived`` (later requests' age starts when they are read)."""
        if arrived != 0 and arrived != -INFINITY:
            self.waiting -= 1
        return 0

    cdef bint too_late(self, double arrived, double started):
        """A request is about to reach the app: has it waited longer than
        max_queue_wait (from ``started``, when this worker read its first
        byte, or ``arrived``, when its connection's bytes reached the kernel,
        whichever is earlier; arrived is 0 when unknown)?"""
        if arrived and arrived < started:
            started = arrived
        if started == -INFINITY:
            return True
        return self.options.max_queue_wait > 0 and \
            monotonic() - started > self.options.max_queue_wait

    cdef bytes shed(self):
        """Count a request answered 503 by admission control; its answer
        (made now: its Date is now's)."""
        self.board[BOARD_SHED] += 1
        return busy_answer(self.options.retry_after)

    # ---- stopping

    def stop(self, *, bint graceful=True, bint close_idle=True):
        """Graceful: stop accepting, finish what is in flight, then return from
        ``run``; else return as soon as the loop wakes.  ``close_idle``: close
        idle keep-alive connections at once (a shutdown); without it (a
        retiring or reloaded worker) each idle connection's next request is
        answered with ``Connection: close``, so no client races a close."""
        if not graceful:
            self.quit()
        else:
            self.begin_stop(close_idle)

    cdef int begin_stop(self, bint close_idle) except -1:
        self.close_idle = self.close_idle or close_idle
        if not self.alive:
            return 0
        self.alive = False
        self.set_state(DRAINING)
        self.graceful_deadline = monotonic() + self.options.graceful_timeout
        return self.stop_accepting()

    cdef int quit(self) except -1:
        raise NotImplementedError

    cdef int stop_accepting(self) except -1:
        raise NotImplementedError

    cdef int accept_next(self, Listener listener, sockaddr_storage *address) except -2:
        """The next connection waiting on ``listener`` (non-blocking, with
        TCP_NODELAY on TCP), its peer in ``address``; -1 when there is none
        now.  Out of descriptors or memory, the connections stay queued in the
        kernel and the worker pauses accepting until its next sweep, with one
        log line."""
        cdef socklen_t length
        cdef int fd, one = 1
        while True:
            length = sizeof(sockaddr_storage)
            fd = accept4(listener.fd, <sockaddr *>address, &length,
                         SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd >= 0:
                if listener.tcp:
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
                return fd
            if errno == EINTR or errno == ECONNABORTED or errno == EPROTO:
                continue          # (a client that left while queued)
            if errno == EAGAIN:
                return -1
            if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                error_log.error("accept failed: %s; pausing accepts for a second",
                                os.strerror(errno))
                self.pause_accepting()
            else:
                error_log.error("accept failed: %s", os.strerror(errno))
            return -1

    cdef int pause_accepting(self) except -1:
        raise NotImplementedError

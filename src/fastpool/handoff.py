"""Handing a client connection to another group's worker (routes).

Rules of this module:

* Only a server whose config has ``routes`` uses it; without routes no
  worker parses with routing on and nothing here is created.
* What a worker needs to route is one ``Routing`` (built by the master's
  ``routing_for``, read by ``worker._router``): the queues, its own group,
  every running group's route prefixes and every group's admission.
* The master creates one queue per group: a ``SOCK_SEQPACKET`` socket pair
  whose ends it keeps for its whole life, so that respawns and reloads never
  lose a queued handoff.  Every worker inherits the send end of every queue
  and the receive end of its own group's queue; the free workers of a group
  take the handoffs from it (a busy WSGI worker is not waiting on it).
* A handoff is one message: a fixed header (``HandoffHeader`` in
  _worker.pxd: version, home group, when the request began, when it was
  queued, payload size, where the payload is, origin size, and the socket's
  family with its server and peer addresses) followed by the origin and the
  payload — every byte already read from the client from the routed
  request's first byte on — with the client's socket attached (SCM_RIGHTS).
  A payload larger than ``INLINE_LIMIT`` travels in a memfd, attached as a
  second descriptor, so no read size can overflow a message.
* Sending and taking a handoff is compiled code (``WorkerBase.hand_off`` and
  ``take_handoff`` in _worker.pyx, one implementation for both worker
  kinds): a move costs the two workers a few system calls and no Python
  call.  This module sets the queues up and holds the sizes and the text
  form of an origin.
* The origin is empty for a client's own socket: the sender reads its
  addresses (getsockname, getpeername) into the header, so the receiver asks
  the socket nothing.  A TLS connection relayed through a socket pair (see
  ``WorkerBase.relay_off``) carries it instead: scheme, client address and
  server address as text (``origin_text``), passed on with every later
  handoff of that connection; so does a connection whose PROXY protocol
  header was believed (``WorkerBase.proxy_origin``), whose origin also names
  the proxy (``via``): the socket's peer, which the receiving group's
  forwarded_allow_ips is checked against.
* ``pending[g]`` (shared memory, atomic) counts handoffs queued for group
  ``g``, and ``shed[g]`` the requests for ``g`` answered with 503.  The sender
  checks ``pending`` against the group's ``max_pending`` and, when the group
  is full, answers ``503`` with ``Retry-After`` itself; the receiver counts the
  handoff out as it takes it, and answers 503 to one that waited longer than
  its group's ``max_queue_wait``.  Both count their 503s in ``shed``.
"""

from __future__ import annotations

import mmap
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from fastpool._http import atomic_add, error_response

# A payload up to this size travels in the message itself; a larger one in a memfd.
INLINE_LIMIT = 32 * 1024
ORIGIN_LIMIT = 256      # an origin is two addresses and a scheme: far below this
MAX_GROUPS = 256        # queues (and pending/shed counter pairs) in the shared counters


@dataclass(frozen=True)
class Admission:
    """A group's admission settings, as every sender needs them."""

    max_pending: int
    retry_after: int


class Queues:
    """The master's side: one queue per group and the pending counts."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        # pending[g] at g, then shed[g] (503s answered for group g) at MAX_GROUPS + g.
        self.counters = mmap.mmap(-1, 8 * 2 * MAX_GROUPS)

    def add(self, name: str) -> int:
        if name not in self.index:
            if len(self.pairs) >= MAX_GROUPS:
                raise RuntimeError(f"more than {MAX_GROUPS} groups with routing")
            send, receive = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for sock in (send, receive):
                sock.setblocking(False)
            # Room for many queued handoffs (the kernel caps it at wmem_max).
            send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            self.index[name] = len(self.pairs)
            self.pairs.append((send, receive))
        return self.index[name]

    def pending(self, name: str) -> int:
        return atomic_add(self.counters, self.index[name], 0)

    def shed(self, name: str) -> int:
        return atomic_add(self.counters, MAX_GROUPS + self.index[name], 0)

    def close(self) -> None:
        for send, receive in self.pairs:
            send.close()
            receive.close()


@dataclass(frozen=True)
class Routing:
    """What a worker of one group needs to route requests and hand connections over."""

    queues: Queues
    local: str                                  # the worker's own group
    routes: tuple[tuple[str, int], ...]         # (path prefix, group index), running groups
    admission: Mapping[int, Admission]          # every group's, by group index


class Handoff:
    """A worker's side: the send end of every group's queue, the receive end
    of its own, the counters and every group's admission (which the compiled
    worker reads once, see ``WorkerBase.open_handoffs``)."""

    def __init__(self, queues: Queues, local: str, admission: Mapping[int, Admission],
                 max_queue_wait: float) -> None:
        self.local = queues.index[local]
        self.senders = [send for send, _ in queues.pairs]
        self.receiver = queues.pairs[self.local][1]
        self.counters = queues.counters
        self.admission = admission
        self.max_queue_wait = max_queue_wait

    def receiver_fd(self) -> int:
        return self.receiver.fileno()


def busy_answer(retry_after: int) -> bytes:
    """The 503 of admission control (routes here, a group's own port in the
    workers), with Retry-After unless it is 0; made when sent (its Date)."""
    headers = f"Retry-After: {retry_after}\r\n".encode() if retry_after else b""
    return error_response(503, "the server is busy; retry later", headers)


def origin_text(scheme: str, peer: tuple[str, int] | None,
                server: tuple[str, int] | None, via: str | None = None) -> bytes:
    """Where a relayed or PROXY protocol connection came from: ``scheme
    peer-host peer-port server-host server-port [via]`` (``-`` for an unknown
    address), where ``via`` is the proxy whose PROXY header named the peer:
    the host the receiving group checks against its forwarded_allow_ips."""
    parts = [scheme]
    for address in (peer, server):
        parts += [str(address[0]), str(address[1])] if address else ["-", "-"]
    if via:
        parts.append(via)
    return " ".join(parts).encode("ascii", "replace")[:ORIGIN_LIMIT]


def parse_origin(text: bytes) -> tuple[str, tuple[str, int] | None, tuple[str, int] | None,
                                       str | None]:
    """``(scheme, peer, server, via)`` of an origin_text (via None when absent)."""
    fields = text.decode("ascii", "replace").split()
    addresses: list[tuple[str, int] | None] = []
    for host, port in ((fields[1], fields[2]), (fields[3], fields[4])) \
            if len(fields) in (5, 6) else ():
        addresses.append((host, int(port)) if port.isdigit() else None)
    if len(addresses) != 2:
        return fields[0] if fields else "http", None, None, None
    return fields[0], addresses[0], addresses[1], fields[5] if len(fields) == 6 else None

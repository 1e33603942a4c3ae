"""The scoreboard: one record of shared memory per worker, written by the
worker, read by the master.

Rules: the master creates the mapping before it forks anything, hands each
worker the index of a free record, and frees the record when the worker is
reaped.  A record is eight doubles (the layout is fixed by ``BOARD_*`` in
_http.pxd): requests served, the monotonic time the worker was last seen busy
(0 when idle), the worker's state, one spare, then the routing counts
(connections handed in and out, requests shed with 503) and one spare.  Only the worker
writes its record; a torn read costs the master one stale figure, never a
wrong decision for long (it reads again a second later).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

RECORD = struct.Struct("8d")
STATES = {0: "booting", 1: "serving", 2: "draining"}


@dataclass
class Record:
    requests: int
    busy_since: float
    state: str
    handed_in: int = 0
    handed_out: int = 0
    shed: int = 0


class Scoreboard:
    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.memory = mmap.mmap(-1, RECORD.size * capacity)
        self.free = list(range(capacity - 1, -1, -1))

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError(f"more than {self.capacity} workers at once")
        index = self.free.pop()
        RECORD.pack_into(self.memory, index * RECORD.size, *([0.0] * 8))
        return index

    def release(self, index: int) -> None:
        self.free.append(index)

    def view(self, index: int) -> memoryview:
        """The writable record a worker hands to the compiled loop."""
        start = index * RECORD.size
        return memoryview(self.memory)[start:start + RECORD.size]

    def read(self, index: int) -> Record:
        requests, busy_since, state, _, handed_in, handed_out, shed, _ = RECORD.unpack_from(
            self.memory, index * RECORD.size)
        return Record(int(requests), busy_since, STATES.get(int(state), "unknown"),
                      int(handed_in), int(handed_out), int(shed))

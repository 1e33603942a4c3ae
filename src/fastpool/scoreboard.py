"""The scoreboard: one record of shared memory per worker, written by the
worker, read by the master.

Rules: the master creates the mapping before it forks anything, hands each
worker the index of a free record, and frees the record when the worker is
reaped (after fastpool.metrics has folded its counts into its group's).  A
record is ``BOARD_LAYOUT["size"]`` doubles; the layout (which double is what:
requests served, since when app code has run, the state, the routing counts,
the response counts and the duration histogram) is written once, as the
``BOARD_*`` enum of _worker.pxd, and read here through
``fastpool._worker.BOARD_LAYOUT`` and ``STATE_NAMES``.  Only the worker writes
its record; a torn read costs the master one stale figure, never a wrong
decision for long (it reads again a second later).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass


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
        # (Imported here: the master reports a missing compiled core itself.)
        from fastpool._worker import BOARD_LAYOUT, STATE_NAMES

        self.layout: dict[str, int] = BOARD_LAYOUT
        self.states: dict[int, str] = STATE_NAMES
        self.record = struct.Struct(f"{BOARD_LAYOUT['size']}d")
        self.capacity = capacity
        self.memory = mmap.mmap(-1, self.record.size * capacity)
        self.free = list(range(capacity - 1, -1, -1))

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError(f"more than {self.capacity} workers at once")
        index = self.free.pop()
        self.record.pack_into(self.memory, index * self.record.size,
                              *([0.0] * self.layout["size"]))
        return index

    def release(self, index: int) -> None:
        self.free.append(index)

    def view(self, index: int) -> memoryview:
        """The writable record a worker hands to the compiled loop."""
        start = index * self.record.size
        return memoryview(self.memory)[start:start + self.record.size]

    def fields(self, index: int) -> tuple[float, ...]:
        """A record's doubles as they are now (fastpool.metrics reads them by layout)."""
        return self.record.unpack_from(self.memory, index * self.record.size)

    def read(self, index: int) -> Record:
        fields = self.fields(index)
        at = self.layout
        return Record(int(fields[at["requests"]]), fields[at["busy_since"]],
                      self.states.get(int(fields[at["state"]]), "unknown"),
                      int(fields[at["handed_in"]]), int(fields[at["handed_out"]]),
                      int(fields[at["shed"]]))

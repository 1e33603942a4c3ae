#!/usr/bin/env python3
"""A mutation fuzzer for fastpool's HTTP/1.1 core, run against a real server.

    python tests/fuzz.py --seconds 60 --interface asgi [--seed 1] [--concurrency 8]
    python tests/fuzz.py --replay FINDING.json     # resend one saved finding
    python tests/fuzz.py --reduce FINDING.json     # shrink it to a minimal input

It starts ``python -m fastpool serve`` (2 workers on a free loopback port, a
short ``--header-timeout`` so that a stalled connection ends, a body limit,
its control socket in a temporary directory) with the apps of apps_fuzz.py,
sends it mutated requests for the given time, stops it and reports:

* cases run, in all and per mutation kind;
* worker deaths: ``fastpool status --json`` before and after the run (and the
  same reply, read from the control socket, four times a second during it):
  a worker pid that disappeared or a restart count that grew is a death.
  Between two replies the workers' pids are watched in /proc every 20 ms, so
  a death is attributed to the few cases in flight just then; after the run
  those are replayed one by one, alone, to find the one that kills a worker.
  Deaths are grouped by the shape of that request;
* hangs: a connection that got neither a complete answer nor a close within
  header_timeout + 1 s of its last byte sent (plus ``--hang-slack``, 0.5 s, as
  the server looks at its timeouts once a second), watched 10 s more to say
  whether the server was late or stuck, and replayed alone: a hang that does
  not happen alone (another connection held the worker) is reported as
  unconfirmed, not as a finding;
* malformed responses: anything that is not a sequence of well-formed HTTP/1.1
  responses (status line, header lines, framing by Content-Length or chunked,
  nothing after a response that says ``Connection: close``, no more
  responses than requests), or a 5xx other than 500/501/503/505.

Each finding is saved under ``--out`` as ``KIND-HASH.json``: the exact bytes
as the writes they were sent in, the pauses between them and how the
connection ended; ``--replay`` resends it and ``--reduce`` shrinks it (delta
debugging over writes, lines and bytes).  Reduced findings worth keeping go
to tests/fuzz_findings/, which test_fuzz.py replays.  The exit status is 1
when there are findings, 0 otherwise (2 when the server cannot be run at all).

Mutations, over the seeds of tests/requests/**/*.http (when that corpus
exists) and the built-in SEEDS below: bit flips; byte inserts, deletes and
replacements with interesting bytes; truncation; duplication of a line or a
range; splices of two seeds; headers from a dictionary; chunked-body faults
(size lines, extensions, trailers, CRLFs); a valid request pipelined after a
mutated one; junk after a valid request.  Independently a case may be split
into several writes with tiny pauses (TCP_NODELAY), close its write side
early, or reset the connection (SO_LINGER 0) mid-request or mid-response.

The client is one thread with a selector: no fixed sleeps beyond the pauses
between the writes of a case.  A connection whose answer is incomplete once
everything was sent either half-closes (most cases, after a short quiet
time, so the server answers at once) or waits for the server's own
timeouts; those waiting connections do not count against --concurrency.
"""

from __future__ import annotations

import argparse
import base64
import collections
import ctypes
import hashlib
import json
import os
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
CORPUS = TESTS / "requests"

WORKERS = 2
LIMIT_BODY = 65536
FIELD_LIMIT = 8190          # the server's default limit_request_field_size
LINE_LIMIT = 4094           # the server's default limit_request_line
QUIET = 0.03                # seconds of silence before an unfinished case acts
UPGRADE_GRACE = 0.3         # seconds to wait for WebSocket frames after a 101
WATCH_LATE = 10.0           # seconds a hung connection is still watched, to say what came
STATUS_EVERY = 0.25         # seconds between two status replies from the master
WATCH_EVERY = 0.02          # seconds between two looks at the workers in /proc
HISTORY = 2000              # finished cases kept for the attribution of deaths
EXAMPLES = 5                # cases kept per finding signature beyond the first
ALLOWED_5XX = {500, 501, 503, 505}


# ---------------------------------------------------------------- seeds

def _ws_frame(payload: bytes, opcode: int = 1, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A masked client WebSocket frame (payload under 126 bytes)."""
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


WS_HEAD = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")

SEEDS: dict[str, bytes] = {
    "get": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "get-query": (b"GET /a/b?x=1&y=%20z HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                  b"User-Agent: fuzz/1.0\r\nAccept: */*\r\nAccept-Encoding: gzip\r\n\r\n"),
    "get-path": b"GET /a%2Fb/../c/./d//e%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n",
    "get-close": b"GET /close HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "get-stream": b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n",
    "get-204": b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n",
    "head": b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n",
    "head-stream": b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n",
    "post-cl": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 11\r\n\r\nhello world"),
    "post-cl-0": b"POST /empty HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "post-noread": b"POST /noread HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde",
    "post-stream": b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwxyz",
    "post-big": (b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
                 + bytes(range(256)) * 78 + bytes(32)),
    "put-binary": (b"PUT /put HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                   b"Content-Length: 8\r\n\r\n\x00\x01\r\n\xff\x80\n\r"),
    "patch-json": (b"PATCH /p HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 13\r\n\r\n{\"a\": [1, 2]}"),
    "delete": b"DELETE /item/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "chunked": (b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    "chunked-ext": (b"POST /ext HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5;name=value\r\nhello\r\n1;a;b=\"q\"\r\n!\r\n0;last\r\n\r\n"),
    "chunked-trailers": (b"POST /trailers HTTP/1.1\r\nHost: x\r\nTrailer: X-Sum\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nA\r\n0123456789\r\n"
                         b"0\r\nX-Sum: 13\r\nX-Other: two\r\n\r\n"),
    "chunked-bytes": (b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"".join(b"1\r\n" + bytes([c]) + b"\r\n" for c in b"tiny")
                      + b"0\r\n\r\n"),
    "pipeline-get": (b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n"),
    "pipeline-mixed": (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
                       b"HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n"),
    "pipeline-chunked": (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nab\r\n0\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n"),
    "http10": b"GET /old HTTP/1.0\r\n\r\n",
    "http10-keepalive": (b"GET /k1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                         b"GET /k2 HTTP/1.0\r\n\r\n"),
    "http10-post": b"POST /stream HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    "websocket": WS_HEAD + _ws_frame(b"hello"),
    "websocket-binary": WS_HEAD.replace(b"/ws", b"/ws/b") + _ws_frame(b"\x00\xff", opcode=2),
    "expect": (b"POST /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Length: 4\r\n\r\nbody"),
    "expect-chunked": (b"PUT /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"),
    "absolute": (b"GET http://127.0.0.1:8000/abs?q=1 HTTP/1.1\r\n"
                 b"Host: 127.0.0.1:8000\r\n\r\n"),
    "asterisk": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "purge": b"PURGE /cache/key HTTP/1.1\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
    "many-headers": (b"GET /h HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-H%d: value %d\r\n" % (i, i) for i in range(20))
                     + b"Cookie: a=1\r\nCookie: b=2\r\nX-Empty:\r\nX-Tab:\tv\t\r\n\r\n"),
    "line-limit": b"GET /" + b"a" * (LINE_LIMIT - 14) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "line-over": b"GET /" + b"a" * (LINE_LIMIT - 13) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}

INTERESTING = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b",", b";",
               *(bytes([c]) for c in b"0123456789abcdef"), b"\x80", b"\xff", b"\x0b"]
INTERESTING_RUNS = [b"\r\n", b"\r\n\r\n", b"\n\n", b" \t", b"\r\n ", b"0\r\n\r\n", b"\xff" * 4,
                    b"%", b"%00", b"/..", b"HTTP/1.1", b"\r\nX: y\r\n"]


def _near_limit(name: bytes) -> list[bytes]:
    """Header lines whose name, colon and value are just under, at and over the limit."""
    size = FIELD_LIMIT - 2 - len(name)
    return [name + b": " + b"v" * (size + d) for d in (-1, 0, 1)]


HEADER_DICTIONARY = [
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked", b"Transfer-Encoding:  chunked ",
    b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, gzip", b"Transfer-Encoding: identity",
    b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked\x0b", b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding:\tchunked", b"Transfer-Encoding : chunked",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"Transfer-Encoding:\r\n chunked",
    b"Transfer-Encoding: \"chunked\"", b"transfer-encoding: CHUNKED", b"Transfer-Encoding:",
    b"Content-Length: 0", b"Content-Length: 1", b"Content-Length: 5", b"Content-Length: 100",
    b"Content-Length: -1", b"Content-Length: +5", b"Content-Length:  5 ", b"Content-Length: 5, 5",
    b"Content-Length: 5,6", b"Content-Length: 05", b"Content-Length: 99999999999999999999",
    b"Content-Length: 18446744073709551616", b"Content-Length: 1e3", b"Content-Length: 0x10",
    b"Content-Length:", b"Content-Length: 5\r\nContent-Length: 5",
    b"Content-Length: 5\r\nContent-Length: 6", b"Content-Length: %d" % LIMIT_BODY,
    b"Content-Length: %d" % (LIMIT_BODY + 1), b"Content-Length: 4294967296",
    b"Host: ", b"Host: x\r\nHost: y", b"Host: a b", b"Host: [::1]:80", b"Host: 127.0.0.1:99999",
    b"Host: a\x00b", b"Host: user@x", b"Host: xn--nxasmq6b.example", b"Host: " + b"h" * 300,
    b"Expect: 100-continue", b"Expect: 100-Continue", b"Expect: 100-continue, foo",
    b"Expect: foo",
    b"Connection: upgrade", b"Connection: close", b"Connection: keep-alive",
    b"Connection: keep-alive, upgrade", b"Connection: Upgrade, close", b"Connection: TE, close",
    b"Connection: close, keep-alive", b"Connection:",
    b"Upgrade: websocket", b"Upgrade: x", b"Upgrade: h2c", b"Upgrade: HTTP/2.0",
    b"Connection: Upgrade\r\nUpgrade: x",
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13",
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13",
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
    b"Sec-WebSocket-Version: 8", b"Sec-WebSocket-Key: short", b"Sec-WebSocket-Protocol: a, b",
    *_near_limit(b"X-Long"), *_near_limit(b"Cookie"), b"X" * (FIELD_LIMIT - 3) + b": v",
    b"X-Empty:", b"X-Space : v", b" X-Folded: v", b"X-Fold: a\r\n b", b"X-Nul: a\x00b",
    b"X-Cr: a\rb", b"X-Utf8: \xc3\xa9\xff", b"X-Many: " + b",".join([b"a"] * 200),
    b"Content-Type: multipart/form-data; boundary=x", b"X-Forwarded-For: 1.2.3.4, ::1",
    b"X-Forwarded-Proto: https", b"Forwarded: for=1.2.3.4", b"Range: bytes=0-1",
    b"Trailer: X-T", b"TE: trailers", b"Proxy-Connection: keep-alive",
]


def load_seeds() -> dict[str, bytes]:
    """The built-in seeds plus every tests/requests/**/*.http file (as is, and
    with CRLF line ends when the file has bare LFs only)."""
    seeds = dict(SEEDS)
    if CORPUS.is_dir():
        for path in sorted(CORPUS.rglob("*.http")):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if not data:
                continue
            name = str(path.relative_to(CORPUS))
            seeds[name] = data
            if b"\n" in data and b"\r\n" not in data:
                seeds[name + "(crlf)"] = data.replace(b"\n", b"\r\n")
    return seeds


# ---------------------------------------------------------------- cases


class Case:
    """One connection's worth of bytes and what to do with the connection."""

    __slots__ = ("index", "seed", "mutations", "writes", "pauses", "close", "cut", "nudge",
                 "t_start", "t_end", "outcome", "received", "detail")

    def __init__(self, writes: list[bytes], pauses: list[float], *, index: int = 0,
                 seed: str = "", mutations: list[str] | None = None, close: str | None = None,
                 cut: int = 0, nudge: bool = True) -> None:
        self.index = index
        self.seed = seed
        self.mutations = mutations or []
        self.writes = writes
        self.pauses = pauses            # pauses[i]: seconds between writes[i] and writes[i + 1]
        # None; "shut-wr-early" (half-close after ``cut`` writes, the rest unsent);
        # "rst-request" (reset after ``cut`` writes); "rst-response" (reset when
        # the first response bytes arrive).
        self.close = close
        self.cut = cut
        # Unfinished once everything was sent: half-close after QUIET (True) or
        # wait for the server's own timeouts (False).
        self.nudge = nudge
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.outcome = ""
        self.received = b""
        self.detail = ""                # what was wrong, for a case that is a finding

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def sent_data(self) -> bytes:
        """The bytes this case sends before it closes or resets."""
        if self.close in ("shut-wr-early", "rst-request"):
            return b"".join(self.writes[:self.cut])
        return self.data

    def digest(self) -> str:
        h = hashlib.sha256()
        for w in self.writes:
            h.update(len(w).to_bytes(8, "big") + w)
        h.update(repr((self.close, self.cut, self.nudge)).encode())
        return h.hexdigest()[:12]

    def copy(self, **changes: Any) -> Case:
        fields = dict(writes=self.writes, pauses=self.pauses, index=self.index, seed=self.seed,
                      mutations=self.mutations, close=self.close, cut=self.cut, nudge=self.nudge)
        fields.update(changes)
        return Case(fields.pop("writes"), fields.pop("pauses"), **fields)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "mutations": self.mutations, "case_index": self.index,
            "writes": [base64.b64encode(w).decode("ascii") for w in self.writes],
            "writes_repr": [repr(w) for w in self.writes],
            "pauses_s": [round(p, 6) for p in self.pauses],
            "close": self.close, "cut": self.cut, "nudge": self.nudge,
            **({"detail": self.detail} if self.detail else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        writes = [base64.b64decode(w) for w in data["writes"]]
        pauses = list(data.get("pauses_s") or [0.002] * (len(writes) - 1))
        return cls(writes, pauses, index=data.get("case_index", 0), seed=data.get("seed", ""),
                   mutations=list(data.get("mutations") or []), close=data.get("close"),
                   cut=int(data.get("cut") or 0), nudge=bool(data.get("nudge", True)))

    def describe(self) -> str:
        return f"case {self.index} ({self.seed}: {', '.join(self.mutations) or 'unmutated'})"


HEAD_END = re.compile(rb"\r?\n\r?\n")
REQUEST_LINE = re.compile(rb"(?:^|\n)[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/1\.[01]\r?\n")


def expected_answers(data: bytes) -> int:
    """How many final responses the client waits for before it considers a
    kept-open connection answered: the request lines it sent (at least one)."""
    return max(1, len(REQUEST_LINE.findall(data)))


def most_answers(data: bytes) -> int:
    """No server may send more final responses than this: every request
    needs a version token, plus one error response for a broken one."""
    return data.count(b"HTTP/") + data.count(b"RTSP/") + data.count(b"ICE/") + 1


class Mutator:
    """The mutation kinds, each ``(rng, data) -> data``."""

    def __init__(self, rng: random.Random, seeds: dict[str, bytes]) -> None:
        self.rng = rng
        self.seeds = seeds
        self.names = list(seeds)
        self.valid = [SEEDS[n] for n in ("get", "get-query", "post-cl", "chunked", "head",
                                         "post-cl-0", "get-stream", "delete")]
        self.kinds: dict[str, tuple[int, Callable[[bytes], bytes]]] = {
            "bitflip": (10, self.bitflip), "insert": (10, self.insert),
            "delete": (8, self.delete), "replace": (10, self.replace),
            "truncate": (5, self.truncate), "dup-line": (6, self.dup_line),
            "dup-range": (5, self.dup_range), "splice": (5, self.splice),
            "header": (16, self.header), "chunked": (12, self.chunked),
        }
        self.kind_names = list(self.kinds)
        self.kind_weights = [w for w, _ in self.kinds.values()]

    def pos(self, data: bytes, end: bool = True) -> int:
        return self.rng.randint(0, len(data)) if end else self.rng.randrange(max(1, len(data)))

    def interesting(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.2:
            return rng.choice(INTERESTING_RUNS)
        return b"".join(rng.choice(INTERESTING) for _ in range(rng.choice((1, 1, 1, 2, 3))))

    def bitflip(self, data: bytes) -> bytes:
        if not data:
            return data
        b = bytearray(data)
        for _ in range(self.rng.choice((1, 1, 2, 4))):
            b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def insert(self, data: bytes) -> bytes:
        at = self.structural_pos(data)
        return data[:at] + self.interesting() + data[at:]

    def delete(self, data: bytes) -> bytes:
        if not data:
            return data
        at = self.structural_pos(data)
        size = self.rng.choice((1, 1, 1, 2, 4, 8, 32))
        return data[:at] + data[at + size:]

    def replace(self, data: bytes) -> bytes:
        if not data:
            return data
        at = min(self.structural_pos(data), len(data) - 1)
        new = self.interesting()
        return data[:at] + new + data[at + len(new):]

    def structural_pos(self, data: bytes) -> int:
        """Half the time a position at or next to a delimiter (CR, LF, ':', ' ', ';')."""
        if data and self.rng.random() < 0.5:
            spots = [m.start() for m in re.finditer(rb"[\r\n: ;]", data[:16384])]
            if spots:
                return min(len(data), max(0, self.rng.choice(spots) + self.rng.choice((-1, 0, 1))))
        return self.pos(data)

    def truncate(self, data: bytes) -> bytes:
        return data[:self.rng.randint(1, max(1, len(data) - 1))]

    def dup_line(self, data: bytes) -> bytes:
        lines = data.splitlines(keepends=True)
        if not lines:
            return data
        i = self.rng.randrange(len(lines))
        lines.insert(i, lines[i] * self.rng.choice((1, 1, 2, 50)))
        return b"".join(lines)

    def dup_range(self, data: bytes) -> bytes:
        if not data:
            return data
        a = self.rng.randrange(len(data))
        b = min(len(data), a + self.rng.choice((1, 2, 8, 64, 512)))
        return data[:b] + data[a:b] * self.rng.choice((1, 1, 2, 3)) + data[b:]

    def splice(self, data: bytes) -> bytes:
        other = self.seeds[self.rng.choice(self.names)]
        return data[:self.pos(data)] + other[self.pos(other):]

    def header(self, data: bytes) -> bytes:
        """A header line from the dictionary, at a line start of the first head."""
        entry = self.rng.choice(HEADER_DICTIONARY) + b"\r\n"
        end = data.find(b"\r\n\r\n")
        first = data.find(b"\r\n")
        if first < 0:
            return data + b"\r\n" + entry + b"\r\n"
        limit = end + 2 if end >= 0 else len(data)
        starts = [m.end() for m in re.finditer(rb"\r\n", data[:limit])]
        at = self.rng.choice(starts) if starts else first + 2
        out = data[:at] + entry + data[at:]
        if end >= 0 and self.rng.random() < 0.3:
            # Replace a header of the same name that was there.
            name = entry.split(b":", 1)[0].strip().lower()
            lines = out[:end + len(entry)].split(b"\r\n")
            kept, dropped = [], False
            for line in lines:
                if (not dropped and line and line != entry[:-2]
                        and line.split(b":", 1)[0].strip().lower() == name):
                    dropped = True
                    continue
                kept.append(line)
            out = b"\r\n".join(kept) + out[end + len(entry):]
        return out

    def chunked(self, data: bytes) -> bytes:
        """Re-encode the first request's body as chunked, with faults."""
        rng = self.rng
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return self.insert(data)
        head, rest = data[:end + 2], data[end + 4:]
        body, after = rest, b""
        length = re.search(rb"(?im)^content-length:[ \t]*([0-9]{1,9})[ \t]*\r?$", head)
        if length:
            body, after = rest[:int(length.group(1))], rest[int(length.group(1)):]
        elif re.search(rb"(?im)^transfer-encoding:.*chunked", head):
            body, after = dechunk(rest)
        lines = [line for line in head.split(b"\r\n") if line and not re.match(
            rb"(?i)(content-length|transfer-encoding)\s*:", line)]
        if not lines:
            lines = [b"POST / HTTP/1.1"]
        if not body and rng.random() < 0.7:
            body = rng.choice((b"hello", b"x" * 100, bytes(range(256)), b"\r\n0\r\n\r\n"))
        lines.insert(rng.randint(1, len(lines)), b"Transfer-Encoding: chunked")
        if lines[0].startswith((b"GET ", b"HEAD ")) and rng.random() < 0.5:
            lines[0] = b"POST" + lines[0][lines[0].index(b" "):]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.chunk_body(body) + after

    def chunk_body(self, body: bytes) -> bytes:
        rng = self.rng

        def fault() -> bool:
            return rng.random() < 0.15

        pieces, at = [], 0
        while at < len(body):
            size = rng.choice((1, 3, 16, 100, 4096, len(body)))
            pieces.append(body[at:at + size])
            at += size
        out = []
        for piece in pieces:
            size = format(len(piece), rng.choice("xX"))
            if fault():
                size = rng.choice((
                    "0" * rng.choice((1, 20)) + size, " " + size, size + " ", size + "\t",
                    "+" + size, "-" + size, "0x" + size, format(len(piece) + 1, "x"),
                    format(max(0, len(piece) - 1), "x"), "ffffffffffffffff", "10000000000000000",
                    "f" * 40, "", "g", size + "\x00", size + "\r"))
            ext = ""
            if rng.random() < 0.3:
                ext = rng.choice((";a", ";a=b", ';a="b c"', "; a=b", ";a=b;c=d", ";", ";=",
                                  ';a="\\""', ";" + "e" * rng.choice((100, 4000, 9000)),
                                  ";\x00", ";a\rb", ";a\nb"))
            eol = b"\r\n"
            if fault():
                eol = rng.choice((b"\n", b"\r", b"\r\r\n", b"\r\n\r\n", b" \r\n", b""))
            data_end = b"\r\n"
            if fault():
                data_end = rng.choice((b"", b"\n", b"\r", b"XX", b"\r\n\r\n"))
            out.append(size.encode("latin-1") + ext.encode("latin-1") + eol + piece + data_end)
        last = rng.choice((b"0",) * 6 + (b"00", b"000000", b"0;ext", b"0 ", b"0\t;x=1"))
        trailers: list[bytes] = []
        if rng.random() < 0.3:
            trailers = rng.choice(([b"X-Trailer: 1"], [b"X-A: 1", b"X-B: 2"],
                                   [b"Content-Length: 5"], [b"Transfer-Encoding: chunked"],
                                   [b"X-T: " + b"t" * (FIELD_LIMIT - 7)], [b"bad trailer"],
                                   [b"X: a", b" folded"], [b"Host: a", b"Host: b"],
                                   [b"X-Nul: \x00"], [b": empty-name"]))
        final = b"\r\n"
        if fault():
            final = rng.choice((b"", b"\n", b"\r\n\r\n", b"\r", b"\r\n0\r\n\r\n"))
        return (b"".join(out) + last + b"\r\n"
                + b"".join(t + b"\r\n" for t in trailers) + final)

    def junk(self) -> bytes:
        rng = self.rng
        return rng.choice((
            lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))),
            lambda: b"".join(rng.choice(INTERESTING) for _ in range(rng.randint(1, 16))),
            lambda: b"GET /" + bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, 9))),
            lambda: b"\r\n" * rng.randint(1, 4),
            lambda: b"HTTP/1.1 200 OK\r\n\r\n",
            lambda: b"0\r\n\r\n",
            lambda: b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",       # a TLS hello
            lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ))()


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """(body, rest) of a chunked body, leniently; all of it as body if unreadable."""
    body, at = [], 0
    while True:
        eol = data.find(b"\r\n", at)
        size = re.fullmatch(rb"[ \t]*([0-9a-fA-F]{1,8})[ \t]*(?:;.*)?",
                            data[at:eol], re.DOTALL) if eol >= 0 else None
        if size is None:
            return data, b""
        at = eol + 2            # always forward: a size is never negative
        if int(size.group(1), 16) == 0:
            end = data.find(b"\r\n\r\n", at - 2)
            return b"".join(body), data[end + 4:] if end >= 0 else b""
        body.append(data[at:at + int(size.group(1), 16)])
        at += int(size.group(1), 16) + 2


class Generator:
    """The reproducible stream of cases (``--seed``)."""

    def __init__(self, rng: random.Random, seeds: dict[str, bytes]) -> None:
        self.rng = rng
        self.seeds = seeds
        self.names = list(seeds)
        self.mutator = Mutator(rng, seeds)
        self.count = 0

    def __iter__(self) -> Iterator[Case]:
        return self

    def __next__(self) -> Case:
        rng, m = self.rng, self.mutator
        name = rng.choice(self.names)
        data = self.seeds[name]
        kinds: list[str] = []
        roll = rng.random()
        if roll < 0.03:
            kinds.append("unmutated")
        elif roll < 0.09:
            data = data + m.junk()
            kinds.append("junk")
        else:
            for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
                kind = rng.choices(m.kind_names, m.kind_weights)[0]
                data = m.kinds[kind][1](data)
                kinds.append(kind)
            if rng.random() < 0.1:
                data = data + rng.choice(m.valid)
                kinds.append("pipeline")
        if not data:
            data = b"\r\n"
        writes, pauses = self.split(data)
        if len(writes) > 1:
            kinds.append("split")
        close, cut = None, 0
        roll = rng.random()
        if roll < 0.08:
            close = "shut-wr-early"
        elif roll < 0.14:
            close = "rst-request"
        elif roll < 0.20:
            close = "rst-response"
        if close in ("shut-wr-early", "rst-request"):
            if len(writes) == 1 and len(data) > 1:
                at = rng.randrange(1, len(data))
                writes, pauses = [data[:at], data[at:]], [rng.uniform(0.0005, 0.003)]
            cut = rng.randrange(1, len(writes)) if len(writes) > 1 else 1
        if close:
            kinds.append(close)
        self.count += 1
        return Case(writes, pauses, index=self.count, seed=name, mutations=kinds, close=close,
                    cut=cut, nudge=rng.random() < 0.8)

    def split(self, data: bytes) -> tuple[list[bytes], list[float]]:
        rng = self.rng
        if len(data) < 2 or rng.random() < 0.5:
            return [data], []
        if len(data) <= 160 and rng.random() < 0.05:
            points = list(range(1, len(data)))       # byte by byte
        else:
            want = rng.choice((1, 1, 1, 2, 2, 3, 5))
            points_set: set[int] = set()
            if rng.random() < 0.5:
                # At a head's end (the body arrives in a later read) or inside the CRLFCRLF.
                ends = [e.end() - rng.choice((0, 0, 1, 2)) for e in HEAD_END.finditer(data)]
                ends = [e for e in ends if 0 < e < len(data)]
                if ends:
                    points_set.add(rng.choice(ends))
            while len(points_set) < min(want, len(data) - 1):
                points_set.add(rng.randrange(1, len(data)))
            points = sorted(points_set)
        bounds = [0, *points, len(data)]
        writes = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        return writes, [rng.uniform(0.0005, 0.003) for _ in writes[1:]]


# ---------------------------------------------------------------- responses


class Malformed(Exception):
    """The server sent bytes that are not a well-formed response stream."""


TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\t\x20-\x7e\x80-\xff]+)")
CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,16})(;[^\r\n]*)?")


class ResponseStream:
    """An incremental, strict reader of the responses on one connection."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.state = "head"   # head, length, chunk-size, chunk-data, trailers, close-body,
        self.remaining = 0    # after-close, upgraded
        self.finals = 0
        self.interim = 0
        self.statuses: list[int] = []
        self.last_close = False
        self.close_flag = False
        self.upgraded_at: float | None = None
        self.ws_closed = False

    def at_boundary(self) -> bool:
        return self.state in ("head", "after-close") and self.pos == len(self.buf)

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        self.parse(now)

    def finish(self, eof: bool) -> None:
        """The connection is over: a response cut short by a clean close is malformed."""
        if self.state == "close-body" and eof:
            self.pos = len(self.buf)
            self.complete()
            return
        if not eof or self.state in ("upgraded", "after-close"):
            return
        if self.state != "head" or self.pos < len(self.buf):
            raise Malformed(f"connection closed inside a response (in {self.state}: "
                            f"{bytes(self.buf[self.pos:self.pos + 80])!r})")

    def complete(self) -> None:
        self.last_close = self.close_flag
        self.state = "after-close" if self.close_flag else "head"

    def line(self, limit: int) -> bytes | None:
        """The next CRLF-terminated line (without it), or None if incomplete."""
        end = self.buf.find(b"\r\n", self.pos)
        scan_end = len(self.buf) if end < 0 else end
        bare = self.buf.find(b"\n", self.pos, scan_end)
        if bare >= 0:
            raise Malformed(f"bare LF in {bytes(self.buf[self.pos:bare + 1])[-80:]!r}")
        if end < 0:
            if len(self.buf) - self.pos > limit:
                raise Malformed(f"line longer than {limit} bytes")
            return None
        if end - self.pos > limit:
            raise Malformed(f"line longer than {limit} bytes")
        line = bytes(self.buf[self.pos:end])
        self.pos = end + 2
        return line

    def parse(self, now: float) -> None:
        while True:
            state = self.state
            if state == "upgraded":
                self.ws_frames()
                return
            if state == "after-close":
                if self.pos < len(self.buf):
                    raise Malformed("bytes after a response that said Connection: close: "
                                    f"{bytes(self.buf[self.pos:self.pos + 80])!r}")
                return
            if state == "head":
                if not self.head(now):
                    return
            elif state == "length":
                take = min(self.remaining, len(self.buf) - self.pos)
                self.pos += take
                self.remaining -= take
                if self.remaining:
                    return
                self.complete()
            elif state == "close-body":
                self.pos = len(self.buf)
                return
            elif state == "chunk-size":
                start = self.pos
                line = self.line(4096)
                if line is None:
                    return
                match = CHUNK_SIZE.fullmatch(line)
                if not match:
                    self.pos = start
                    raise Malformed(f"bad chunk size line {line[:80]!r}")
                size = int(match.group(1), 16)
                if size == 0:
                    self.state = "trailers"
                else:
                    self.remaining = size
                    self.state = "chunk-data"
            elif state == "chunk-data":
                take = min(self.remaining, len(self.buf) - self.pos)
                self.pos += take
                self.remaining -= take
                if self.remaining or len(self.buf) - self.pos < 2:
                    return
                if self.buf[self.pos:self.pos + 2] != b"\r\n":
                    raise Malformed("chunk data not followed by CRLF: "
                                    f"{bytes(self.buf[self.pos:self.pos + 20])!r}")
                self.pos += 2
                self.state = "chunk-size"
            elif state == "trailers":
                line = self.line(65536)
                if line is None:
                    return
                if line:
                    self.header_line(line)
                else:
                    self.complete()

    def header_line(self, line: bytes) -> tuple[bytes, bytes]:
        if line[:1] in (b" ", b"\t"):
            raise Malformed(f"folded header line {line[:80]!r}")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise Malformed(f"bad header line {line[:80]!r}")
        if b"\x00" in value or b"\r" in value:
            raise Malformed(f"CR or NUL in header value {line[:80]!r}")
        return name.lower(), value.strip(b" \t")

    def head(self, now: float) -> bool:
        """Parse one response head; False when more bytes are needed."""
        rest = bytes(self.buf[self.pos:self.pos + 9])
        if not b"HTTP/1.1 ".startswith(rest):
            raise Malformed(f"not a status line: {bytes(self.buf[self.pos:self.pos + 80])!r}")
        end = self.buf.find(b"\r\n\r\n", self.pos)
        limit = end if end >= 0 else len(self.buf)
        bare = re.search(rb"(?<!\r)\n", self.buf[self.pos:limit + 2 if end >= 0 else limit])
        if bare:
            raise Malformed("bare LF in a response head: "
                            f"{bytes(self.buf[self.pos:self.pos + bare.end()])[-80:]!r}")
        if end < 0:
            if len(self.buf) - self.pos > 65536:
                raise Malformed("response head longer than 64 KiB")
            return False
        lines = bytes(self.buf[self.pos:end]).split(b"\r\n")
        match = STATUS_LINE.fullmatch(lines[0])
        if not match or b"\r" in lines[0] or b"\x00" in lines[0]:
            raise Malformed(f"bad status line {lines[0][:80]!r}")
        code = int(match.group(1))
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, value = self.header_line(line)
            headers.setdefault(name, []).append(value)
        self.pos = end + 4
        tokens = {t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")}
        self.close_flag = b"close" in tokens
        te = headers.get(b"transfer-encoding")
        cl = headers.get(b"content-length")
        if code < 200:
            if te or (cl and cl != [b"0"]):
                raise Malformed(f"{code} response with a body framing header")
            if code == 101:
                self.state = "upgraded"
                self.upgraded_at = now
                self.finals += 1
                self.statuses.append(code)
                return True
            self.interim += 1
            return True
        self.finals += 1
        self.statuses.append(code)
        if code >= 500 and code not in ALLOWED_5XX:
            raise Malformed(f"status {code} from the server itself: {lines[0]!r}")
        if te and cl:
            raise Malformed("response with both Transfer-Encoding and Content-Length")
        if code == 204 and (te or cl):
            raise Malformed("204 response with Transfer-Encoding or Content-Length")
        is_head = headers.get(b"x-method") == [b"HEAD"]
        if code in (204, 304) or is_head:
            self.complete()
            return True
        if te:
            codings = [c.strip().lower() for v in te for c in v.split(b",")]
            if codings[-1] != b"chunked":
                raise Malformed(f"Transfer-Encoding {te!r} does not end in chunked")
            self.state = "chunk-size"
            return True
        if cl:
            if len(set(cl)) > 1 or not cl[0].isdigit() or len(cl[0]) > 18:
                raise Malformed(f"bad Content-Length {cl!r}")
            self.remaining = int(cl[0])
            self.state = "length"
            return True
        if not self.close_flag:
            raise Malformed(f"{code} response with neither a length nor Connection: close")
        self.state = "close-body"
        return True

    def ws_frames(self) -> None:
        """Walk the server's WebSocket frames after a 101 (until a close frame)."""
        while not self.ws_closed and len(self.buf) - self.pos >= 2:
            b0, b1 = self.buf[self.pos], self.buf[self.pos + 1]
            if b1 & 0x80:
                raise Malformed("masked WebSocket frame from the server")
            size, offset = b1 & 0x7F, 2
            if size == 126:
                if len(self.buf) - self.pos < 4:
                    return
                size, offset = struct.unpack_from("!H", self.buf, self.pos + 2)[0], 4
            elif size == 127:
                if len(self.buf) - self.pos < 10:
                    return
                size, offset = struct.unpack_from("!Q", self.buf, self.pos + 2)[0], 10
            if len(self.buf) - self.pos < offset + size:
                return
            self.pos += offset + size
            if b0 & 0x0F == 8:
                self.ws_closed = True


# ---------------------------------------------------------------- connections


class Finding:
    def __init__(self, kind: str, detail: str, case: Case | None,
                 cases: list[Case] | None = None) -> None:
        self.kind = kind            # death, hang, malformed
        self.detail = detail
        self.case = case
        self.cases = cases or []    # death candidates when no single culprit was found
        self.path: Path | None = None
        self.confirmed: bool | None = None
        self.count = 1
        self.examples: list[Case] = []   # more cases with the same signature (a few)

    def signature(self) -> str:
        detail = re.sub(r"b'.*", "", self.detail)
        detail = re.sub(r"\d+", "N", detail)
        return f"{self.kind}: {detail.strip()}"


class Conn:
    """One case on one connection: the client's state machine."""

    def __init__(self, case: Case, port: int, limit: float, now: float,
                 watch_late: float = WATCH_LATE) -> None:
        self.case = case
        self.limit = limit          # header_timeout + 1 s + slack: later is a hang
        self.watch_late = watch_late
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.connected = False
        self.widx = 0
        self.woff = 0
        self.next_write = now
        self.sending = True
        self.t_sent: float | None = None
        self.t_last_rx = now
        self.t_start = now
        self.stream = ResponseStream()
        self.sent = bytearray()
        self.shut = False
        self.parked = False
        self.done = False
        self.outcome = ""
        self.finding: tuple[str, str] | None = None
        self.mask = 0
        self.late: str | None = None     # why it is a hang, once past the limit
        case.t_start = now
        try:
            self.sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError as exc:
            self.end(f"connect failed: {exc.strerror}")

    # ---- ending

    def end(self, outcome: str, finding: tuple[str, str] | None = None) -> None:
        if self.done:
            return
        if self.late is not None and outcome != "hang":
            # Past the hang limit already: what happened in the end is the detail.
            assert self.t_sent is not None
            outcome, finding = "hang", ("hang", f"{self.late}; then {outcome} "
                                        f"{time.monotonic() - self.t_sent:.1f} s after the "
                                        "last write")
        self.done = True
        self.outcome = outcome
        self.finding = finding
        self.case.outcome = outcome
        self.case.detail = finding[1] if finding else ""
        self.case.received = bytes(self.stream.buf[:65536])

    def reset(self, outcome: str) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.end(outcome)

    def malformed(self, exc: Malformed) -> None:
        self.end("malformed", ("malformed", str(exc)))

    # ---- events

    def wanted_mask(self, now: float) -> int:
        if self.done:
            return 0
        if not self.connected:
            return selectors.EVENT_WRITE
        mask = selectors.EVENT_READ
        if self.sending and self.next_write <= now:
            mask |= selectors.EVENT_WRITE
        return mask

    def on_event(self, mask: int, now: float) -> None:
        if self.done:
            return
        if not self.connected and mask & selectors.EVENT_WRITE:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.end(f"connect failed: {os.strerror(err)}")
                return
            self.connected = True
        if mask & selectors.EVENT_READ:
            self.read(now)
        if not self.done and self.sending and self.next_write <= now:
            self.write(now)

    def write(self, now: float) -> None:
        case = self.case
        while self.widx < len(case.writes):
            chunk = case.writes[self.widx]
            try:
                n = self.sock.send(chunk[self.woff:] if self.woff else chunk)
            except BlockingIOError:
                return
            except OSError:
                # The server closed or reset: stop sending, read what it said.
                self.sending = False
                self.t_sent = now
                return
            self.sent += chunk[self.woff:self.woff + n]
            self.woff += n
            if self.woff < len(chunk):
                return
            self.widx += 1
            self.woff = 0
            if case.close == "rst-request" and self.widx >= case.cut:
                self.reset("reset by client mid-request")
                return
            if case.close == "shut-wr-early" and self.widx >= case.cut:
                self.shutdown()
                break
            if self.widx < len(case.writes):
                self.next_write = now + case.pauses[self.widx - 1]
                return
        self.sending = False
        self.t_sent = now

    def shutdown(self) -> None:
        self.shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def read(self, now: float) -> None:
        for _ in range(8):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except ConnectionResetError:
                self.closed(now, eof=False)
                return
            except OSError as exc:
                self.end(f"recv failed: {exc.strerror}")
                return
            if not data:
                self.closed(now, eof=True)
                return
            self.t_last_rx = now
            try:
                self.stream.feed(data, now)
            except Malformed as exc:
                self.malformed(exc)
                return
            if self.case.close == "rst-response":
                self.reset("reset by client mid-response")
                return
            self.check_answers()
            if self.done:
                return
            if len(data) < 65536:
                return

    def closed(self, now: float, eof: bool) -> None:
        stream = self.stream
        if not eof:
            self.end("reset by server")
            return
        try:
            stream.finish(eof=True)
        except Malformed as exc:
            self.malformed(exc)
            return
        self.end("closed by server" if stream.finals else "closed without an answer")

    def check_answers(self) -> None:
        """End the case early when every request got its answer."""
        stream = self.stream
        if self.sending or stream.state == "upgraded" or stream.last_close:
            return
        if stream.finals > most_answers(bytes(self.sent)):
            self.end("malformed", ("malformed", f"{stream.finals} responses to at most "
                                   f"{most_answers(bytes(self.sent))} requests"))
            return
        if stream.at_boundary() and stream.finals >= expected_answers(bytes(self.sent)):
            self.end("answered")

    def tick(self, now: float) -> None:
        """Time-driven decisions: the quiet half-close, parking, the hang deadline."""
        if self.done:
            return
        stream = self.stream
        if not self.connected:
            if now - self.t_start > self.limit:
                self.end("connect timed out")
            return
        if self.sending:
            if now - self.t_start > 2 * self.limit + 5:
                self.end("hang", ("hang", "the server stopped reading the request"))
            return
        if stream.state == "upgraded":
            if stream.ws_closed or now - (stream.upgraded_at or now) > UPGRADE_GRACE:
                self.end("upgraded")
            return
        self.check_answers()
        if self.done:
            return
        assert self.t_sent is not None
        quiet_since = max(self.t_sent, self.t_last_rx)
        if now - quiet_since >= QUIET and not self.shut and not self.parked:
            if self.case.nudge:
                self.shutdown()
            else:
                self.parked = True
        if self.late is not None:
            if now >= self.t_sent + self.limit + self.watch_late:
                self.end("hang", ("hang", f"{self.late}; still nothing "
                                          f"{self.watch_late:g} s later"))
            return
        if now >= self.t_sent + self.limit:
            if stream.finals and stream.at_boundary() and not stream.last_close:
                self.end("answered, left open")
                return
            if stream.last_close:
                self.late = "no close after a Connection: close response"
            elif stream.finals or stream.pos < len(stream.buf) or stream.state != "head":
                self.late = f"response incomplete after {self.limit:g} s (in {stream.state})"
            else:
                self.late = f"no answer and no close within {self.limit:g} s"
            # Go on watching (parked) to learn whether the server is late or stuck.
            self.parked = True

    def wake_at(self) -> float:
        """When tick() has something to decide next."""
        if not self.connected:
            return self.t_start + self.limit
        if self.sending:
            return self.next_write
        stream = self.stream
        if stream.state == "upgraded":
            return (stream.upgraded_at or 0) + UPGRADE_GRACE
        assert self.t_sent is not None
        deadline = self.t_sent + self.limit
        if self.late is not None:
            return deadline + self.watch_late
        if not self.shut and not self.parked:
            return min(deadline, max(self.t_sent, self.t_last_rx) + QUIET)
        return deadline


class Engine:
    """Runs cases over a selector, ``concurrency`` connections at a time."""

    def __init__(self, port: int, header_timeout: float, slack: float = 0.5) -> None:
        self.port = port
        self.limit = header_timeout + 1 + slack
        self.watch_late = WATCH_LATE     # 0 when replays only need to know "hang or not"
        self.sel = selectors.DefaultSelector()
        self.active: dict[int, Conn] = {}

    def run(self, cases: Iterator[Case], until: float, concurrency: int,
            on_done: Callable[[Conn], None], periodic: Callable[[float], None] | None = None,
            period: float = STATUS_EVERY) -> None:
        exhausted = False
        next_periodic = time.monotonic() + period
        while True:
            now = time.monotonic()
            working = sum(1 for c in self.active.values() if not c.parked)
            while (not exhausted and now < until and working < concurrency
                   and len(self.active) < concurrency * 5):
                case = next(cases, None)
                if case is None:
                    exhausted = True
                    break
                conn = Conn(case, self.port, self.limit, now, self.watch_late)
                if conn.done:
                    case.t_end = now
                    on_done(conn)
                    conn.sock.close()
                    continue
                conn.mask = conn.wanted_mask(now)
                self.sel.register(conn.sock, conn.mask, conn)
                self.active[conn.fd] = conn
                working += 1
            if not self.active and (exhausted or now >= until):
                break
            wake = min((c.wake_at() for c in self.active.values()), default=now + 0.05)
            if periodic is not None:
                wake = min(wake, next_periodic)
            timeout = min(max(wake - now, 0.0), 0.05)
            for key, mask in self.sel.select(timeout):
                key.data.on_event(mask, time.monotonic())
            now = time.monotonic()
            for conn in list(self.active.values()):
                if not conn.done:
                    conn.tick(now)
                if conn.done:
                    self.finish(conn, now, on_done)
                else:
                    mask = conn.wanted_mask(now)
                    if mask != conn.mask:
                        conn.mask = mask
                        self.sel.modify(conn.sock, mask, conn)
            if periodic is not None and now >= next_periodic:
                periodic(now)
                next_periodic = now + period

    def finish(self, conn: Conn, now: float, on_done: Callable[[Conn], None]) -> None:
        self.sel.unregister(conn.sock)
        del self.active[conn.fd]
        conn.sock.close()
        conn.case.t_end = now
        on_done(conn)

    def run_one(self, case: Case) -> Conn:
        """Send one case alone and wait for its end."""
        result: list[Conn] = []
        self.run(iter([case.copy()]), time.monotonic() + 3600, 1, result.append)
        return result[0]


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workers_of(status: dict[str, Any]) -> tuple[set[int], int, int]:
    """(worker pids, restarts, serving workers) of every group in a status reply."""
    pids: set[int] = set()
    restarts = serving = 0
    for group in status.get("groups", []):
        restarts += int(group.get("restarts", 0))
        for worker in group.get("workers", []):
            pids.add(int(worker["pid"]))
            serving += worker.get("state") == "serving"
    return pids, restarts, serving


def _stop_with_parent() -> None:
    """In the server's master, before exec: SIGTERM when the fuzzer dies, even
    by SIGKILL (a test's timeout), so no server outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """``python -m fastpool serve`` on a free loopback port."""

    def __init__(self, interface: str, out: Path, header_timeout: float) -> None:
        self.interface = interface
        self.out = out
        self.header_timeout = header_timeout
        self.port = free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="fastpool-fuzz-ctl-")
        self.control = Path(self.tmp.name) / "control.sock"
        self.log_path = out / f"server-{interface}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        for key in [k for k in env if k.startswith("FASTPOOL_")] + ["WEB_CONCURRENCY"]:
            env.pop(key, None)
        app = "apps_fuzz:asgi_app" if self.interface == "asgi" else "apps_fuzz:wsgi_app"
        argv = [sys.executable, "-m", "fastpool", "serve", app,
                "--interface", self.interface, "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(WORKERS), "--header-timeout", f"{self.header_timeout:g}",
                "--keep-alive", "1", "--limit-request-body", str(LIMIT_BODY),
                "--control-socket", str(self.control), "--crash-limit", "1000000",
                "--graceful-timeout", "3", "--log-level", "info"]
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=TESTS, start_new_session=True,
                                     preexec_fn=_stop_with_parent)
        self.wait_workers(30.0)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The master's status reply (the JSON of ``fastpool status --json``),
        read straight from the control socket; None if it cannot be had."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.control))
            sock.sendall(b'{"command": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            reply = json.loads(data)
            return reply if reply.get("ok") else None
        except (OSError, ValueError):
            return None
        finally:
            sock.close()

    def status_cli(self) -> dict[str, Any] | None:
        """``fastpool status --json --control-socket PATH``, through the CLI."""
        try:
            done = subprocess.run(
                [sys.executable, "-m", "fastpool", "status", "--json",
                 "--control-socket", str(self.control)],
                capture_output=True, timeout=20)
            return json.loads(done.stdout) if done.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            return None

    def wait_workers(self, timeout: float) -> dict[str, Any]:
        """Wait until every worker is serving and the port answers."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"the server exited with {self.proc and self.proc.returncode}"
                                   f"; its log: {self.log_path}")
            status = self.status()
            if status is not None:
                pids, _, serving = workers_of(status)
                if serving >= WORKERS and len(pids) >= WORKERS and self.can_connect():
                    return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server's workers did not come up within {timeout:g} s"
                                   f"; its log: {self.log_path}")
            time.sleep(0.05)

    def can_connect(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log_lines_about(self, pids: set[int]) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines()
                if any(f"(pid {pid})" in line for pid in pids)]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.log.close()
        self.tmp.cleanup()
        return self.proc.returncode


class DeathEvent:
    def __init__(self, t0: float, t1: float, pids: set[int], count: int,
                 candidates: list[Case]) -> None:
        self.t0, self.t1 = t0, t1          # between these two looks
        self.pids = pids                   # the pids that disappeared
        self.count = count
        self.candidates = candidates       # the cases in flight then


class Deaths:
    """Worker deaths.  The master's status replies (``fastpool status --json``)
    are the record: a pid gone or a restart count grown is a death.  Between
    two of them the pids of the last reply are watched in /proc (gone, or a
    zombie the master has not reaped yet), which dates a death to within a
    few milliseconds and so narrows down the cases that may have caused it."""

    def __init__(self, server: Server, status: dict[str, Any],
                 in_flight: Callable[[float, float], list[Case]] | None = None) -> None:
        self.server = server
        self.pids, self.restarts, _ = workers_of(status)
        self.t_last = self.t_alive = time.monotonic()
        self.total = 0
        self.events: list[DeathEvent] = []
        self.in_flight = in_flight
        self.seen_dead: set[int] = set()    # dead in /proc, not yet gone from a status

    def event(self, t0: float, now: float, pids: set[int], count: int) -> None:
        candidates = self.in_flight(t0, now) if self.in_flight else []
        self.events.append(DeathEvent(t0, now, pids, count, candidates))

    def watch(self) -> int:
        """Look at the workers in /proc; returns the deaths seen now."""
        now = time.monotonic()
        dead = {pid for pid in self.pids - self.seen_dead if not pid_alive(pid)}
        if dead:
            self.event(self.t_alive, now, dead, len(dead))
            self.seen_dead |= dead
        else:
            self.t_alive = now
        return len(dead)

    def look(self, status: dict[str, Any] | None = None) -> int:
        """Compare a status reply with the previous one; returns the deaths
        that it shows and /proc had not."""
        now = time.monotonic()
        status = status or self.server.status()
        if status is None:
            return 0
        pids, restarts, _ = workers_of(status)
        gone = self.pids - pids
        count = max(len(gone), restarts - self.restarts)
        self.total += count
        new = count - len(gone & self.seen_dead)
        if new > 0:
            self.event(self.t_last, now, gone - self.seen_dead, new)
        self.seen_dead &= pids
        self.pids, self.restarts = pids, restarts
        self.t_last = self.t_alive = now
        return count

    def any_dead(self) -> bool:
        return any(not pid_alive(pid) for pid in self.pids)


def pid_alive(pid: int) -> bool:
    """False when the process is gone or a zombie (dead, not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat[stat.rindex(")") + 2:].startswith(("Z", "X"))


# ---------------------------------------------------------------- the run


class Report:
    def __init__(self, out: Path, interface: str) -> None:
        self.out = out
        self.interface = interface
        self.cases = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.findings: list[Finding] = []
        self.by_signature: dict[str, Finding] = {}
        self.unconfirmed: list[Finding] = []
        self.collateral = 0

    def add_case(self, conn: Conn) -> None:
        self.cases += 1
        self.by_kind.update(conn.case.mutations)
        self.outcomes[conn.outcome] += 1
        self.statuses.update(conn.stream.statuses)

    def add_finding(self, finding: Finding) -> Finding:
        """Keep one finding per signature (counting the repeats)."""
        known = self.by_signature.get(finding.signature())
        if known is not None:
            known.count += 1
            if finding.case is not None and len(known.examples) < EXAMPLES:
                known.examples.append(finding.case)
            return known
        self.by_signature.setdefault(finding.signature(), finding)
        self.findings.append(finding)
        return finding

    def save(self, finding: Finding, folder: Path | None = None) -> Path:
        folder = folder or self.out
        folder.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"finding": finding.kind, "detail": finding.detail,
                                  "interface": self.interface, "confirmed": finding.confirmed}
        if finding.case is not None:
            record.update(finding.case.to_json())
            record["received_repr"] = repr(finding.case.received[:4096])
            record["outcome"] = finding.case.outcome
            if finding.examples:
                record["examples"] = [c.to_json() for c in finding.examples]
            digest = finding.case.digest()
        else:
            record["cases"] = [c.to_json() for c in finding.cases]
            digest = hashlib.sha256(b"".join(c.digest().encode() for c in finding.cases)
                                    ).hexdigest()[:12]
        kind = finding.kind if finding.case is not None else f"{finding.kind}-candidates"
        path = folder / f"{kind}-{digest}.json"
        record["replay"] = f"python tests/fuzz.py --replay {path}"
        path.write_text(json.dumps(record, indent=1) + "\n")
        finding.path = path
        return path


def confirm(engine: Engine, server: Server, deaths: Deaths, case: Case,
            kind: str) -> tuple[bool, Conn]:
    """Replay one case alone; True when it shows ``kind`` again."""
    conn = engine.run_one(case)
    died = died_after(server, deaths, conn)
    if kind == "death":
        return died, conn
    return conn.finding is not None and conn.finding[0] == kind, conn


def died_after(server: Server, deaths: Deaths, conn: Conn) -> bool:
    """Did a worker die because of the case that just ended?"""
    answered = conn.stream.finals > 0 and conn.outcome != "reset by server"
    deadline = time.monotonic() + (0.02 if answered else 0.1)
    while not deaths.any_dead():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    # Wait for the master to notice and replace the worker before going on.
    give_up = time.monotonic() + 20.0
    while not deaths.look() and time.monotonic() < give_up:
        time.sleep(0.01)
    try:
        server.wait_workers(20.0)
    except RuntimeError:
        pass
    deaths.look()
    return True


FIRST_SUSPECTS = ("reset by server", "closed without an answer", "hang", "connect failed")
FULL_TRIAGE = 6         # death events whose every candidate may be replayed
FRAMING = {b"connection", b"upgrade", b"transfer-encoding", b"content-length", b"expect"}


def shape(case: Case) -> str:
    """What a request that killed a worker looks like, to group such deaths:
    its method, the framing headers of its first head, and whether the bytes
    after that head came in a later write than the head's end."""
    data = case.sent_data()
    end = data.find(b"\r\n\r\n")
    head = data[:end] if end >= 0 else data
    lines = head.split(b"\r\n")
    parts = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if colon and name in FRAMING:
            parts.append(f"{name.decode()}: {value.strip().lower()[:24].decode('latin-1')}"
                         if name in (b"connection", b"upgrade", b"transfer-encoding")
                         else name.decode())
    method = lines[0].split(b" ", 1)[0][:12].decode("latin-1")
    text = f"{method!r} with {', '.join(sorted(set(parts))) or 'no framing headers'}"
    if end >= 0 and len(data) > end + 4:
        at, head_write = 0, 0
        for i, w in enumerate(case.writes):
            at += len(w)
            if at >= end + 4:
                head_write = i
                break
        later = at < len(data) and len(case.writes) > head_write + 1
        text += ", bytes after the head in a later write" if later else ", one write"
    return text


def death_reason(server: Server, pids: set[int]) -> str:
    reasons = sorted({m.group(1) for line in server.log_lines_about(pids)
                      for m in [re.search(r"(killed by signal \w+|exited with code \d+)", line)]
                      if m})
    return ", ".join(reasons) or "died"


def triage(report: Report, engine: Engine, server: Server, deaths: Deaths,
           budget: float) -> None:
    """Replay findings alone: find which case kills a worker, confirm hangs."""
    stop_at = time.monotonic() + budget
    culprits: dict[str, Finding] = {}
    shapes: set[str] = set()
    events = list(deaths.events)
    deaths.events.clear()
    for n, event in enumerate(events):
        why = death_reason(server, event.pids)
        candidates = event.candidates
        known = [culprits[c.digest()] for c in candidates if c.digest() in culprits]
        if known:
            known[0].count += event.count
            continue
        # Replay alone, quickest first: the cases that got no answer (a dying
        # worker answers nothing), those shaped like known culprits first,
        # with the quick half-close (a case that waits for the server's
        # timeouts takes seconds); then, for the first events, all the others
        # and those that waited as they were; for later ones only the others
        # shaped like known culprits.
        suspects = sorted((c for c in candidates if c.outcome.startswith(FIRST_SUSPECTS)),
                          key=lambda c: shape(c) not in shapes)
        trials = [c.copy(nudge=True) for c in suspects]
        rest = [c for c in candidates if not c.outcome.startswith(FIRST_SUSPECTS)]
        if n < FULL_TRIAGE:
            trials += [c.copy(nudge=True) for c in rest]
            trials += [c for c in candidates if not c.nudge]
        else:
            trials += [c.copy(nudge=True) for c in rest if shape(c) in shapes]
        culprit = None
        for case in trials[:300]:
            if time.monotonic() > stop_at:
                break
            died, conn = confirm(engine, server, deaths, case, "death")
            if died:
                culprit = case
                culprit.received = conn.case.received
                break
        if culprit is not None:
            shapes.add(shape(culprit))
            found = report.add_finding(
                Finding("death", f"worker {why}; request: {shape(culprit)}", culprit))
            found.count += event.count - 1
            found.confirmed = True
            culprits[culprit.digest()] = found
        else:
            detail = ("worker died; no single case of those in flight reproduces it alone"
                      if time.monotonic() <= stop_at else
                      "worker died; not replayed (the time for replays ran out)")
            if n >= FULL_TRIAGE:
                detail += (" (only the unanswered ones and those shaped like known culprits "
                           "were replayed)")
            found = report.add_finding(Finding("death", f"{detail}: {why}", None, candidates))
            found.count += event.count - 1
            found.confirmed = False
    for finding in list(report.findings):
        if finding.kind == "death" or finding.case is None or finding.confirmed is not None:
            continue
        if time.monotonic() > stop_at:
            break
        # The first case twice, then the other examples of the signature once.
        ok, tried = False, 0
        engine.watch_late = 0.0
        for case in [finding.case, finding.case, *finding.examples]:
            if time.monotonic() > stop_at:
                break
            tried += 1
            ok, _ = confirm(engine, server, deaths, case, finding.kind)
            if ok:
                finding.case = case
                break
        engine.watch_late = WATCH_LATE
        if not tried:
            continue        # out of time: kept as a finding, "not replayed"
        finding.confirmed = ok
        case = finding.case
        during_death = any(e.t0 - 0.5 <= (case.t_end or 0) and (case.t_start or 0) <= e.t1 + 0.5
                           for e in events)
        if not ok and (finding.kind == "hang" or during_death):
            # Not reproducible alone: load, or a worker dying under it.
            report.findings.remove(finding)
            if during_death:
                report.collateral += finding.count
            else:
                report.unconfirmed.append(finding)


def fuzz(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastpool-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    seeds = load_seeds()
    print(f"fuzzing fastpool ({args.interface}) for {args.seconds:g} s: seed {seed}, "
          f"concurrency {args.concurrency}, {len(seeds)} seeds, out {out}", flush=True)
    server = Server(args.interface, out, args.header_timeout)
    try:
        server.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        return 2
    report = Report(out, args.interface)
    before = server.status_cli() or server.status() or {}
    engine = Engine(server.port, args.header_timeout, args.hang_slack)
    history: collections.deque[Case] = collections.deque(maxlen=HISTORY)
    generator = Generator(random.Random(seed), seeds)

    def history_at(t0: float, t1: float) -> list[Case]:
        """Cases in flight between two looks at the workers (with some slack)."""
        cases = list(history) + [c.case for c in engine.active.values()]
        return [c for c in cases if c.t_start is not None and c.t_start <= t1
                and (c.t_end is None or c.t_end >= t0 - 0.05)]

    deaths = Deaths(server, before, history_at)

    def on_done(conn: Conn) -> None:
        report.add_case(conn)
        history.append(conn.case)
        if conn.finding is not None:
            report.add_finding(Finding(conn.finding[0], conn.finding[1], conn.case))

    server_died = False

    next_look = time.monotonic() + STATUS_EVERY

    def periodic(now: float) -> None:
        nonlocal server_died, next_look
        if not server.alive():
            server_died = True
            return
        if deaths.watch() or now >= next_look:
            deaths.look()
            next_look = now + STATUS_EVERY

    started = time.monotonic()
    until = started + args.seconds
    try:
        engine.run(generator, until, args.concurrency, on_done, periodic, WATCH_EVERY)
        elapsed = time.monotonic() - started
        print_stats(report, elapsed, seed)
        deaths.look()
        fuzz_deaths = deaths.total
        if server.alive():
            try:
                server.wait_workers(20.0)
            except RuntimeError:
                pass
            waiting = [f for f in report.findings if f.confirmed is None]
            if deaths.events or waiting:
                print(f"replaying alone: the cases in flight at {len(deaths.events)} worker "
                      f"death(s), {len(waiting)} other finding(s)", flush=True)
            triage(report, engine, server, deaths, budget=max(60.0, 2 * args.seconds))
        else:
            server_died = True
        after = server.status_cli() if server.alive() else None
        if after is not None:
            deaths.look(after)
        if server_died:
            report.add_finding(Finding("death", "the master exited during the run", None, []))
    finally:
        code = server.stop()
    return print_report(report, before, after, fuzz_deaths, deaths.total, code)


def print_stats(report: Report, elapsed: float, seed: int) -> None:
    """What was sent and what came back (printed before the replays of triage)."""
    rate = report.cases / elapsed if elapsed else 0.0
    print(f"cases: {report.cases} in {elapsed:.1f} s ({rate:.0f}/s), seed {seed}")
    print("  by mutation kind: " + ", ".join(
        f"{k} {n}" for k, n in sorted(report.by_kind.items(), key=lambda kv: -kv[1])))
    print("  outcomes: " + ", ".join(f"{k} {n}" for k, n in report.outcomes.most_common()))
    print("  statuses: " + ", ".join(f"{k} {n}" for k, n in sorted(report.statuses.items())),
          flush=True)


def print_report(report: Report, before: dict[str, Any], after: dict[str, Any] | None,
                 fuzz_deaths: int, all_deaths: int, code: int | None) -> int:
    b_pids, b_restarts, _ = workers_of(before)
    line = f"workers: pids {sorted(b_pids)} restarts {b_restarts} before"
    if after is not None:
        a_pids, a_restarts, _ = workers_of(after)
        line += f"; pids {sorted(a_pids)} restarts {a_restarts} after"
    print(line + f"; {fuzz_deaths} death(s) while fuzzing, {all_deaths - fuzz_deaths} while "
          f"replaying; server exit status {code}")
    if report.collateral:
        print(f"  ({report.collateral} response problem(s) during worker deaths not counted)")
    for finding in report.unconfirmed:
        path = report.save(finding, report.out / "unconfirmed")
        repeat = f" (x{finding.count})" if finding.count > 1 else ""
        print(f"unconfirmed {finding.kind}{repeat} (none of {1 + len(finding.examples)} "
              f"example(s) reproduced alone): {finding.detail}\n  {path}")
    if not report.findings:
        print("findings: none")
        return 0
    print(f"findings: {len(report.findings)}")
    for finding in report.findings:
        path = report.save(finding)
        repeat = f" (x{finding.count})" if finding.count > 1 else ""
        state = {True: "reproduced alone", False: "not reproduced alone",
                 None: "not replayed"}[finding.confirmed]
        print(f"  {finding.kind}{repeat}, {state}: {finding.detail}")
        if finding.case is not None:
            print(f"    {finding.case.describe()}: {len(finding.case.writes)} write(s), "
                  f"close {finding.case.close or '-'}: {finding.case.data[:160]!r}")
        print(f"    {path}")
    return 1


# ---------------------------------------------------------------- replay and reduce


def load_finding(path: Path) -> tuple[dict[str, Any], list[Case]]:
    record = json.loads(path.read_text())
    if "cases" in record:
        return record, [Case.from_json(c) for c in record["cases"]]
    return record, [Case.from_json(record)]


def replay(args: argparse.Namespace) -> int:
    path = Path(args.replay)
    record, cases = load_finding(path)
    interface = args.interface_given or record.get("interface", "wsgi")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastpool-replay-"))
    server = Server(interface, out, args.header_timeout)
    try:
        server.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        return 2
    deaths = Deaths(server, server.status() or {})
    engine = Engine(server.port, args.header_timeout, args.hang_slack)
    print(f"replaying {path} ({record.get('finding')}: {record.get('detail')}) "
          f"against {interface}")
    found = 0
    try:
        for case in cases:
            for attempt in range(args.repeat):
                conn = engine.run_one(case)
                died = died_after(server, deaths, conn)
                print(f"  {case.describe()} try {attempt + 1}: {conn.outcome}; "
                      f"{'a worker DIED' if died else 'workers alive'}")
                if conn.finding:
                    print(f"    {conn.finding[0]}: {conn.finding[1]}")
                print(f"    received {conn.case.received[:600]!r}")
                if died:
                    lines = server.log_lines_about(deaths.events[-1].pids)
                    for line in lines:
                        print(f"    log: {line}")
                found += died or conn.finding is not None
    finally:
        server.stop()
    print(f"reproduced: {'yes' if found else 'no'}")
    return 1 if found else 0


def reduce(args: argparse.Namespace) -> int:
    """Shrink a saved finding (one case) to a minimal input that still shows it."""
    path = Path(args.reduce)
    record, cases = load_finding(path)
    if len(cases) != 1:
        print("error: --reduce takes a finding with one case", file=sys.stderr)
        return 2
    kind = record["finding"]
    interface = args.interface_given or record.get("interface", "wsgi")
    out = path.parent
    server = Server(interface, out, args.header_timeout)
    try:
        server.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        return 2
    deaths = Deaths(server, server.status() or {})
    engine = Engine(server.port, args.header_timeout, args.hang_slack)
    tries = 0

    def shows(case: Case) -> bool:
        nonlocal tries
        tries += 1
        for _ in range(args.repeat):
            ok, _ = confirm(engine, server, deaths, case, kind)
            if not ok:
                return False
        return True

    best = cases[0]
    try:
        if not shows(best):
            print("the finding does not reproduce; nothing to reduce")
            return 1
        best = shrink(best, shows)
    finally:
        server.stop()
    finding = Finding(kind, record.get("detail", ""), best)
    finding.confirmed = True
    report = Report(out, interface)
    saved = report.save(finding)
    minimal = saved.with_name(saved.stem + "-min.json")
    saved.rename(minimal)
    print(f"reduced in {tries} tries to {len(best.writes)} write(s), close {best.close or '-'}:")
    for w in best.writes:
        print(f"  {w!r}")
    print(minimal)
    return 0


def shrink(case: Case, shows: Callable[[Case], bool]) -> Case:
    """Delta debugging over the writes: drop writes, merge them, then drop
    lines and byte ranges inside each, as long as the finding still shows."""

    def variant(writes: list[bytes], close: str | None = None, cut: int | None = None) -> Case:
        writes = [w for w in writes if w]
        close = case.close if close is None else close
        cut = min(case.cut if cut is None else cut, len(writes))
        return Case(writes, [max(p, 0.002) for p in (case.pauses + [0.002] * len(writes))
                             [:len(writes) - 1]],
                    seed=case.seed, mutations=case.mutations, close=close or None,
                    cut=cut, nudge=case.nudge)

    if case.close is not None:
        plain = variant(case.writes, close="", cut=0)
        if shows(plain):
            case = plain
    changed = True
    while changed:
        changed = False
        # Drop whole writes, then merge neighbours.
        i = 0
        while len(case.writes) > 1 and i < len(case.writes):
            trial = variant(case.writes[:i] + case.writes[i + 1:])
            if trial.writes and shows(trial):
                case, changed = trial, True
            else:
                i += 1
        i = 0
        while i < len(case.writes) - 1:
            merged = case.writes[:i] + [case.writes[i] + case.writes[i + 1]] + case.writes[i + 2:]
            trial = variant(merged)
            if shows(trial):
                case, changed = trial, True
            else:
                i += 1
        for i in range(len(case.writes)):
            # Runs of lines (a chunk is two), then byte ranges.
            for unit, run in (("line", 4), ("line", 2), ("line", 1), (64, 1), (16, 1), (4, 1),
                              (1, 1)):
                data = case.writes[i]
                parts = (data.splitlines(keepends=True) if unit == "line"
                         else [data[j:j + unit] for j in range(0, len(data), unit)])
                j = 0
                while j < len(parts) and len(parts) > run:
                    smaller = b"".join(parts[:j] + parts[j + run:])
                    trial = variant(case.writes[:i] + [smaller] + case.writes[i + 1:])
                    if smaller and shows(trial):
                        case, changed = trial, True
                        parts = parts[:j] + parts[j + run:]
                    else:
                        j += 1
    return case


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Mutation fuzzer for fastpool's HTTP/1.1 server (see the module docstring).")
    parser.add_argument("--seconds", type=float, default=20.0, help="fuzzing time (default 20)")
    parser.add_argument("--interface", choices=("wsgi", "asgi"), default=None,
                        help="the worker kind to fuzz (default wsgi; for --replay/--reduce, "
                             "the one the finding was saved with)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="parallel connections (default 8)")
    parser.add_argument("--out", default=None,
                        help="where findings and the server log go (default: a temp dir)")
    parser.add_argument("--header-timeout", type=float, default=2.0,
                        help="the server's --header-timeout in seconds (default 2)")
    parser.add_argument("--hang-slack", type=float, default=0.5,
                        help="seconds allowed past header_timeout + 1 before a connection "
                             "counts as hung (the server checks its timeouts once a second; "
                             "default 0.5)")
    parser.add_argument("--replay", metavar="FILE", help="resend one saved finding")
    parser.add_argument("--reduce", metavar="FILE",
                        help="shrink a saved finding to a minimal input (saved as *-min.json)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="--replay: sends per case; --reduce: sends per check (default 1)")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.interface_given = args.interface
    args.interface = args.interface or "wsgi"
    if args.replay:
        return replay(args)
    if args.reduce:
        return reduce(args)
    return fuzz(args)


if __name__ == "__main__":
    sys.exit(main())

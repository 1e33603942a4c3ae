"""The request corpus (tests/requests/) replayed through the compiled core, in
process, under every way of splitting the bytes into reads.

Rules:

* Each case is parsed by ``fastpool._http.RecordingConnection`` (the
  connection core with no worker on top): whole, then split into two reads at
  every position, one byte per read, and in random splits with a fixed seed
  (files over ``SAMPLED_ABOVE`` bytes are split at sampled positions only).
  Every way must give the outcome the case's .json expects: the requests
  parsed (method, target, version, header fields, body, keep-alive, upgrade),
  the error status, or a request left incomplete.  A parser state that goes
  wrong at a read boundary cannot hide.
* The same cases go through the routing decision, which pauses llhttp at
  message boundaries: with a route that sends everything to another group, the
  bytes to hand over must be exactly the input from the first request's first
  byte on, and parsing them again must give the same outcome; with a route
  that matches nothing, the outcome must be the one without routes.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from corpus_cases import (
    LIMIT_REQUEST_BODY,
    LIMIT_REQUEST_FIELD_SIZE,
    LIMIT_REQUEST_FIELDS,
    LIMIT_REQUEST_LINE,
    Case,
    load_cases,
)
from fastpool._http import Limits, RecordingConnection, Router

CASES = load_cases()
LIMITS = Limits(LIMIT_REQUEST_LINE, LIMIT_REQUEST_FIELDS, LIMIT_REQUEST_FIELD_SIZE,
                LIMIT_REQUEST_BODY)
# Above this size, two-read splits are sampled (the large limit cases would
# otherwise take minutes) around the places where the state changes most.
SAMPLED_ABOVE = 4096
RANDOM_SPLITS = 16
SEED = 1093


def latin1(data: bytes) -> str:
    return data.decode("latin-1")


def outcome(conn: RecordingConnection) -> dict[str, Any]:
    """What the core made of the input, in the corpus's terms."""
    requests = []
    partial = conn.receiving
    for request in conn.pending:
        if not request.body_complete:
            partial = True
            continue
        parsed = {
            "method": request.method,
            "target": latin1(request.target),
            "version": f"1.{request.http_minor}",
            "headers": [[latin1(name), latin1(value)] for name, value in request.headers],
            "body": latin1(request.read_body()),
            "keep_alive": bool(request.keep_alive),
        }
        if request.upgrade:
            parsed["upgrade"] = True
        requests.append(parsed)
    return {"requests": requests, "status": conn.error_status or None,
            "partial": partial and not conn.error_status}


def expected(case: Case) -> dict[str, Any]:
    requests = []
    for request in case.requests:
        request = dict(request)
        if not request.get("upgrade"):
            request.pop("upgrade", None)
        requests.append(request)
    status = case.expect.get("status")
    return {"requests": requests, "status": status,
            "partial": case.kind == "invalid" and status is None}


def parse(reads: list[bytes], router: Router | None = None) -> RecordingConnection:
    conn = RecordingConnection(LIMITS, router, 0 if router is not None else -1)
    for data in reads:
        conn.parse(data)
    return conn


def handed_over(reads: list[bytes]) -> tuple[RecordingConnection, bytes | None]:
    """Parse with every path routed elsewhere; the bytes the other group gets:
    those handed over, then what the client sends after (the socket moves)."""
    conn = RecordingConnection(LIMITS, everything_elsewhere(), 0)
    for index, data in enumerate(reads):
        conn.parse(data)
        if conn.handoff_group >= 0:
            return conn, conn.handoff_data + b"".join(reads[index + 1:])
    return conn, None


def split_points(case: Case) -> list[int]:
    size = len(case.data)
    if size <= SAMPLED_ABOVE:
        return list(range(1, size))
    # Every position of the first and last KiB (heads, chunk lines, trailers),
    # and every 97th in between.
    return sorted(set(range(1, 1024)) | set(range(size - 1024, size))
                  | set(range(1024, size - 1024, 97)))


def splittings(case: Case) -> list[tuple[str, list[bytes]]]:
    data = case.data
    ways = [("whole", [data])]
    ways += [(f"at {cut}", [data[:cut], data[cut:]]) for cut in split_points(case)]
    if len(data) <= SAMPLED_ABOVE:
        ways.append(("byte by byte", [data[i:i + 1] for i in range(len(data))]))
    else:
        ways.append(("7 bytes at a time", [data[i:i + 7] for i in range(0, len(data), 7)]))
    rng = random.Random(f"{SEED}:{case.name}")
    for number in range(RANDOM_SPLITS):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(2, 12))))
        bounds = [0, *cuts, len(data)]
        ways.append((f"random {number} {cuts}",
                     [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]))
    return ways


@pytest.mark.parametrize("case", CASES, ids=str)
def test_corpus_case_under_every_read_split(case):
    want = expected(case)
    for how, reads in splittings(case):
        got = outcome(parse(reads))
        assert got == want, f"{case} read {how}"


# ---------------------------------------------------------------- routing

def everything_elsewhere() -> Router:
    """This worker is group 0; every path belongs to group 1."""
    return Router([("/", 1)], 0)


def nothing_elsewhere() -> Router:
    return Router([("/elsewhere-only", 1)], 0)


def first_message(data: bytes) -> bytes:
    """The input from the first request's first byte (empty lines skipped)."""
    return data.lstrip(b"\r\n")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_corpus_case_through_routing(case):
    want = expected(case)
    plain = outcome(parse([case.data]))
    for how, reads in splittings(case)[:64]:
        assert outcome(parse(reads, nothing_elsewhere())) == want, f"{case} read {how}"
        conn, moved = handed_over(reads)
        if moved is not None:
            assert conn.handoff_group == 1
            assert moved == first_message(case.data), f"{case} read {how}"
            assert conn.pending == [], "nothing is answered where it was handed over"
            # The group that takes it parses the same requests.
            assert outcome(parse([moved])) == plain, f"{case} read {how}"
        else:
            # Not routed ("OPTIONS *" has no path), refused where it arrived,
            # or never complete: the same answer as without routes.
            got = outcome(conn)
            assert got == plain or (got["requests"] == [] and got["status"] == plain["status"]
                                    ), f"{case} read {how}: {got}"

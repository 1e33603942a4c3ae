"""Coverage-guided fuzzing of the compiled connection core with atheris
(libFuzzer), in process: no sockets, no server.

Rules:

* The input is one byte string: its first bytes choose the reads (how many and
  where the cuts fall), the rest is what a client sends.  The corpus in
  ``tests/requests/`` seeds it (``--seed-corpus DIR`` writes it out as
  libFuzzer seed files).
* The oracle is the core's own promise, the one ``tests/test_corpus.py``
  checks case by case: the outcome (requests parsed, error status, a request
  left incomplete) does not depend on how the bytes are split into reads, and
  routing changes where a request is answered, never what it is.  Any other
  exception than the assertion is a finding too.
* Guidance comes from the extension's own branches, so the core must be built
  with clang's coverage instrumentation (README, "Fuzzing"); with a plain
  build libFuzzer has no coverage to follow and mutates blindly over the same
  oracle.

Run:  python tests/fuzz_core.py [libFuzzer flags] [CORPUS_DIR ...]
      python tests/fuzz_core.py --seed-corpus DIR   (write the seeds, then exit)
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris
from corpus_cases import (
    LIMIT_REQUEST_BODY,
    LIMIT_REQUEST_FIELD_SIZE,
    LIMIT_REQUEST_FIELDS,
    LIMIT_REQUEST_LINE,
    load_cases,
)
from fastpool._http import Limits, RecordingConnection
from test_corpus import everything_elsewhere, first_message, outcome

# Small limits, so that the fuzzer reaches the 413/414/431 edges with short inputs.
LIMITS = Limits(min(LIMIT_REQUEST_LINE, 256), min(LIMIT_REQUEST_FIELDS, 16),
                min(LIMIT_REQUEST_FIELD_SIZE, 256), min(LIMIT_REQUEST_BODY, 4096))
MAX_READS = 8
LIMIT_STATUSES = (413, 414, 431)


def parse(reads: list[bytes]) -> RecordingConnection:
    conn = RecordingConnection(LIMITS, None, -1)
    for data in reads:
        conn.parse(data)
    return conn


def cut(provider: atheris.FuzzedDataProvider) -> tuple[list[bytes], bytes]:
    count = provider.ConsumeIntInRange(1, MAX_READS)
    sizes = [provider.ConsumeIntInRange(1, 64) for _ in range(count - 1)]
    data = provider.ConsumeBytes(provider.remaining_bytes())
    reads, start = [], 0
    for size in sizes:
        if start >= len(data):
            break
        reads.append(data[start:start + size])
        start += size
    reads.append(data[start:])
    return reads, data


def same_refusal(split: dict, whole: dict) -> bool:
    """Input that breaks a limit and the syntax both is refused either way, but
    which status answers can follow the reads: a limit is checked as bytes
    arrive, the syntax when llhttp reaches the byte (a request line past
    --limit-request-line with a NUL further on is 414 or 400)."""
    return (split["requests"] == whole["requests"]
            and {split["status"], whole["status"]} <= {400, *LIMIT_STATUSES}
            and bool(set(LIMIT_STATUSES) & {split["status"], whole["status"]}))


def test_one_input(raw: bytes) -> None:
    reads, data = cut(atheris.FuzzedDataProvider(raw))
    whole = outcome(parse([data]))
    split = outcome(parse(reads))
    assert split == whole or same_refusal(split, whole), (
        f"the outcome depends on the reads {reads!r}: {split} != {whole}")
    conn = RecordingConnection(LIMITS, everything_elsewhere(), 0)
    for index, part in enumerate(reads):
        conn.parse(part)
        if conn.handoff_group >= 0:
            moved = conn.handoff_data + b"".join(reads[index + 1:])
            assert moved == first_message(data), f"handed over {moved!r}"
            assert outcome(parse([moved])) == whole, "the other group parses something else"
            break


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for case in load_cases():
        # A one-read prefix: ConsumeIntInRange(1, MAX_READS) reads one byte.
        (directory / f"{case.kind}_{case.name}").write_bytes(b"\x00" + case.data)
    print(f"wrote {len(load_cases())} seeds to {directory}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""Run the mutation fuzzer (tests/fuzz.py) against a real server, per worker kind,
and replay the reduced findings kept in tests/fuzz_findings/.

Each run fuzzes for FUZZ_SECONDS (20 by default; the FASTPOOL_FUZZ_SECONDS
environment variable changes it) with a fixed seed, so a failure names the
same cases again.  On failure the assertion shows the fuzzer's report: the
findings and the paths of their saved files (``python tests/fuzz.py --replay
PATH`` resends one).  The checks of the fuzzer's own response reader come
first: a fuzzer that accepts anything finds nothing.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import fuzz
import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz.py"
FINDINGS = sorted((Path(__file__).resolve().parent / "fuzz_findings").glob("*.json"))
FUZZ_SECONDS = float(os.environ.get("FASTPOOL_FUZZ_SECONDS", "20"))
SEED = 20240601

HEAD = b"HTTP/1.1 200 OK\r\nX-Method: GET\r\n"


@pytest.mark.parametrize("stream", [
    HEAD + b"Content-Length: 2\r\n\r\nok" + HEAD + b"Content-Length: 0\r\n\r\n",
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD + b"Content-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nX-Method: HEAD\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nX-Method: GET\r\n\r\n",
    HEAD + b"Connection: close\r\n\r\nuntil the end",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi\x88\x00",
])
def test_reader_accepts(stream: bytes) -> None:
    reader = fuzz.ResponseStream()
    for i in range(len(stream)):            # byte by byte: no boundary may matter
        reader.feed(stream[i:i + 1], 0.0)
    reader.finish(eof=True)


@pytest.mark.parametrize("stream", [
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    HEAD + b"Content-Length: 0\r\nBad Header: x\r\n\r\n",
    HEAD + b"Content-Length: 0\r\n folded\r\n\r\n",
    HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    HEAD + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nokX",
    HEAD + b"Transfer-Encoding: chunked\r\n\r\nz\r\n",
    HEAD + b"Content-Length: 5\r\n\r\nab",                  # cut short by the close
    HEAD + b"\r\nno length, no close",
    HEAD + b"Connection: close\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    b"garbage\r\n\r\n",
])
def test_reader_refuses(stream: bytes) -> None:
    reader = fuzz.ResponseStream()
    with pytest.raises(fuzz.Malformed):
        reader.feed(stream, 0.0)
        reader.finish(eof=True)


def test_generator_is_reproducible() -> None:
    """The same seed gives the same cases (and no mutation fails on its input)."""
    seeds = fuzz.load_seeds()
    first = [c.digest() for c, _ in zip(fuzz.Generator(random.Random(7), seeds), range(5000),
                                        strict=False)]
    again = [c.digest() for c, _ in zip(fuzz.Generator(random.Random(7), seeds), range(5000),
                                        strict=False)]
    assert first == again


def test_dechunk_always_moves_forward() -> None:
    assert fuzz.dechunk(b"5\r\nhello\r\n0\r\n\r\nGET") == (b"hello", b"GET")
    for size in (b"-5", b"+5", b"0x5", b""):        # unreadable: all of it is the body
        data = size + b"\r\nabc\r\n0\r\n\r\n"
        assert fuzz.dechunk(data) == (data, b"")


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_fuzz(interface: str, tmp_path: Path) -> None:
    """The server survives FUZZ_SECONDS of mutated requests: no worker dies, no
    connection hangs, every response is well-formed."""
    try:
        done = subprocess.run(
            [sys.executable, str(FUZZ), "--seconds", f"{FUZZ_SECONDS:g}", "--interface",
             interface, "--seed", str(SEED), "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=FUZZ_SECONDS * 4 + 240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"fuzz.py did not finish in {exc.timeout:g} s:\n{exc.stdout}\n{exc.stderr}")
    report = f"fuzz.py exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
@pytest.mark.parametrize("finding", FINDINGS, ids=[p.stem for p in FINDINGS])
def test_saved_finding_stays_fixed(finding: Path, interface: str, tmp_path: Path) -> None:
    """Every reduced finding in tests/fuzz_findings/, resent to both worker kinds."""
    done = subprocess.run(
        [sys.executable, str(FUZZ), "--replay", str(finding), "--interface", interface,
         "--repeat", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

"""User-space instructions per handoff (routes), counted by callgrind.

``routes.py`` measures a move's CPU time, which on a shared 2-core machine moves with the
load; this counts what does not: the instructions the server executes per move. The
``routes`` server of routes.py (``[group.web]`` with the listener, ``[group.task]`` with
``routes = ["/tast"]``, one worker each, ``isolation_app:app``) runs under
``valgrind --tool=callgrind --trace-children=yes`` four times, each time with one
keep-alive connection that sends requests one at a time (each response read and checked
before the next request):

* ``stay``: ``N`` and ``2N`` requests for ``/``;
* ``alternate``: ``N`` and ``2N`` requests for ``/`` and ``/tast/hello`` in turn, so every
  request after the first moves the connection to the other group.

Per request = (Ir(2N) - Ir(N)) / N, summed over every process of the server (the master,
both workers: a move costs the sender and the receiver), so start-up, warm-up (100
requests alternating on another connection first) and shut-down cancel; per move =
alternate's per request - stay's. Like instructions.py (whose environment and Ir reading
this reuses): a fixed environment, the server stopped with SIGTERM once the client is done.
The four runs go two at a time. What a move costs in the kernel (sendmsg with SCM_RIGHTS,
epoll, wake-ups) is not counted: routes.py's CPU per move has it.

Usage: ``python bench/routes_instructions.py [--requests N]`` (default 1000: about 30 s).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, HOST, BenchError, run_main
from instructions import HOST_HEADER, SERVER_ENV, callgrind_total

CONFIG = """[group.web]
app = "isolation_app:app"
listen = ["{host}:{port}"]
workers = 1

[group.task]
app = "isolation_app:app"
routes = ["/tast"]
workers = 1
"""
HELLO = b"Hello, World!\n"
WARM = 50  # alternating pairs on a connection of their own before the counted requests
START_TIMEOUT = 120.0  # valgrind's start-up on a loaded machine


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST_HEADER}\r\n\r\n".encode()


def response(sock: socket.socket, buf: bytearray) -> None:
    """Read one response and check it is the hello."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        buf += sock.recv(65536) or b"?"
    head = bytes(buf[:end])
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
    if not head.startswith(b"HTTP/1.1 200 ") or length is None:
        raise BenchError(f"unexpected response {head[:80]!r}")
    total = end + 4 + int(length[1])
    while len(buf) < total:
        buf += sock.recv(65536)
    if buf[end + 4:total] != HELLO:
        raise BenchError(f"unexpected body {bytes(buf[end + 4:total])[:60]!r}")
    del buf[:total]


def one_run(python: str, tmp: Path, name: str, port: int, paths: list[str],
            count: int) -> int:
    """Ir of the whole server (every process) for ``count`` requests over ``paths``."""
    out = tmp / name
    out.mkdir()
    (out / "routes.toml").write_text(CONFIG.format(host=HOST, port=port))
    cmd = ["valgrind", "--tool=callgrind", "--trace-children=yes",
           f"--callgrind-out-file={out / 'callgrind.out.%p'}", python, "-m", "fastpool",
           "serve", "--config", str(out / "routes.toml"),
           "--control-socket", str(out / "control.sock")]
    with open(out / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=BENCH, env=SERVER_ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                warm = socket.create_connection((HOST, port), timeout=60)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"{name}: the server did not listen") from None
                time.sleep(0.2)
        with warm:
            buf = bytearray()
            for path in ["/", "/tast/hello"] * WARM:
                warm.sendall(get(path))
                response(warm, buf)
        with socket.create_connection((HOST, port), timeout=60) as sock:
            buf = bytearray()
            for i in range(count):
                sock.sendall(get(paths[i % len(paths)]))
                response(sock, buf)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(START_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return sum(callgrind_total(f) for f in out.glob("callgrind.out.*"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="N (the runs send N and 2N)")
    p.add_argument("--port", type=int, default=18300, help="first of four ports")
    p.add_argument("--fastpool-python", default=sys.executable)
    args = p.parse_args(argv)
    n = args.requests
    runs = [("stay-n", ["/"], n), ("stay-2n", ["/"], 2 * n),
            ("alternate-n", ["/", "/tast/hello"], n),
            ("alternate-2n", ["/", "/tast/hello"], 2 * n)]
    try:
        with tempfile.TemporaryDirectory(prefix="fastpool-routes-ir-") as tmp, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(one_run, args.fastpool_python, Path(tmp), name,
                                         args.port + i, paths, count)
                       for i, (name, paths, count) in enumerate(runs)}
            ir = {name: f.result() for name, f in futures.items()}
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stay = (ir["stay-2n"] - ir["stay-n"]) / n
    alternate = (ir["alternate-2n"] - ir["alternate-n"]) / n
    print(f"Ir per request: stay {stay:,.0f}, alternate {alternate:,.0f}; "
          f"per move {alternate - stay:,.0f} (N = {n}, {args.fastpool_python})")
    return 0


if __name__ == "__main__":
    run_main(main, "the servers are stopped")

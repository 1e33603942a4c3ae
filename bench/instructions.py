"""User-space instructions per request, counted by callgrind: the figure that repeats.

req/s on a shared 2-core machine moves by tens of percent from one run to the next (see
the smoke figures in README.md); the number of instructions a server executes to answer a
request hardly moves. This harness runs each server under ``valgrind --tool=callgrind``,
sends it a fixed number of requests from a small client of its own and reads the total
instructions (Ir) of the process that served them.

Rules this harness keeps:

* Per request = a difference of two runs: one with ``N`` requests (``--warm``) and one with
  ``N + E`` (``--extra``), so start-up, the first requests (imports, caches, the
  interpreter's specialisation) and shut-down cancel: ``(Ir(N + E) - Ir(N)) / E``.
  ``callgrind_control`` cannot reach a worker forked without exec, so the counts are read
  from the callgrind file each process writes when it exits (a forked child's count
  includes its parent's until the fork, which cancels too).
* The served process is the one that holds the server side of the client's connections
  (found through ``/proc/net/tcp`` and ``/proc/PID/fd``): fastpool's worker (forked from
  the master, hence ``--trace-children=yes``), bjoern's process, nginx's single process
  (``master_process off``).
* Everything that could change the count is fixed: the server's environment is exactly
  ``SERVER_ENV`` (``PYTHONHASHSEED=0``; ``PYTHONDONTWRITEBYTECODE=1``, so no run writes
  bytecode that the next run would read), its working directory is bench/, its command line
  is the same in both runs of a pair but for the port (``--jobs`` runs at once use
  consecutive ports, of the same length) and, for fastpool, a control socket of its own,
  the request bytes are fixed (the Host header is always ``127.0.0.1:18080``, whatever the
  port), and every response is checked byte for byte.
* The client is sequential: one request (or one pipelined batch), then its whole response,
  on keep-alive connections opened before the first request. With ``--pace`` (the default)
  it also waits before each write until the server is blocked waiting for events again
  (``IdleWatch``), so every request takes the same path, that of a request on an idle
  keep-alive connection, whatever the machine's load: without it an event loop does more or
  less work per request depending on when the next request arrives (asyncio's hello figure
  spread by ±0.05 % without it, and was 0.2 % higher).
* A server works per second too (fastpool's workers refresh the Date header and check
  deadlines once a second: 30,000-60,000 instructions a second under callgrind). With
  ``--hold`` (the default) both runs of a pair therefore serve (from the first response to
  the stop signal) equally long, the one done first waiting idle for the other
  (``PairClock``), so that this work cancels instead of following the machine's load.
* At the end the client half-closes its connections and waits until the server has closed
  them, and only then stops the server (SIGTERM for fastpool, SIGINT for bjoern, SIGQUIT
  for nginx, resent every 5 s if one is lost), so no shut-down races a connection (bjoern
  would wait for an open one forever).
* Each (server, request) is measured ``--repeat`` times, each time with a fresh pair of
  runs (the two runs of a pair at the same time with the default ``--jobs 2``); the table
  gives the mean and the spread (half the range, as a percentage of the mean).
* The per-function breakdown (fastpool WSGI hello, the first pair) is
  ``callgrind_annotate --auto=no --inclusive=no`` of both runs of the pair, subtracted
  function by function: each function's self cost per request. Recursion levels that
  callgrind lists apart (``name'2``) are added to their function.
* A peer that is not installed (bjoern in ``--peer-python``, nginx on disk) is skipped
  with a line saying so; fastpool missing is an error. Servers are stopped in ``finally``
  blocks (SIGKILL to the process group if one outlives ``--stop-grace``), so none is left
  running.

Valgrind runs Python about 50 times slower, and most of a run is valgrind's start-up
(5-15 s for fastpool, depending on the load) rather than its requests (fastpool WSGI serves
about 3,000 hello requests a second under callgrind, asyncio about 500). The defaults
(N = 1,000, E = 5,000, 3 pairs, 2 runs at a time) take 2½-3½ minutes for the 5 servers
on this 2-core machine while it does other work; E = 2,000 saves only seconds (the start-ups
dominate) and triples the spread of the asyncio figures, so E stays at 5,000.

Standard library only. Usage (see bench/README.md)::

    python bench/instructions.py --peer-python /path/to/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    HOST,
    BenchError,
    die_with_parent,
    harness_start,
    load_apps,
    machine,
    nginx_app_locations,
    nginx_head,
    run_main,
)

ROOT = BENCH.parent
HOST_HEADER = "127.0.0.1:18080"  # run.py's default port: the bytes wrk sends there
DEPTH = 16  # requests per write for --request pipeline, as in run.py
POST_SIZE = 1024




APPS = load_apps()

# The environment of every server, and nothing else.
SERVER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": str(BENCH),
}


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestKind:
    name: str
    title: str
    write: bytes  # the bytes of one write
    per_write: int  # requests in it
    body: bytes  # each response's expected body
    asgi_app: str  # the apps_asgi app that serves it
    echo: bool = False
    app: str | None = None  # module:attribute fastpool serves instead (frameworks.py)


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST_HEADER}\r\n\r\n".encode()


_POST_BODY = b"a" * POST_SIZE  # as wrk/post.lua
REQUESTS = {r.name: r for r in [
    RequestKind("hello", "GET / (keep-alive)", _get("/"), 1, APPS.HELLO, "hello"),
    RequestKind("json", f"GET /json ({len(APPS.JSON_BODY)}-byte body)", _get("/json"), 1,
                APPS.JSON_BODY, "json"),
    RequestKind("post-1k", f"POST /echo, {POST_SIZE}-byte body echoed",
                (f"POST /echo HTTP/1.1\r\nHost: {HOST_HEADER}\r\n"
                 "Content-Type: application/octet-stream\r\n"
                 f"Content-Length: {POST_SIZE}\r\n\r\n").encode() + _POST_BODY, 1,
                _POST_BODY, "echo", echo=True),
    RequestKind("pipeline", f"{DEPTH} x GET / per write", _get("/") * DEPTH, DEPTH,
                APPS.HELLO, "hello"),
]}


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerKind:
    name: str
    title: str
    stop_signal: int
    forks: bool  # the served process is forked from the started one (--trace-children)
    python: str | None  # "fastpool" or "peer": which interpreter; None: nginx
    imports: tuple[str, ...] = ()
    dist: str | None = None
    echo: bool = True
    pipelining: bool = True


SERVER_KINDS = [
    ServerKind("fastpool-wsgi", "fastpool WSGI (apps:app)", signal.SIGTERM, True, "fastpool",
               ("fastpool",), "fastpool"),
    ServerKind("fastpool-asgi-uvloop", "fastpool ASGI, uvloop (apps_asgi)", signal.SIGTERM,
               True, "fastpool", ("fastpool", "fastpool._asgi", "uvloop"), "fastpool"),
    ServerKind("fastpool-asgi-asyncio", "fastpool ASGI, asyncio (apps_asgi)",
               signal.SIGTERM, True, "fastpool", ("fastpool", "fastpool._asgi"), "fastpool"),
    ServerKind("bjoern", "bjoern (apps:app, bjoern_serve.py)", signal.SIGINT, False, "peer",
               ("bjoern",), "bjoern", pipelining=False),
    ServerKind("nginx", "nginx (return 200, master_process off)", signal.SIGQUIT, False, None,
               echo=False),
]
SERVER_NAMES = [k.name for k in SERVER_KINDS]


def skip_reason(kind: ServerKind, request: RequestKind) -> str | None:
    if request.echo and not kind.echo:
        return "no echo endpoint (return 200 only)"
    if request.per_write > 1 and not kind.pipelining:
        return "does not answer pipelined requests (see README.md)"
    return None


@dataclass
class Available:
    kind: ServerKind
    program: str  # the interpreter, or nginx
    version: str


def probe(kind: ServerKind, args: argparse.Namespace) -> Available | str:
    """An ``Available`` if ``kind`` can run here, else why not."""
    if kind.python is None:
        nginx = shutil.which(args.nginx) or (
            shutil.which("/usr/sbin/nginx") if args.nginx == "nginx" else None)
        if nginx is None:
            return f"{args.nginx} not found"
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        return Available(kind, nginx, out.stderr.strip().rpartition("/")[2] or "?")
    python = args.fastpool_python if kind.python == "fastpool" else args.peer_python
    if shutil.which(python) is None:
        return f"interpreter {python} not found"
    code = ("import importlib, importlib.metadata as m\n"
            f"for name in {list(kind.imports)!r}: importlib.import_module(name)\n"
            f"print(m.version({kind.dist!r}))\n")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False,
                         cwd=BENCH, env=SERVER_ENV)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"not importable by {python} ({last})"
    return Available(kind, python, out.stdout.strip())


def nginx_conf(tmp: Path, port: int) -> str:
    """One nginx process (no master, no daemon) answering / and /json with the app's bytes."""
    head = nginx_head(tmp, 1, user=False, master=False, worker_connections=64,
                      keepalive_timeout="300s")
    return f"""{head}
    server {{
        listen {HOST}:{port};
{nginx_app_locations(APPS.HELLO, APPS.JSON_BODY)}    }}
}}
"""


def server_command(av: Available, request: RequestKind, port: int, tmp: Path,
                   control_dir: Path) -> list[str]:
    """The server's command line (run under valgrind, in bench/).

    fastpool gets a control socket of its own per port (the default, ./.fastpool.sock, would
    be shared by runs at the same time, and the master that finds it taken does other work
    before it forks its worker, whose count includes the master's until then).
    """
    name, prog, p = av.kind.name, av.program, str(port)
    common = ["--host", HOST, "--port", p, "--workers", "1",
              "--control-socket", str(control_dir / f"{port}.sock")]
    if name == "fastpool-wsgi":
        return [prog, "-m", "fastpool", "serve", request.app or "apps:app", *common,
                "--interface", "wsgi"]
    if name.startswith("fastpool-asgi-"):
        loop = name.rpartition("-")[2]
        target = request.app or f"apps_asgi:{request.asgi_app}"
        return [prog, "-m", "fastpool", "serve", target, *common,
                "--interface", "asgi", "--loop", loop]
    if name == "bjoern":
        return [prog, str(BENCH / "bjoern_serve.py"), HOST, p, "1"]
    if name == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, port))
        return [prog, "-p", str(tmp), "-c", str(conf), "-e", "stderr"]
    raise AssertionError(name)


def valgrind_command(args: argparse.Namespace, kind: ServerKind, out_dir: Path,
                     server: list[str]) -> list[str]:
    return [args.valgrind, "--tool=callgrind",
            f"--trace-children={'yes' if kind.forks else 'no'}",
            f"--callgrind-out-file={out_dir / 'callgrind.out.%p'}", *server]


def shown_command(cmd: list[str]) -> str:
    """``cmd`` as a shell line with the environment and directory it runs with."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in SERVER_ENV.items())
    return f"cd {shlex.quote(str(BENCH))} && env -i {env} {shlex.join(cmd)}"


# --------------------------------------------------------------------------- the client


# The calls a server blocks in when it has nothing to do, by Linux syscall number.
_IDLE_CALLS = {
    "x86_64": {"epoll_wait": 232, "epoll_pwait": 281, "epoll_pwait2": 441, "poll": 7,
               "ppoll": 271, "select": 23, "pselect6": 270},
    "aarch64": {"epoll_pwait": 22, "epoll_pwait2": 441, "ppoll": 73, "pselect6": 72},
}
IDLE_SYSCALLS = {arch: {str(n).encode() for n in calls.values()}
                 for arch, calls in _IDLE_CALLS.items()}


class IdleWatch:
    """Tells when a process is blocked waiting for events (from /proc/PID/syscall).

    An event loop does more or less work per request depending on whether the next request
    arrives while it is still busy with the last one (one wake-up or two, timers run or
    not); waiting until the server is blocked again before each write gives every request
    the same path: that of a request on an idle keep-alive connection.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle = IDLE_SYSCALLS.get(os.uname().machine)
        if self.idle is None:
            raise BenchError(f"--pace: no syscall numbers for {os.uname().machine}; "
                             "pass --no-pace")
        try:
            self.fd = os.open(f"/proc/{pid}/syscall", os.O_RDONLY)
            os.pread(self.fd, 64, 0)
        except OSError as exc:
            raise BenchError(f"--pace: cannot read /proc/{pid}/syscall ({exc}); "
                             "pass --no-pace") from None
        self.waits = 0  # writes that found the server still busy

    def wait(self, timeout: float) -> None:
        deadline = None
        while os.pread(self.fd, 64, 0).partition(b" ")[0] not in self.idle:
            if deadline is None:
                deadline = time.monotonic() + timeout
                self.waits += 1
            elif time.monotonic() > deadline:
                raise BenchError(f"the server (pid {self.pid}) was not idle within "
                                 f"{timeout:g}s")
            time.sleep(0.00002)

    def close(self) -> None:
        os.close(self.fd)


class Client:
    """Sequential keep-alive connections: a write, then all of its responses, checked."""

    def __init__(self, port: int, connections: int, request: RequestKind,
                 deadline: float, alive: Any, timeout: float) -> None:
        self.request = request
        self.socks: list[socket.socket] = []
        self.bufs: list[bytearray] = []
        self.timeout = timeout
        self.first_response = 0.0  # when every connection had its first response
        for _ in range(connections):
            self.socks.append(self._connect(port, deadline, alive))
            self.bufs.append(bytearray())

    @staticmethod
    def _connect(port: int, deadline: float, alive: Any) -> socket.socket:
        # A refused connect never reaches the server, so polling costs it nothing; the first
        # request then waits in the listen queue until the worker is up.
        while True:
            if ABORT.is_set():
                raise BenchError("interrupted")
            if not alive():
                raise BenchError("the server exited before it listened")
            try:
                sock = socket.create_connection((HOST, port), timeout=1.0)
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("the server did not listen in time") from None
                time.sleep(0.05)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

    def run(self, writes: int, first_timeout: float, pace: bool) -> tuple[int, IdleWatch | None]:
        """``writes`` writes, round-robin over the connections; the pid that served them,
        and (with ``pace``) the watch on it that held back each write after the first
        response on every connection until the server was idle."""
        count = len(self.socks)
        pid = None
        idle = None
        for i in range(writes):
            if ABORT.is_set():
                raise BenchError("interrupted")
            if i == count:
                self.first_response = time.monotonic()
                pid = self.served_by()
                idle = IdleWatch(pid) if pace else None
            if idle is not None:
                idle.wait(self.timeout)
            sock, buf = self.socks[i % count], self.bufs[i % count]
            sock.settimeout(first_timeout if i < count else self.timeout)
            sock.sendall(self.request.write)
            for _ in range(self.request.per_write):
                self._response(sock, buf)
        if pid is None:
            self.first_response = time.monotonic()
            pid = self.served_by()
        return pid, idle

    def _response(self, sock: socket.socket, buf: bytearray) -> None:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            self._fill(sock, buf)
        head = bytes(buf[:end])
        if not head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
            raise BenchError(f"unexpected response {head[:60]!r}")
        length = re.search(rb"\r\ncontent-length:[ \t]*(\d+)", head, re.I)
        if length is None:
            raise BenchError(f"response without Content-Length: {head!r}")
        total = end + 4 + int(length[1])
        while len(buf) < total:
            self._fill(sock, buf)
        if buf[end + 4:total] != self.request.body:
            raise BenchError(f"wrong body ({total - end - 4} bytes, starts "
                             f"{bytes(buf[end + 4:end + 64])!r})")
        del buf[:total]

    @staticmethod
    def _fill(sock: socket.socket, buf: bytearray) -> None:
        try:
            data = sock.recv(262144)
        except TimeoutError:
            raise BenchError("no complete response in time") from None
        if not data:
            raise BenchError("the server closed the connection")
        buf += data

    def served_by(self) -> int:
        """The pid holding the server side of our connections."""
        inodes = set()
        ours = {sock.getsockname()[1] for sock in self.socks}
        server_port = self.socks[0].getpeername()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], parts[9]
            if (int(local.rpartition(":")[2], 16) == server_port
                    and int(remote.rpartition(":")[2], 16) in ours):
                inodes.add(f"socket:[{inode}]")
        pids = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in (proc / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) in inodes:
                            pids.add(int(proc.name))
                            break
        if len(pids) != 1:
            raise BenchError(f"expected one process serving the connections, found "
                             f"{sorted(pids) or 'none'}")
        return pids.pop()

    def finish(self) -> None:
        """Half-close every connection and wait until the server has closed its side, so
        it is idle, with no connection open, when it is told to stop."""
        for sock in self.socks:
            sock.shutdown(socket.SHUT_WR)
        for sock, buf in zip(self.socks, self.bufs, strict=True):
            sock.settimeout(self.timeout)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise BenchError("the server did not close a half-closed connection") from None
            except ConnectionResetError:
                data = b""
            if data or buf:
                raise BenchError(f"unexpected bytes after the last response: "
                                 f"{(bytes(buf) + data)[:60]!r}")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


# --------------------------------------------------------------------------- one run


def callgrind_total(path: Path) -> int:
    """The Ir total of a callgrind output file (its last ``totals:``, else ``summary:``)."""
    total = summary = None
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"totals:"):
                total = int(line.split()[1])
            elif line.startswith(b"summary:"):
                summary = int(line.split()[1])
    found = total if total is not None else summary
    if found is None:
        raise BenchError(f"{path}: no totals line (did the process exit cleanly?)")
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if fields[0] != "Z" and int(fields[2]) == pgid:
                    return True
    return False


@dataclass
class Run:
    requests: int
    ir: int
    served_pid: int
    file: str
    start: float  # seconds from the start to the first response
    serving: float  # seconds from the first response to the stop signal
    held: float  # seconds it waited, idle, for the other run of its pair (PairClock)
    stopping: float  # seconds from the stop signal to the exit
    stop_signals: int  # 1 unless the first was lost
    busy_waits: int | None  # with --pace: writes that had to wait for the server to idle


_SPAWN = threading.Lock()  # one fork at a time (preexec_fn runs Python in the child)
ABORT = threading.Event()  # set on Ctrl-C: the clients stop, their servers are stopped


RESEND_S = 5.0  # the stop signal again if the server is still up after this long


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    started_at: float
    signals: int = 0  # stop signals sent (more than 1: one was lost, see RESEND_S)
    stopping: float = 0.0  # seconds from the first stop signal to the end of the group


@contextlib.contextmanager
def started(cmd: list[str], log: Path, grace: float, stop_signal: int) -> Iterator[Started]:
    """Run ``cmd`` in its own process group; stop it with ``stop_signal`` to the leader only
    (a master stops its own workers), sent again every ``RESEND_S`` (a signal that arrives
    just before a loop blocks with no timeout can be lost: nginx), SIGKILL to the group
    after ``grace``."""
    with _SPAWN, open(log, "wb") as out:
        server = Started(subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=SERVER_ENV, cwd=BENCH, start_new_session=True, preexec_fn=die_with_parent),
            time.monotonic())
    proc = server.proc
    clean = False
    try:
        yield server
        clean = True
    finally:
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            t0 = time.monotonic()
            deadline = t0 + grace
            resend = 0.0
            while time.monotonic() < deadline and _group_alive(proc.pid):
                if proc.poll() is None and time.monotonic() >= resend:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, stop_signal if clean else signal.SIGTERM)
                    server.signals += 1
                    resend = time.monotonic() + RESEND_S
                time.sleep(0.05)
            if _group_alive(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if clean:
                    raise BenchError(f"did not stop within {grace:.0f}s of signal "
                                     f"{signal.Signals(stop_signal).name}; killed")
            proc.wait()
            server.stopping = time.monotonic() - t0
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class PairClock:
    """Gives both runs of a pair the same serving time.

    A server also works per second, requests or not (fastpool's workers refresh the Date
    header, check deadlines and look for their master once a second: some 30,000 to 60,000
    instructions a second under callgrind), so a pair whose longer run serves for longer
    counts that work too, by an amount that follows the machine's load. So both runs serve
    equally long, from the first response (which comes as soon as the worker is up: the
    first request waits for it in the listen queue) to the stop signal.

    Each run, once its requests are answered, reports when it started serving (F) and when
    it was done (D). If both run at once, both serve ``S = max(D) - min(F)``: the one that
    started first stops when the last is done, the other later by as much as it started
    later, idle in between. If the longer run ends before the shorter one has started
    (``--jobs 1``), ``S`` is the longer run's own time and the shorter run, which needs less,
    holds until it has served that long.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.short_started = threading.Event()
        self.short_report = threading.Event()
        self.short: tuple[float, float] | None = None  # (F, D); None: it failed
        self.decided = threading.Event()
        self.serving: float | None = None  # S; None: the longer run failed

    def started(self, longer: bool) -> None:
        if not longer:
            self.short_started.set()

    def failed(self, longer: bool) -> None:
        """A run ended without a report: the other must not wait for it."""
        if longer and not self.decided.is_set():
            self.decided.set()
        elif not longer and not self.short_report.is_set():
            self.short_report.set()

    def _wait(self, event: threading.Event) -> None:
        while not event.wait(0.1):
            if ABORT.is_set():
                raise BenchError("interrupted")

    def hold(self, longer: bool, first: float) -> float:
        """Report, then wait until this run has served ``S``; the seconds waited."""
        done = time.monotonic()
        if longer:
            serving = done - first
            if self.enabled and self.short_started.is_set():
                self._wait(self.short_report)
                if self.short is not None:
                    serving = max(done, self.short[1]) - min(first, self.short[0])
            self.serving = serving
            self.decided.set()
        else:
            self.short = (first, done)
            self.short_report.set()
            if not self.enabled:
                return 0.0
            self._wait(self.decided)
            if self.serving is None:  # the longer run failed: the pair is lost anyway
                return 0.0
        if not self.enabled:
            return 0.0
        end = first + self.serving
        while (left := end - time.monotonic()) > 0:
            if ABORT.is_set():
                raise BenchError("interrupted")
            time.sleep(min(left, 0.1))
        return time.monotonic() - done


def one_run(av: Available, request: RequestKind, writes: int, args: argparse.Namespace,
            port: int, out_dir: Path, clock: PairClock,
            longer: bool) -> tuple[Run, list[str]]:
    """Serve ``writes`` writes under callgrind; the served process's Ir."""
    out_dir.mkdir(parents=True)
    cmd = valgrind_command(args, av.kind, out_dir,
                           server_command(av, request, port, out_dir, args.control_dir))
    log = out_dir / "server.log"
    client: Client | None = None
    idle: IdleWatch | None = None
    held = 0.0
    serving = None
    clock.started(longer)
    try:
        with started(cmd, log, args.stop_grace, av.kind.stop_signal) as server:
            client = Client(port, args.connections, request,
                            server.started_at + args.start_timeout,
                            lambda: server.proc.poll() is None, args.timeout)
            pid, idle = client.run(writes, args.start_timeout, args.pace)
            client.finish()
            held = clock.hold(longer, client.first_response)
            if idle is not None:
                idle.wait(args.timeout)  # the stop signal, too, finds it blocked
            serving = time.monotonic() - client.first_response
    except (BenchError, OSError) as exc:
        tail = "\n".join("    | " + line for line in
                         log.read_text(errors="replace").splitlines()[-12:])
        raise BenchError(f"{type(exc).__name__}: {exc}\n{tail}") from exc
    finally:
        clock.failed(longer)  # no-op after a report; else the other run waits no more
        if client is not None:
            client.close()
        if idle is not None:
            idle.close()
    path = out_dir / f"callgrind.out.{pid}"
    if not path.exists():
        raise BenchError(f"no callgrind file for the served process {pid} in {out_dir}")
    return Run(writes * request.per_write, callgrind_total(path), pid, str(path),
               round(client.first_response - server.started_at, 2), round(serving, 2),
               round(held, 2), round(server.stopping, 2), server.signals,
               idle.waits if idle is not None else None), cmd


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    server: str
    request: str
    pairs: list[tuple[Run, Run]] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None
    command: str | None = None

    def per_request(self) -> list[float]:
        return [(b.ir - a.ir) / (b.requests - a.requests) for a, b in self.pairs]

    def mean(self) -> float:
        return statistics.fmean(self.per_request())

    def spread(self) -> float:
        """Half the range of the per-request figures, as a fraction of their mean."""
        values = self.per_request()
        return (max(values) - min(values)) / 2 / statistics.fmean(values)


def measure(av: Available, request: RequestKind, args: argparse.Namespace, tmp: Path,
            result: Result) -> None:
    """``--repeat`` pairs of runs, ``--jobs`` runs at a time (each on its own port)."""
    warm = -(-args.warm // request.per_write)  # writes, rounded up to whole batches
    extra = -(-args.extra // request.per_write)
    ports: queue.Queue[int] = queue.Queue()
    for slot in range(args.jobs):
        ports.put(args.port + slot)

    def task(i: int, writes: int, clock: PairClock, longer: bool) -> tuple[Run, list[str]]:
        port = ports.get()
        try:
            # fixed width: nginx's prefix, in its command line, has the same length each run
            out = tmp / (f"{av.kind.name}-{request.name}-pair{i + 1}-"
                         f"{writes * request.per_write:08d}")
            return one_run(av, request, writes, args, port, out, clock, longer)
        finally:
            ports.put(port)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = []
        for i in range(args.repeat):
            clock = PairClock(args.hold)
            # the longer run first: the shorter one may wait for it (never the other way)
            long = pool.submit(task, i, warm + extra, clock, True)
            futures.append((pool.submit(task, i, warm, clock, False), long))
        try:
            for i, (short, long) in enumerate(futures):
                (b, cmd), (a, _) = long.result(), short.result()
                result.command = result.command or shown_command(cmd)
                result.pairs.append((a, b))
                print(f"  {av.kind.name} {request.name} pair {i + 1}: Ir {a.ir:,} "
                      f"({a.requests:,} requests; start {a.start:.1f} s, serving "
                      f"{a.serving:.1f} s, {a.held:.1f} of them held), {b.ir:,} "
                      f"({b.requests:,}; {b.start:.1f} s, {b.serving:.1f} s, {b.held:.1f}): "
                      f"{result.per_request()[-1]:,.1f} per request", flush=True)
        except BaseException:
            ABORT.set()  # the other runs stop at their next request
            for pair in futures:
                for future in pair:
                    future.cancel()
            raise


# --------------------------------------------------------------------------- breakdown


_ANNOTATE_LINE = re.compile(r"^\s*(-?[\d,]+)\s+\(\s*-?[\d.]+%\)\s+(.+?)\s*$")
_RECURSION = re.compile(r"'\d+(?= \[|$)")


def annotate(path: str, callgrind_annotate: str) -> dict[str, int]:
    """Self Ir per function (``file:function [object]``) of one callgrind file."""
    out = subprocess.run([callgrind_annotate, "--auto=no", "--inclusive=no",
                          "--threshold=100", path],
                         capture_output=True, text=True, check=True)
    costs: dict[str, int] = {}
    for line in out.stdout.splitlines():
        m = _ANNOTATE_LINE.match(line)
        if m is None or m[2] == "PROGRAM TOTALS":
            continue
        name = _RECURSION.sub("", m[2])
        costs[name] = costs.get(name, 0) + int(m[1].replace(",", ""))
    return costs


_NAME = re.compile(r"^(.*?):(.+?)(?: \[(.+)\])?$")  # file:function [object]


def short_name(name: str) -> str:
    """``function [object basename]``: the source file's path is left out (callgrind gives
    no object for code it attributes to a header it was inlined from: the header, then)."""
    m = _NAME.match(name)
    if m is None:
        return name
    obj = Path(m[3]).name if m[3] else Path(m[1]).name
    return f"{m[2]} [{obj}]"


def by_object(diffs: dict[str, float]) -> dict[str, float]:
    """The per-request costs added up per object (shared library or executable); code that
    callgrind attributes to a header goes to the object of the same-named function, if only
    one object has one, else to ``?``."""
    parsed = {name: _NAME.match(name) for name in diffs}
    known: dict[str, set[str]] = {}
    for m in parsed.values():
        if m is not None and m[3]:
            known.setdefault(m[2], set()).add(Path(m[3]).name)
    out: dict[str, float] = {}
    for name, cost in diffs.items():
        m = parsed[name]
        if m is not None and m[3]:
            obj = Path(m[3]).name
        else:  # in a header: the object only if one object has a function of that name
            objs = known.get(m[2], set()) if m is not None else set()
            obj = next(iter(objs)) if len(objs) == 1 else "?"
        out[obj] = out.get(obj, 0.0) + cost
    return dict(sorted(out.items(), key=lambda item: -abs(item[1])))


def breakdown(pair: tuple[Run, Run], top: int, callgrind_annotate: str) -> dict[str, Any]:
    a, b = pair
    before, after = annotate(a.file, callgrind_annotate), annotate(b.file, callgrind_annotate)
    requests = b.requests - a.requests
    diffs = {name: (after.get(name, 0) - before.get(name, 0)) / requests
             for name in before.keys() | after.keys()}
    total = (b.ir - a.ir) / requests
    ranked = sorted(diffs.items(), key=lambda item: (-abs(item[1]), item[0]))
    rows = [{"function": short_name(n), "full_name": n, "ir_per_request": v}
            for n, v in ranked[:top]]
    return {"requests": requests, "total_per_request": total,
            "listed_per_request": sum(r["ir_per_request"] for r in rows),
            "rest_per_request": sum(v for _, v in ranked[top:]),
            "functions": rows, "objects": by_object(diffs), "files": [a.file, b.file]}


# --------------------------------------------------------------------------- output


def render(results: list[Result]) -> str:
    out = ["| server | request | instructions / request | pairs | spread (± half range) "
           "| min – max |",
           "|---|---|---:|---:|---:|---|"]
    for r in results:
        if r.skipped or r.error or not r.pairs:
            why = r.skipped or r.error or "not measured"
            out.append(f"| {r.server} | {r.request} | — | 0 | — | "
                       f"{why.splitlines()[0]} |")
            continue
        values = r.per_request()
        out.append(f"| {r.server} | {r.request} | {r.mean():,.0f} | {len(values)} "
                   f"| ±{r.spread() * 100:.3f} % | {min(values):,.0f} – {max(values):,.0f} |")
    return "\n".join(out)


def render_breakdown(bd: dict[str, Any], label: str) -> str:
    total = bd["total_per_request"]
    out = [f"Where the instructions go: {label}, self cost per request (first pair, "
           f"{bd['requests']:,} requests apart), top {len(bd['functions'])}:\n",
           "| # | Ir / request | share | function [object] |", "|---:|---:|---:|---|"]
    for i, row in enumerate(bd["functions"], 1):
        out.append(f"| {i} | {row['ir_per_request']:,.1f} "
                   f"| {row['ir_per_request'] / total * 100:.1f} % | `{row['function']}` |")
    out.append(f"| | {bd['rest_per_request']:,.1f} | {bd['rest_per_request'] / total * 100:.1f} %"
               " | all other functions |")
    out.append(f"| | {total:,.1f} | 100 % | total |")
    out += ["\nThe same, by object:\n", "| Ir / request | share | object |", "|---:|---:|---|"]
    for obj, cost in bd["objects"].items():
        if abs(cost) >= 0.05:
            out.append(f"| {cost:,.1f} | {cost / total * 100:.1f} % | `{obj}` |")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Instructions per request under callgrind: fastpool (WSGI, ASGI) with "
                    "bjoern and nginx as references.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", action="append", choices=SERVER_NAMES,
                   help="server to measure (repeatable; default: all that are installed)")
    p.add_argument("--request", action="append", choices=list(REQUESTS),
                   help="request to send (repeatable; default: hello)")
    p.add_argument("--warm", type=int, default=1000,
                   help="N: requests of the shorter run of each pair (start-up and warm-up)")
    p.add_argument("--extra", type=int, default=5000,
                   help="E: the longer run's requests beyond N; per request = ΔIr / E")
    p.add_argument("--repeat", type=int, default=3, help="pairs of runs per figure")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time (ports --port, --port + 1, ...); counts do not depend "
                        "on it, the wall time does")
    p.add_argument("--connections", type=int, default=1,
                   help="keep-alive connections, used in turn (sequentially)")
    p.add_argument("--pace", action=argparse.BooleanOptionalAction, default=True,
                   help="before each write, wait until the server is blocked waiting for "
                        "events (/proc/PID/syscall), so that every request finds it idle")
    p.add_argument("--hold", action=argparse.BooleanOptionalAction, default=True,
                   help="both runs of a pair serve (first response to stop signal) equally "
                        "long, the one done first waiting idle, so that per-second work "
                        "cancels")
    p.add_argument("--top", type=int, default=25,
                   help="functions in the breakdown of the first fastpool figure (0: none)")
    p.add_argument("--port", type=int, default=18090, help="port the servers listen on")
    p.add_argument("--fastpool-python", default=sys.executable,
                   help="interpreter that runs fastpool")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter that runs bjoern")
    p.add_argument("--nginx", default="nginx", help="nginx binary (also tried: /usr/sbin/nginx)")
    p.add_argument("--valgrind", default="valgrind", help="valgrind binary")
    p.add_argument("--start-timeout", type=float, default=120.0,
                   help="seconds a server gets under valgrind to answer its first request")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds any later response may take")
    p.add_argument("--stop-grace", type=float, default=60.0,
                   help="seconds from the stop signal to SIGKILL (a killed run is an error)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the raw figures here")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep the callgrind files, logs and nginx.conf here "
                        "(default: a temporary directory)")
    args = p.parse_args(argv)
    if min(args.warm, args.extra, args.repeat, args.connections, args.jobs) < 1:
        p.error("--warm, --extra, --repeat, --connections and --jobs must be positive")
    if args.warm < args.connections:
        p.error("--warm must be at least --connections (every connection is used)")
    if args.top < 0:
        p.error("--top must be 0 or more")
    args.request = list(dict.fromkeys(args.request or ["hello"]))
    return args


def tool_version(cmd: list[str]) -> str:
    with contextlib.suppress(OSError):
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip()
    return "?"


def git_revision() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness_start(argv, announce=False)
    annotate_tool = shutil.which("callgrind_annotate")
    if shutil.which(args.valgrind) is None or annotate_tool is None:
        print(f"error: {args.valgrind} and callgrind_annotate are needed", file=sys.stderr)
        return 2
    if not Path("/proc/net/tcp").exists():
        print("error: needs Linux's /proc (to find the process that served)", file=sys.stderr)
        return 2

    servers: list[Available] = []
    notes: list[str] = []
    for kind in SERVER_KINDS:
        if args.server and kind.name not in args.server:
            continue
        found = probe(kind, args)
        if isinstance(found, str):
            if kind.name == "fastpool-wsgi":
                print(f"error: {kind.name}: {found}; pass --fastpool-python", file=sys.stderr)
                return 2
            notes.append(f"skipped {kind.name}: {found}")
            print(notes[-1])
            continue
        servers.append(found)

    git = git_revision()
    print(f"valgrind: {tool_version([args.valgrind, '--version'])}; fastpool at {git}; "
          f"N = {args.warm:,}, N + E = {args.warm + args.extra:,}, {args.repeat} pair(s), "
          f"{args.connections} connection(s)", flush=True)
    results: list[Result] = []
    bd: dict[str, Any] | None = None
    bd_label = ""
    started_at = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            tmp = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fastpool-instr-")))
        else:
            tmp = args.workdir.resolve()
            tmp.mkdir(parents=True, exist_ok=True)
            if any(tmp.iterdir()):
                print(f"error: --workdir {tmp} is not empty", file=sys.stderr)
                return 2
        # short: an AF_UNIX path has at most 107 bytes
        args.control_dir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fpi-")))
        for av in servers:
            print(f"{av.kind.name} {av.version} ({time.monotonic() - started_at:.0f} s)",
                  flush=True)
            for name in args.request:
                request = REQUESTS[name]
                result = Result(av.kind.name, name)
                results.append(result)
                result.skipped = skip_reason(av.kind, request)
                if result.skipped:
                    print(f"  {av.kind.name} {name}: skipped: {result.skipped}")
                    continue
                try:
                    measure(av, request, args, tmp, result)
                except BenchError as exc:
                    result.error = str(exc)
                    print(f"  {av.kind.name} {name}: NOT MEASURED: {exc}", file=sys.stderr)
                    continue
                if args.top and bd is None and av.kind.name.startswith("fastpool"):
                    bd = breakdown(result.pairs[0], args.top, annotate_tool)
                    bd_label = f"{av.kind.name} {name}"
        elapsed = time.monotonic() - started_at

    print()
    print(render(results))
    print("\nper request = (Ir(N + E) - Ir(N)) / E of the served process; "
          f"N = {args.warm:,}, E = {args.extra:,} (rounded up to whole writes); spread: "
          "half the range over the pairs, as % of the mean.")
    for note in notes:
        print(f"- {note}")
    print(f"- {', '.join(f'{av.kind.name} {av.version}' for av in servers)}; fastpool at "
          f"{git}; {tool_version([args.valgrind, '--version'])}; {machine()}")
    if bd is not None:
        print()
        print(render_breakdown(bd, bd_label))
    print("\nCommands (the first run of each figure: the runs of a pair differ in the port, "
          "fastpool's control socket and the run directory only; the client sends N or "
          "N + E requests, then stops the server):\n")
    print("```")
    for r in results:
        if r.command:
            print(f"# {r.server} {r.request}\n{r.command}")
    argv_shown = shlex.join([Path(sys.executable).name, "bench/instructions.py",
                             *(sys.argv[1:] if argv is None else argv)])
    print(f"# this table\n{argv_shown}")
    print("```")
    print(f"\n{elapsed:.0f} s in all.")
    if args.json:
        payload: dict[str, Any] = {
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items()},
            "machine": machine(),
            "valgrind": tool_version([args.valgrind, "--version"]),
            "fastpool_git": git,
            "server_env": SERVER_ENV,
            "servers": {av.kind.name: {"version": av.version, "program": av.program}
                        for av in servers},
            "notes": notes,
            "requests": {name: REQUESTS[name].write.decode("latin-1")
                         for name in args.request},
            "results": [
                {"server": r.server, "request": r.request, "skipped": r.skipped,
                 "error": r.error, "command": r.command,
                 "per_request": r.per_request() if r.pairs else [],
                 "mean": r.mean() if r.pairs else None,
                 "spread": r.spread() if r.pairs else None,
                 "pairs": [[asdict(a), asdict(b)] for a, b in r.pairs]}
                for r in results],
            "breakdown": bd,
            "seconds": round(elapsed, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"raw figures: {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)

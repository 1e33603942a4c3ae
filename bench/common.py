"""Plumbing shared by the benchmark harnesses (``run.py``, ``isolation.py``, ``routes.py``,
``instructions.py``, ``static.py``, ``tls.py``, ``multicore.py``).

* Servers: each runs in its own process group with its output in a log file, is waited
  for with a deadline (polled until ``GET /`` answers 200, never a fixed sleep) and is
  stopped with SIGTERM to the whole group, then SIGKILL after a grace period; ``running``
  does this in a ``finally`` block, so Ctrl-C, SIGTERM or an exception never leaves a
  server running. A server is also SIGKILLed if the harness itself dies.
* A minimal blocking HTTP/1.1 client for checks (``exchange``), wrk's output parser and
  runner, the median of a scenario's runs (``Result``), ``taskset`` pinning (``pin``), and
  formatting helpers.
* The costs of a wrk run, for every harness that measures one (the one place they are
  computed and shown): ``costing`` reads the CPU time of the server's process tree(s)
  (``tree_cpu_seconds``) and wrk's (``children_cpu_seconds``) around it; ``Result`` gives
  the median CPU per request and wrk's CPU share (a run above ``CLIENT_BOUND`` is
  client-bound: its req/s is a floor), their table cells (``cost_cells`` under
  ``cost_columns``, explained by ``cost_note``; ``client_bound_line``), and ``Target``,
  ``check_targets`` and ``target_lines`` give the ratios between servers on req/s and on
  CPU per request against a harness's targets.
* fastpool's control socket (``control_status``: the routing counts of a running server),
  TOML values for the generated config files, and finding and configuring nginx.

Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
HOST = "127.0.0.1"


class BenchError(Exception):
    """A server could not be started, failed a check, or wrk failed."""


def load_apps() -> ModuleType:
    """bench/apps.py, for the expected response bytes (loaded from its file:
    no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("_bench_apps", BENCH / "apps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(main: Callable[[], int], stopped: str = "all servers stopped") -> None:
    """A harness's entry point: its exit code, and a quiet 130 on Ctrl-C
    (the servers are stopped by ``running`` on the way out)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"\ninterrupted; {stopped}", file=sys.stderr)
        sys.exit(130)


def reproduce_command(argv: list[str] | None) -> str | None:
    """The command line that ran this harness (this interpreter and ``sys.argv``), to
    print and store beside its results; None when ``main`` was given its own ``argv``
    (``sys.argv`` is then not this run's)."""
    return shlex.join([sys.executable, *sys.argv]) if argv is None else None


def server_env() -> dict[str, str]:
    """The environment every server gets: bench/ importable, no stray server settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTPOOL_", "GRANIAN_", "UVICORN_"))
           and k not in ("GUNICORN_CMD_ARGS", "WEB_CONCURRENCY")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def die_with_parent() -> None:
    """In the child before exec: SIGKILL us if the harness dies without cleaning up."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid
               for _, fields in proc_stats())


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """Each process's pid and the fields of its /proc/PID/stat after ``pid (comm)``: state,
    ppid, pgrp, ... (a process gone while read is passed over)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat.rpartition(")")[2].split()


class Server:
    """One running server: its own process group, output to a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path,
                 env: dict[str, str] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env or {}  # on top of server_env()
        self.tls = tls  # a client context when the server speaks HTTPS (tls.py)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=server_env() | self.env, cwd=BENCH, start_new_session=True,
                preexec_fn=die_with_parent)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    | " + line for line in text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, port: int, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        last = "no attempt"
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited during startup "
                                 f"(status {self.proc.returncode if self.proc else '?'}):\n"
                                 f"{self.log_tail()}")
            try:
                (resp,) = exchange(port, [http_request("GET", "/", port)], timeout=1.0,
                                   tls=self.tls)
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
            except (OSError, BenchError) as exc:
                last = str(exc) or type(exc).__name__
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {deadline_s:.0f}s ({last}):\n"
                         f"{self.log_tail()}")

    def stop(self, grace: float) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.proc.poll()
            if not _group_alive(pgid):
                break
            time.sleep(0.05)
        else:
            print(f"  {self.name} did not stop within {grace:.0f}s of SIGTERM; SIGKILL",
                  file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None


@contextlib.contextmanager
def running(server: Server, grace: float) -> Iterator[Server]:
    """Start ``server``; stop it however the block ends (a second Ctrl-C waits until then)."""
    try:
        server.start()
        yield server
    finally:
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            server.stop(grace)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(method: str, path: str, port: int, body: bytes = b"",
                 close: bool = False, headers: tuple[str, ...] = (),
                 content_type: str = "application/octet-stream") -> bytes:
    """A request's bytes; ``headers``: extra ``Name: value`` lines; ``content_type``: a
    POST body's."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", *headers]
    if method == "POST":
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def exact(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise BenchError(f"connection closed after {len(data)} of {n} body bytes")
        return data

    def line(self) -> bytes:
        line = self.file.readline(65537)
        if not line:
            raise BenchError("connection closed before a complete response")
        return line

    def response(self) -> Response:
        status_line = self.line().decode("latin-1").split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
            raise BenchError(f"bad status line {status_line!r}")
        headers: dict[str, str] = {}
        while True:
            raw = self.line()
            if raw in (b"\r\n", b"\n"):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line[1])
        if status in (204, 304) or status < 200:  # never a body, whatever the headers say
            return Response(status, headers, b"")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int(self.line().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.line() not in (b"\r\n", b"\n"):
                        pass
                    break
                chunks.append(self.exact(size))
                self.line()
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = self.exact(int(headers["content-length"]))
        else:
            body = self.file.read()
        return Response(status, headers, body)

    def at_eof(self) -> bool:
        return self.file.read(1) == b""


def exchange(port: int, writes: list[bytes], count: int | None = None,
             timeout: float = 5.0, expect_close: bool = False,
             tls: ssl.SSLContext | None = None) -> list[Response]:
    """Send each write in turn on one connection, reading its responses after each write.

    With ``count`` all writes go out first (pipelining) and ``count`` responses are read.
    With ``tls`` (a client context) the connection is HTTPS.
    """
    out: list[Response] = []
    plain = socket.create_connection((HOST, port), timeout=timeout)
    if tls is not None:
        try:
            plain = tls.wrap_socket(plain, server_hostname=HOST)
        except BaseException:
            plain.close()
            raise
    with plain as sock:
        reader = _Reader(sock)
        try:
            if count is not None:
                sock.sendall(b"".join(writes))
                for _ in range(count):
                    out.append(reader.response())
            else:
                for data in writes:
                    sock.sendall(data)
                    out.append(reader.response())
        except TimeoutError as exc:
            raise BenchError(f"no complete response within {timeout:g}s (after "
                             f"{len(out)} of {count or len(writes)})") from exc
        if expect_close:
            try:
                closed = reader.at_eof()
            except TimeoutError:
                closed = False
            if not closed:
                raise BenchError(f"connection still open {timeout:.0f}s after a "
                                 "Connection: close response")
    return out


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass
class WrkRun:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    output: str = field(repr=False)
    # Only with wrk/statuses.lua: responses per status, and the 503s with Retry-After.
    statuses: dict[int, int] = field(default_factory=dict)
    retry_after: int = 0


def parse_wrk(text: str) -> WrkRun:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if rps is None:
        raise BenchError(f"no Requests/sec in wrk output:\n{text}")
    # wrk prints 0.00us for a percentile it could not compute (seen with pipelining): unknown
    lat = {m[1]: float(m[2]) * _UNITS_MS[m[3]] or float("nan")
           for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)}
    total = re.search(r"^\s*(\d+) requests in ", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = dict(zip(("connect", "read", "write", "timeout"),
                      (int(x) for x in sock.groups()) if sock else (0, 0, 0, 0), strict=True))
    statuses = {int(m[1]): int(m[2]) for line in re.findall(r"^statuses:(.*)$", text, re.M)
                for m in re.finditer(r"(\d+)=(\d+)", line)}
    retry_after = re.search(r"^503 with Retry-After: (\d+)", text, re.M)
    return WrkRun(float(rps[1]), lat.get("50", float("nan")), lat.get("99", float("nan")),
                  int(total[1]) if total else 0, int(non2xx[1]) if non2xx else 0, errors, text,
                  statuses, int(retry_after[1]) if retry_after else 0)


def run_wrk(cmd: list[str], duration: int) -> WrkRun:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {shlex.join(cmd)}") from exc
    if out.returncode != 0:
        raise BenchError(f"wrk exited {out.returncode}: {out.stderr.strip() or out.stdout}")
    return parse_wrk(out.stdout)


def median_known(values: list[float]) -> float:
    """The median of the values that are not NaN (NaN if none is known)."""
    known = [v for v in values if v == v]
    return statistics.median(known) if known else float("nan")


@dataclass
class Cost:
    """What one measured run cost: the server's CPU seconds (its whole process tree,
    ``tree_cpu_seconds``), the load generator's (``children_cpu_seconds``), and the
    run's wall time."""

    server_cpu_s: float
    wrk_cpu_s: float
    wall_s: float


# wrk's share of its core above which a run is "client-bound": its req/s is a
# floor set by the load generator, not a figure of the server.
CLIENT_BOUND = 0.85


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _roots(server_pids: int | Iterable[int]) -> list[int]:
    return [server_pids] if isinstance(server_pids, int) else list(server_pids)


@contextlib.contextmanager
def costing(server_pids: int | Iterable[int], costs: list[Cost]) -> Iterator[None]:
    """Wrap one run of wrk (started and waited for inside): its ``Cost`` is appended to
    ``costs``. ``server_pids``: the root of the server's process tree, or of each of its
    trees (a layout of several servers)."""
    roots = _roots(server_pids)

    def server_cpu() -> float:
        return sum(tree_cpu_seconds(pid) for pid in roots)

    server0, wrk0, wall0 = server_cpu(), children_cpu_seconds(), time.monotonic()
    yield
    costs.append(Cost(server_cpu() - server0, children_cpu_seconds() - wrk0,
                      time.monotonic() - wall0))


def costed_wrk(server_pids: int | Iterable[int], r: Result, cmd: list[str],
               duration: int) -> tuple[WrkRun, str]:
    """Run wrk ``cmd`` once under ``costing`` (its ``Cost`` goes to ``r.costs``; the
    run is returned, not appended), and what a progress line adds: ", 12.3 µs/req, server
    98% CPU, wrk 71%"."""
    with costing(server_pids, r.costs):
        one = run_wrk(cmd, duration)
    return one, cost_progress(one, r.costs[-1])


def costed_run(server: Server) -> Callable[[Result, list[str], int], tuple[WrkRun, str]]:
    """``measure_scenarios``'s ``run`` for ``server``: wrk once, costed (``costed_wrk``)."""

    def run(r: Result, cmd: list[str], duration: int) -> tuple[WrkRun, str]:
        assert server.proc is not None  # taskset execs the server: its pid is the root
        return costed_wrk(server.proc.pid, r, cmd, duration)

    return run


def cost_progress(one: WrkRun, cost: Cost) -> str:
    """A run's costs for its progress line (see ``costed_wrk``)."""
    per = (f"{cost.server_cpu_s / one.requests * 1e6:.1f} µs/req" if one.requests
           else "? µs/req")
    busy = cost.wrk_cpu_s / cost.wall_s if cost.wall_s else float("nan")
    return (f", {per}, server {cost.server_cpu_s / cost.wall_s:.0%} CPU, wrk {busy:.0%}"
            + (" (client-bound)" if busy > CLIENT_BOUND else ""))


@dataclass
class Result:
    """A scenario's runs on one server, or why it was not measured; medians over the runs,
    and with ``costs`` (one per run) the server's CPU per request and wrk's CPU use."""

    scenario: str
    server: str
    runs: list[WrkRun] = field(default_factory=list)
    error: str | None = None
    costs: list[Cost] = field(default_factory=list)
    # The CPUs wrk was given (one thread each, multicore.py): its busy share is of them all.
    wrk_cpus: int = 1

    @property
    def cpu_us(self) -> float:
        """The server's user + system CPU per request (µs), median over the runs."""
        if not self.costs:
            return float("nan")
        return median_known([c.server_cpu_s / r.requests * 1e6 if r.requests else float("nan")
                             for r, c in zip(self.runs, self.costs, strict=True)])

    @property
    def wrk_busy(self) -> float:
        """wrk's share of its core, or of its ``wrk_cpus`` cores (median over the runs)."""
        if not self.costs:
            return float("nan")
        return median_known([c.wrk_cpu_s / c.wall_s / self.wrk_cpus for c in self.costs])

    @property
    def server_cpus_used(self) -> float:
        """How many CPUs' worth the server's process tree used: its CPU seconds ÷ the wall
        seconds (median over the runs)."""
        if not self.costs:
            return float("nan")
        return median_known([c.server_cpu_s / c.wall_s for c in self.costs])

    @property
    def server_busy(self) -> float:
        """The server's CPU time ÷ wall time (1.0: one core; median over the runs)."""
        if not self.costs:
            return float("nan")
        return median_known([c.server_cpu_s / c.wall_s for c in self.costs])

    @property
    def client_bound(self) -> bool:
        return self.wrk_busy > CLIENT_BOUND

    def cpu_ratio(self, base: Result | None) -> float | None:
        """``base``'s CPU per request ÷ this one's (above 1 this server spends less than
        ``base``); None without both figures, or when ``base`` is this result."""
        cpu = self.cpu_us
        if base is None or base is self or not self.runs or not base.runs or cpu != cpu \
                or not cpu or base.cpu_us != base.cpu_us:
            return None
        return base.cpu_us / cpu

    def rps_ratio(self, base: Result | None) -> float | None:
        """This one's req/s ÷ ``base``'s; None without both, or when ``base`` is this one."""
        if base is None or base is self or not self.runs or not base.runs or not base.rps:
            return None
        return self.rps / base.rps

    def cpu_cell(self) -> str:
        cpu = self.cpu_us
        return "?" if cpu != cpu else f"{cpu:,.1f} µs"

    def wrk_cell(self) -> str:
        """wrk's CPU share, flagged when client-bound."""
        busy = self.wrk_busy
        return "?" if busy != busy else f"{busy:.0%}" + (
            " (client-bound)" if busy > CLIENT_BOUND else "")

    def server_cell(self) -> str:
        busy = self.server_busy
        return "?" if busy != busy else f"{busy:.0%}"

    def cost_cells(self, base: Result | None) -> list[str]:
        """Table cells (``cost_columns``): CPU per request, ``base``'s CPU per request ÷
        this one's (``cpu_ratio``; "—" for ``base`` itself), the server's CPU share, wrk's
        (flagged when client-bound)."""
        ratio = self.cpu_ratio(base)
        return [self.cpu_cell(), "—" if ratio is None else f"{ratio:.2f}", self.server_cell(),
                self.wrk_cell()]

    def to_json(self) -> dict[str, Any]:
        """The result for a harness's JSON file: medians (with the costs) and every run
        (raw wrk output, and its ``Cost`` where costed)."""
        costs: list[Cost | None] = list(self.costs) if self.costs else [None] * len(self.runs)
        return {
            "scenario": self.scenario, "server": self.server, "error": self.error,
            "median": ({"rps": self.rps, "p50_ms": self.p50, "p99_ms": self.p99,
                        "cpu_us_per_request": self.cpu_us, "server_cpu": self.server_busy,
                        "wrk_cpu": self.wrk_busy, "client_bound": self.client_bound}
                       if self.runs else None),
            "runs": [asdict(run) | ({"cost": asdict(cost)} if cost else {})
                     for run, cost in zip(self.runs, costs, strict=True)]}

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    @property
    def p50(self) -> float:
        return median_known([r.p50_ms for r in self.runs])

    @property
    def p99(self) -> float:
        return median_known([r.p99_ms for r in self.runs])

    def problems(self) -> str:
        non2xx = sum(r.non_2xx for r in self.runs)
        parts = [f"{non2xx} non-2xx"] if non2xx else []
        for kind in ("connect", "read", "write", "timeout"):
            n = sum(r.socket_errors[kind] for r in self.runs)
            if n:
                parts.append(f"{n} {kind}")
        return ", ".join(parts)


def pin(cpus: str, args: argparse.Namespace) -> list[str]:
    """``taskset -c CPUS``, or nothing with ``--no-pin``."""
    return [] if args.no_pin else ["taskset", "-c", cpus]


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and its descendants.

    Read from /proc/PID/stat: utime and stime cover every thread of a process, dead ones
    too; cutime and cstime add the children it has already reaped (which are no longer in
    the tree, so nothing is counted twice). A process that exited unreaped by a member of
    the tree is lost. Resolution: one clock tick (usually 10 ms).
    """
    ticks: dict[int, int] = {}
    children: dict[int, list[int]] = {}
    for pid, fields in proc_stats():
        # after "pid (comm)": state ppid ...; utime stime cutime cstime are fields 14-17
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(x) for x in fields[11:15])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def fmt_ms(ms: float) -> str:
    if ms != ms:  # NaN
        return "?"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs"
            + (f" ({model})" if model else "") + f", harness Python {platform.python_version()}")


def no_nan(value: Any) -> Any:
    """``value`` with NaN floats (unknown percentiles) as None, so the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


def raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def harness_start(argv: list[str] | None, announce: bool = True) -> str | None:
    """The first steps of every harness's ``main``: SIGTERM and SIGHUP end it through
    ``SystemExit`` (so its servers are stopped on the way out), and the command line
    that ran it (``reproduce_command``), printed first when ``announce``."""
    signal.signal(signal.SIGTERM, raise_exit)
    signal.signal(signal.SIGHUP, raise_exit)
    reproduce = reproduce_command(argv)
    if reproduce and announce:
        print(f"running: {reproduce}")
    return reproduce


def python_version(python: str, modules: list[str], dist: str) -> str:
    """``dist``'s version as ``python`` sees it, after importing ``modules``.

    Raises ``BenchError`` (with the import error's last line) if it cannot.
    """
    if shutil.which(python) is None:
        raise BenchError(f"interpreter {python} not found")
    code = (
        "import importlib, importlib.metadata as m\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(m.version({dist!r}))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False,
                         cwd=BENCH)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchError(f"not importable by {python} ({last})")
    return out.stdout.strip()


def toml_list(items: list[str]) -> str:
    """A TOML array of strings (JSON string escapes are valid TOML basic strings)."""
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def control_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The ``status`` reply of the fastpool master listening on control socket ``path``.

    The protocol (one JSON line each way) is spoken here directly, so the harness does
    not need to import fastpool.
    """
    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(b'{"command": "status"}\n')
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise BenchError(f"control socket {path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise BenchError(f"control socket {path}: unreadable reply {data[:80]!r}") from exc
    if not reply.get("ok"):
        raise BenchError(f"control socket {path}: {reply.get('error') or 'refused'}")
    return reply


ROUTING_COUNTS = ("handed_in", "handed_out", "shed")


def routing_counts(path: Path) -> dict[str, dict[str, int]]:
    """Per group of the fastpool on control socket ``path``: its handed_in, handed_out and
    shed (503 from admission control) counts so far."""
    return {g["name"]: {k: int(g.get(k, 0)) for k in ROUTING_COUNTS}
            for g in control_status(path).get("groups", [])}


def counts_delta(before: dict[str, dict[str, int]],
                 after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``after - before``, per group and count."""
    return {group: {k: v - before.get(group, {}).get(k, 0) for k, v in counts.items()}
            for group, counts in after.items()}


def find_nginx(nginx: str) -> str | None:
    """The nginx binary: ``nginx`` itself if on PATH or a path to an executable, and for the
    default name also /usr/sbin/nginx (not on a normal user's PATH)."""
    found = shutil.which(nginx)
    if found is None and nginx == "nginx":
        found = shutil.which("/usr/sbin/nginx")
    return found


def nginx_version(nginx: str) -> str:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return out.stderr.strip().rpartition("/")[2] or "?"


def nginx_temp_paths(tmp: Path, prefix: str = "") -> str:
    """The ``*_temp_path`` lines of an ``http`` block, all under ``tmp`` (indented 4)."""
    return "\n".join(f"    {name}_temp_path {tmp / (prefix + name + '_temp')};"
                     for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def nginx_user() -> str:
    """``user root;`` when run as root, where nginx would switch its workers to nobody, who
    cannot use the temp dirs (or read the files) under a private temporary directory."""
    return "user root;\n" if os.geteuid() == 0 else ""


def nginx_head(tmp: Path, workers: int, *, user: bool = True, master: bool = True,
               worker_connections: int = 4096, keepalive_timeout: str = "75s",
               temp_prefix: str = "", http: str = "") -> str:
    """A harness's nginx.conf up to its ``http`` block's ``server``s: foreground, logs to
    stderr, no access log, unlimited keep-alive requests, ``http`` (more lines of the
    block, indented 4), the temp paths under ``tmp``; ``user root;`` (``nginx_user``) with
    ``user``. No final newline."""
    return f"""{nginx_user() if user else ''}daemon off;
master_process {'on' if master else 'off'};
worker_processes {workers};
pid {tmp / 'nginx.pid'};
error_log stderr warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_timeout {keepalive_timeout};
    keepalive_requests 1000000000;
{http}{nginx_temp_paths(tmp, temp_prefix)}"""


def nginx_app_locations(hello: bytes, json_body: bytes) -> str:
    """``location``s (indented 8) answering ``/`` and ``/json`` with apps.py's bytes, and 404
    for the rest. nginx cannot echo (no ``POST /echo``)."""
    body = json_body.decode()
    if any(c in body for c in "'\\$"):
        raise BenchError("the JSON body cannot be put into nginx.conf verbatim")
    # nginx caps one config token at 4 KiB: set the body in pieces, return their concatenation
    pieces = [body[i:i + 1024] for i in range(0, len(body), 1024)]
    sets = " ".join(f"set $json{i} '{piece}';" for i, piece in enumerate(pieces))
    joined = "".join(f"$json{i}" for i in range(len(pieces)))
    text = hello.decode().replace("\n", "\\n")
    return f"""        location = / {{ default_type text/plain; return 200 '{text}'; }}
        location = /json {{
            default_type application/json;
            {sets}
            return 200 "{joined}";
        }}
        location / {{ default_type text/plain; return 404 'not found\\n'; }}
"""


# --------------------------------------------------------------------------- harness CLI

AddOptions = Callable[[argparse.ArgumentParser], None]


def interpreter_path(value: str) -> str:
    """An interpreter option's value: a relative path made absolute (servers run with
    bench/ as working directory); a bare name is left for PATH."""
    return str(Path(value).absolute()) if os.sep in value else value


def add_load_options(p: argparse.ArgumentParser, *, port: int, peer_python_help: str,
                     workdir_help: str, before: dict[str, AddOptions] | None = None) -> None:
    """The load, pinning, binary and output options of run.py and static.py, in their
    ``--help`` order; ``before[option]`` adds a harness's own options just before it."""
    before = before or {}

    def add(flag: str, **kwargs: Any) -> None:
        if flag in before:
            before[flag](p)
        p.add_argument(flag, **kwargs)

    add("--duration", type=int, default=5, help="seconds per measured run")
    add("--runs", type=int, default=3, help="measured runs per scenario (median)")
    add("--warmup", type=int, default=1,
        help="seconds of discarded warm-up per scenario (0: none)")
    add("--connections", type=int, default=64, help="wrk -c")
    add("--wrk-threads", type=int, default=1, help="wrk -t")
    add("--workers", type=int, default=1, help="worker processes for every server")
    add("--gunicorn-threads", type=int, default=1, help="gunicorn gthread --threads")
    add("--server-cpus", default="0", help="taskset -c list for the server")
    add("--wrk-cpus", default="1", help="taskset -c list for wrk")
    add("--no-pin", action="store_true", help="do not use taskset")
    add("--port", type=int, default=port, help="port every server listens on")
    add("--fastpool-python", default=sys.executable, type=interpreter_path,
        help="interpreter that runs fastpool and fastpool-asgi")
    add("--peer-python", default=sys.executable, type=interpreter_path,
        help=peer_python_help)
    add("--nginx", default="nginx", help="nginx binary (also tried: /usr/sbin/nginx)")
    add("--wrk", default="wrk", help="wrk binary")
    add("--start-timeout", type=float, default=30.0,
        help="seconds a server gets to answer its first request")
    add("--stop-grace", type=float, default=10.0,
        help="seconds between SIGTERM and SIGKILL when stopping a server")
    add("--json", type=Path, metavar="PATH", help="write the raw results here")
    add("--workdir", type=Path, metavar="DIR", help=workdir_help)


def require_positive(p: argparse.ArgumentParser, args: argparse.Namespace,
                     *names: str) -> None:
    """``p.error`` unless every option ``names`` (dests) is at least 1."""
    if min(getattr(args, name) for name in names) < 1:
        flags = ["--" + name.replace("_", "-") for name in names]
        p.error(f"{', '.join(flags[:-1])} and {flags[-1]} must be positive")


def require_warmup(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")


# --------------------------------------------------------------------------- harness main


def check_tools(args: argparse.Namespace) -> bool:
    """wrk, and taskset unless ``--no-pin``, are on PATH (else an error line: False); a
    warning if pinning on fewer than 2 CPUs."""
    for tool in [args.wrk] + ([] if args.no_pin else ["taskset"]):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found", file=sys.stderr)
            return False
    if not args.no_pin and (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; server and wrk will share a core", file=sys.stderr)
    return True


def work_dir(stack: contextlib.ExitStack, args: argparse.Namespace, prefix: str) -> Path:
    """``--workdir`` (created), or a temporary directory removed when ``stack`` closes."""
    if args.workdir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    tmp: Path = args.workdir.resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a run, for its JSON file (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (NaN as null) to ``path`` and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(no_nan(payload), indent=2) + "\n")
    print(f"\nraw results: {path}")


# --------------------------------------------------------------------------- reports


def load_summary(args: argparse.Namespace) -> str:
    """How run.py and static.py loaded the servers, for the line under their tables:
    "Median of ... per server, <pinning>" (no final full stop)."""
    pinning = ("not pinned" if args.no_pin else
               f"servers pinned to CPU {args.server_cpus}, wrk to CPU {args.wrk_cpus}")
    return (f"Median of {args.runs} run(s) of {args.duration} s each "
            + (f"(after a {args.warmup} s warm-up), " if args.warmup else "(no warm-up), ")
            + f"{args.connections} connections, {args.wrk_threads} wrk thread(s), "
            f"{args.workers} worker(s) per server, {pinning}")


def result_table(rows: list[Any], base_name: str, base: Result | None, *,
                 costs: bool = False,
                 more_head: tuple[str, ...] = (),
                 more_cells: Callable[[Any], list[str]] = lambda r: [],
                 errors_head: str = "non-2xx / socket errors") -> list[str]:
    """The lines of a scenario's markdown table: per ``Result`` of ``rows`` its server,
    req/s, p50, p99, req/s ÷ ``base``'s, with ``costs`` the ``COST_HEAD`` columns
    (``Result.cost_cells``), then the columns ``more_head`` (right-aligned,
    ``more_cells(result)`` for a measured one), and an ``errors_head`` column if any row
    has problems or an error."""
    base_rps = base.rps if base is not None and base.runs else None
    show_errors = any(r.problems() or r.error for r in rows)
    cost_head = cost_columns(base_name) if costs else ()
    head = ["server", "req/s", "p50", "p99", f"vs {base_name}", *cost_head, *more_head]
    if show_errors:
        head.append(errors_head)
    width = len(cost_head) + len(more_head)
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (4 + width) + ["---"] * show_errors) + "|"]
    for r in rows:
        if r.runs:
            ratio = f"{r.rps / base_rps:.2f}" if base_rps else "—"
            cells = [r.server, f"{r.rps:,.0f}", fmt_ms(r.p50), fmt_ms(r.p99), ratio,
                     *(r.cost_cells(base) if costs else []), *more_cells(r)]
        else:
            cells = [r.server, "failed"] + ["—"] * (3 + width)
        if show_errors:
            cells.append("; ".join(x for x in (r.problems(), r.error or "") if x) or "—")
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return out


def cost_columns(base_name: str) -> tuple[str, ...]:
    """The heads of ``Result.cost_cells``'s columns."""
    return ("CPU/req", f"CPU/req vs {base_name}", "server CPU", "wrk CPU")


def cost_note(base_name: str) -> str:
    """What the cost columns mean, for the line under a harness's tables (no final
    full stop)."""
    return (f"CPU/req: the server's CPU time (user + system, its whole process tree, from "
            f"/proc) per request; the two 'vs {base_name}' columns read the same way, above 1 "
            f"the server does better than {base_name} (its req/s ÷ {base_name}'s; "
            f"{base_name}'s CPU/req ÷ its); server CPU: its CPU time ÷ wall time (100% = one "
            "core; well below it while wrk is not client-bound, the server was starved by "
            "other load on its core and its req/s says little); wrk CPU: wrk's CPU time ÷ "
            f"wall time (above {CLIENT_BOUND:.0%} of its core: client-bound, the req/s is a "
            "floor set by the load generator, and CPU/req is the figure to compare)")


def client_bound_line(results: Iterable[Result]) -> str:
    """Which measured results were client-bound, as a sentence."""
    bound = [f"{r.server} {r.scenario} (wrk {r.wrk_busy:.0%})" for r in results
             if r.runs and r.client_bound]
    if not bound:
        return f"No run was client-bound (wrk at most {CLIENT_BOUND:.0%} of its core)."
    return (f"Client-bound (wrk above {CLIENT_BOUND:.0%} of its core; their req/s is a "
            f"floor): {', '.join(bound)}.")


@dataclass(frozen=True)
class Target:
    """A goal for the harness's base server against ``peer`` on ``scenario``: the base's
    advantage at least ``least`` on each measure of ``on``: "rps" (base req/s ÷ peer
    req/s) and "cpu" (peer CPU/req ÷ base CPU/req)."""

    scenario: str
    peer: str
    least: float
    on: tuple[str, ...] = ("rps", "cpu")


MEASURES = {"rps": "req/s", "cpu": "CPU/req"}


def check_targets(targets: list[Target], results: dict[tuple[str, str], Result],
                  base_name: str) -> list[dict[str, Any]]:
    """Each target whose scenario ran with the base and the peer: both ratios (None where
    not measured), met or not per measure of its ``on``, and who was client-bound."""
    out = []
    for t in targets:
        base, peer = results.get((t.scenario, base_name)), results.get((t.scenario, t.peer))
        if base is None or peer is None:
            continue
        ratios = {"rps": base.rps_ratio(peer), "cpu": base.cpu_ratio(peer)}
        out.append({"scenario": t.scenario, "peer": t.peer, "target": t.least,
                    "on": list(t.on), "ratios": ratios,
                    "met": {m: None if ratios[m] is None else ratios[m] >= t.least
                            for m in t.on},
                    "client_bound": [r.server for r in (base, peer)
                                     if r.runs and r.client_bound],
                    "errors": [r.server for r in (base, peer) if r.problems() or r.error]})
    return out


def target_lines(checks: list[dict[str, Any]], base_name: str, args: argparse.Namespace,
                 source: str = "") -> list[str]:
    """The targets' lines under the tables (``check_targets``): a head, then per target
    both ratios with its verdict on each measure it asks for; [] without targets."""
    if not checks:
        return []
    out = [f"Targets{f' ({source})' if source else ''}: {base_name} ÷ peer on req/s, "
           f"peer's CPU/req ÷ {base_name}'s on CPU/req (above 1 {base_name} does better); "
           f"1 worker pinned to one core, wrk on another{target_caveat(args)}; printed, not "
           "asserted:\n"]
    for c in checks:
        parts = []
        for measure, label in MEASURES.items():
            ratio = c["ratios"][measure]
            shown = "not measured" if ratio is None else f"{ratio:.2f}"
            if measure in c["on"]:
                verdict = "" if ratio is None else (" (met)" if c["met"][measure]
                                                     else " (NOT met)")
            else:
                verdict = " (no target)" if ratio is not None else ""
            parts.append(f"{label} {shown}{verdict}")
        notes = []
        if c["client_bound"]:
            notes.append(f"client-bound: {' and '.join(c['client_bound'])}")
        if c["errors"]:
            notes.append(f"errors from {' and '.join(c['errors'])}: see the table")
        out.append(f"- {c['scenario']}: {base_name} vs {c['peer']} >= {c['target']:g}: "
                   + "; ".join(parts) + (f" [{'; '.join(notes)}]" if notes else ""))
    out.append("")
    return out


def target_caveat(args: argparse.Namespace) -> str:
    """What in this run differs from the targets' setting (1 worker, pinned), as
    "; this run used N workers and this run was not pinned", or ""."""
    caveat = []
    if args.workers != 1:
        caveat.append(f"this run used {args.workers} workers")
    if args.no_pin:
        caveat.append("this run was not pinned")
    return f"; {' and '.join(caveat)}" if caveat else ""


# --------------------------------------------------------------------------- measuring


def measure_scenarios(
        server: Server, name: str, label: str, scenarios: list[Any],
        args: argparse.Namespace, *,
        check: Callable[[list[Any]], dict[str, str]],
        result: Callable[[Any], Result],
        wrk_command: Callable[[Any, int], list[str]],
        run: Callable[[Result, list[str], int], tuple[WrkRun, str]],
        ready_note: Callable[[], str] = lambda: "",
        loading: Callable[[Any], None] = lambda s: None) -> None:
    """Start ``server`` (``label`` in messages; ``name`` its results' server), wait for it,
    ``check`` it on ``scenarios`` (each has a ``name``; ``check`` returns {scenario: why it
    failed}), then per scenario that passed: a warm-up, ``--runs`` runs, and the check again;
    stop it.

    ``result(s)``: the ``Result`` a scenario's runs go into; ``run(result, cmd, duration)``
    runs wrk once and returns its run (appended here) and what its progress line adds;
    ``loading(s)`` is called before a scenario's load.
    """
    by_name = {s.name: s for s in scenarios}

    def fail_all(reason: str) -> None:
        for s in scenarios:
            result(s).error = result(s).error or reason

    with running(server, args.stop_grace):
        try:
            server.wait_ready(args.port, args.start_timeout)
        except BenchError as exc:
            print(f"  {label}: NOT MEASURED: {exc}", file=sys.stderr)
            fail_all(f"not measured: {str(exc).splitlines()[0].rstrip(':')}")
            return
        failures = check(scenarios)
        for scenario_name, why in failures.items():
            print(f"  {label}: {scenario_name} NOT MEASURED, check failed: {why}",
                  file=sys.stderr)
            result(by_name[scenario_name]).error = f"check failed: {why}"
        print(f"  {label}: ready; checks passed for "
              f"{', '.join(s.name for s in scenarios if s.name not in failures) or 'nothing'}"
              + ready_note())
        for s in scenarios:
            if s.name in failures:
                continue
            r = result(s)
            loading(s)
            try:
                if args.warmup > 0:
                    run_wrk(wrk_command(s, args.warmup), args.warmup)
                for i in range(args.runs):
                    one, extra = run(r, wrk_command(s, args.duration), args.duration)
                    r.runs.append(one)
                    bad = one.non_2xx or any(one.socket_errors.values())
                    print(f"  {name} {s.name} run {i + 1}: {one.rps:,.0f} req/s, "
                          f"p50 {fmt_ms(one.p50_ms)}, p99 {fmt_ms(one.p99_ms)}{extra}"
                          + (f" [{Result(s.name, name, [one]).problems()}]" if bad else ""))
            except BenchError as exc:
                r.error = "wrk failed: " + (str(exc).splitlines() or ["?"])[0]
                print(f"  {name} {s.name}: {exc}", file=sys.stderr)
            if not server.alive():
                print(f"  {label} exited during {s.name}:\n{server.log_tail()}",
                      file=sys.stderr)
                fail_all(f"server exited during {s.name}")
                return
            # still answering, and correctly, after the load? (the scenario's own check again)
            after = check([s])
            if after:
                r.error = f"check failed after this scenario: {after[s.name]}"
                print(f"  {label}: {r.error}", file=sys.stderr)

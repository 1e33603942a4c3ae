"""Throughput benchmark: fastpool against other Python servers, with nginx as a reference.

Rules this harness keeps:

* Every server serves the same app behaviour from ``bench/apps.py`` (WSGI ``apps:app``;
  uvicorn, being ASGI-only, serves ``apps:asgi_app``, which sends the same bytes; nginx
  answers the fixed routes with ``return 200 '...'`` and cannot echo, so it is left out of
  the echo scenarios). Every server gets the same worker count (``--workers``, default 1).
* The server and all its processes are pinned to one set of CPUs (``taskset -c``, default
  core 0) and wrk to another (default core 1), so client and server never share a core.
* A peer that its interpreter cannot import (or, for nginx, that is not on disk) is
  skipped with a line saying so; only fastpool's absence is an error.
* Every server is waited for with a deadline (polled until a request succeeds, never a
  fixed sleep) and then checked for correctness once -- exact bodies, echo, pipelining,
  ``Connection: close`` -- before anything is measured; a server failing a check is not
  measured.
* Each scenario gets a short warm-up run (discarded) and then ``--runs`` measured runs of
  ``--duration`` seconds; req/s, p50 and p99 are each the median over those runs.
* Every server runs in its own process group and is stopped with SIGTERM to the whole
  group, then SIGKILL after a grace period; this happens in ``finally`` blocks, so Ctrl-C,
  SIGTERM or an exception never leaves a server running.
* Standard library only; the exact server and wrk command lines are printed under the
  tables, and ``--json PATH`` saves every run's numbers and raw wrk output.

Usage (see bench/README.md)::

    python bench/run.py --peer-python /path/to/peers-venv/bin/python
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
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
WRK_SCRIPTS = BENCH / "wrk"
HOST = "127.0.0.1"


def _load_apps() -> ModuleType:
    """bench/apps.py, for the expected response bytes (not imported by name: no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("_bench_apps", BENCH / "apps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


APPS = _load_apps()
HELLO: bytes = APPS.HELLO
JSON_BODY: bytes = APPS.JSON_BODY


class BenchError(Exception):
    """A server could not be started, failed a check, or wrk failed."""


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    path: str
    script: str | None = None  # a file in bench/wrk/
    script_args: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    echo: bool = False  # needs POST /echo (nginx cannot)


def make_scenarios(depth: int) -> list[Scenario]:
    return [
        Scenario("hello", "Hello world, keep-alive (GET /)", "/"),
        Scenario("pipeline", f"Pipelined, depth {depth} (GET /)", "/",
                 script="pipeline.lua", script_args=(str(depth), "/")),
        Scenario("json", f"{len(JSON_BODY)}-byte JSON (GET /json)", "/json"),
        Scenario("post-1k", "POST 1 KiB echo (POST /echo)", "/echo",
                 script="post.lua", script_args=("1024",), echo=True),
        Scenario("post-64k", "POST 64 KiB echo (POST /echo)", "/echo",
                 script="post.lua", script_args=("65536",), echo=True),
        Scenario("close", "New connection per request (Connection: close, GET /)", "/",
                 headers=("Connection: close",)),
    ]


SCENARIO_NAMES = [s.name for s in make_scenarios(16)]


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerKind:
    name: str
    module: str | None  # what its interpreter must import (None: not a Python server)
    dist: str | None  # distribution whose version is reported
    extra_imports: tuple[str, ...] = ()
    echo: bool = True
    note: str = ""


SERVER_KINDS = [
    ServerKind("fastpool", "fastpool", "fastpool"),
    ServerKind("gunicorn", "gunicorn", "gunicorn", note="gthread worker"),
    ServerKind("uvicorn", "uvicorn", "uvicorn", ("uvloop", "httptools"),
               note="ASGI app (`apps:asgi_app`, same bytes); httptools + uvloop"),
    ServerKind("granian", "granian", "granian", note="WSGI interface"),
    ServerKind("bjoern", "bjoern", "bjoern", note="via bench/bjoern_serve.py"),
    ServerKind("nginx", None, None, echo=False,
               note="reference, not Python: `return 200 '...'`; no echo"),
]
SERVER_NAMES = [k.name for k in SERVER_KINDS]


@dataclass
class Available:
    kind: ServerKind
    python: str | None
    version: str


def probe(kind: ServerKind, python: str | None, nginx: str) -> Available | str:
    """An ``Available`` if ``kind`` can be run, else the reason it cannot."""
    if kind.module is None:
        path = shutil.which(nginx) or (nginx if os.access(nginx, os.X_OK) else None)
        if path is None:
            return f"{nginx} not found"
        out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
        version = out.stderr.strip().rpartition("/")[2] or "?"
        return Available(kind, path, version)
    assert python is not None
    if shutil.which(python) is None:
        return f"interpreter {python} not found"
    code = (
        "import importlib, importlib.metadata as m\n"
        f"for name in {[kind.module, *kind.extra_imports]!r}: importlib.import_module(name)\n"
        f"print(m.version({kind.dist!r}))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False,
                         cwd=BENCH)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"not importable by {python} ({last})"
    return Available(kind, python, out.stdout.strip())


def nginx_conf(tmp: Path, port: int, workers: int) -> str:
    hello = HELLO.decode().replace("\n", "\\n")
    body = JSON_BODY.decode()
    if any(c in body for c in "'\\$"):
        raise BenchError("the JSON body cannot be put into nginx.conf verbatim")
    # nginx caps one config token at 4 KiB: set the body in pieces, return their concatenation
    pieces = [body[i:i + 1024] for i in range(0, len(body), 1024)]
    sets = " ".join(f"set $json{i} '{piece}';" for i, piece in enumerate(pieces))
    joined = "".join(f"$json{i}" for i in range(len(pieces)))
    temps = "\n".join(
        f"    {name}_temp_path {tmp / (name + '_temp')};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {tmp / 'nginx.pid'};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_timeout 75s;
    keepalive_requests 1000000000;
{temps}
    server {{
        listen {HOST}:{port} backlog=2048;
        location = / {{ default_type text/plain; return 200 '{hello}'; }}
        location = /json {{
            default_type application/json;
            {sets}
            return 200 "{joined}";
        }}
        location / {{ default_type text/plain; return 404 'not found\\n'; }}
    }}
}}
"""


def server_command(av: Available, args: argparse.Namespace, tmp: Path) -> list[str]:
    """The command line (without taskset) that starts ``av`` on ``args.port``."""
    name, py, port, workers = av.kind.name, av.python or "", str(args.port), str(args.workers)
    if name == "fastpool":
        return [py, "-m", "fastpool", "serve", "apps:app", "--host", HOST, "--port", port,
                "--workers", workers]
    if name == "gunicorn":
        return [py, "-m", "gunicorn", "-k", "gthread", "--threads", str(args.gunicorn_threads),
                "--workers", workers, "--bind", f"{HOST}:{port}", "--log-level", "warning",
                "apps:app"]
    if name == "uvicorn":
        return [py, "-m", "uvicorn", "apps:asgi_app", "--host", HOST, "--port", port,
                "--workers", workers, "--http", "httptools", "--loop", "uvloop",
                "--lifespan", "off", "--no-access-log", "--log-level", "warning"]
    if name == "granian":
        return [py, "-m", "granian", "--interface", "wsgi", "--host", HOST, "--port", port,
                "--workers", workers, "--http", "1", "--no-ws", "--log-level", "warning",
                "apps:app"]
    if name == "bjoern":
        return [py, str(BENCH / "bjoern_serve.py"), HOST, port, workers]
    if name == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, args.port, args.workers))
        return [py, "-p", str(tmp), "-c", str(conf), "-e", "stderr"]
    raise AssertionError(name)


def server_env() -> dict[str, str]:
    """The environment every server gets: bench/ importable, no stray server settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTPOOL_", "GRANIAN_", "UVICORN_"))
           and k not in ("GUNICORN_CMD_ARGS", "WEB_CONCURRENCY")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL us if the harness dies without cleaning up."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class Server:
    """One running server: its own process group, output to a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=server_env(), cwd=BENCH, start_new_session=True,
                preexec_fn=_die_with_parent)

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
                (resp,) = exchange(port, [http_request("GET", "/", port)], timeout=1.0)
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


# --------------------------------------------------------------------------- HTTP checks


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(method: str, path: str, port: int, body: bytes = b"",
                 close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if method == "POST":
        lines += ["Content-Type: application/octet-stream", f"Content-Length: {len(body)}"]
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
        return Response(int(status_line[1]), headers, body)

    def at_eof(self) -> bool:
        return self.file.read(1) == b""


def exchange(port: int, writes: list[bytes], count: int | None = None,
             timeout: float = 5.0, expect_close: bool = False) -> list[Response]:
    """Send each write in turn on one connection, reading its responses after each write.

    With ``count`` all writes go out first (pipelining) and ``count`` responses are read.
    """
    out: list[Response] = []
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
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


def check_server(port: int, scenarios: list[Scenario], depth: int) -> dict[str, str]:
    """Check the server once per scenario; return {scenario: why it failed} for failures."""

    def expect(resp: Response, body: bytes, what: str) -> None:
        if resp.status != 200:
            raise BenchError(f"{what}: status {resp.status}, expected 200")
        if resp.body != body:
            raise BenchError(f"{what}: {len(resp.body)}-byte body differs from the expected "
                             f"{len(body)} bytes (starts {resp.body[:60]!r})")

    get = http_request("GET", "/", port)

    def hello() -> None:
        a, b = exchange(port, [get, get])
        expect(a, HELLO, "GET /")
        expect(b, HELLO, "second GET / on a keep-alive connection")

    def pipeline() -> None:
        for i, resp in enumerate(exchange(port, [get] * depth, count=depth)):
            expect(resp, HELLO, f"pipelined GET / #{i + 1} of {depth}")

    def json_() -> None:
        (resp,) = exchange(port, [http_request("GET", "/json", port)])
        expect(resp, JSON_BODY, "GET /json")
        json.loads(resp.body)

    def echo(size: int) -> None:
        payload = bytes(range(256)) * (size // 256) + b"a" * (size % 256)
        (resp,) = exchange(port, [http_request("POST", "/echo", port, payload)])
        expect(resp, payload, f"POST /echo ({size} bytes)")

    def close() -> None:
        (resp,) = exchange(port, [http_request("GET", "/", port, close=True)],
                           expect_close=True)
        expect(resp, HELLO, "GET / with Connection: close")

    failures: dict[str, str] = {}
    for scenario in scenarios:
        try:
            if scenario.echo:
                echo(int(scenario.script_args[0]))
            else:
                {"hello": hello, "pipeline": pipeline, "json": json_, "close": close}[
                    scenario.name]()
        except (BenchError, OSError, ValueError) as exc:
            failures[scenario.name] = f"{type(exc).__name__}: {exc}" if isinstance(
                exc, OSError) else str(exc)
    return failures


# --------------------------------------------------------------------------- wrk


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
    return WrkRun(float(rps[1]), lat.get("50", float("nan")), lat.get("99", float("nan")),
                  int(total[1]) if total else 0, int(non2xx[1]) if non2xx else 0, errors, text)


def wrk_command(args: argparse.Namespace, scenario: Scenario, duration: int) -> list[str]:
    cmd = [args.wrk, f"-t{args.wrk_threads}", f"-c{args.connections}",
           f"-d{duration}s", "--latency"]
    for header in scenario.headers:
        cmd += ["-H", header]
    if scenario.script:
        cmd += ["-s", str(WRK_SCRIPTS / scenario.script)]
    cmd.append(f"http://{HOST}:{args.port}{scenario.path}")
    if scenario.script_args:
        cmd += ["--", *scenario.script_args]
    return pin(args.wrk_cpus, args) + cmd


def run_wrk(cmd: list[str], duration: int) -> WrkRun:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {shlex.join(cmd)}") from exc
    if out.returncode != 0:
        raise BenchError(f"wrk exited {out.returncode}: {out.stderr.strip() or out.stdout}")
    return parse_wrk(out.stdout)


def pin(cpus: str, args: argparse.Namespace) -> list[str]:
    return [] if args.no_pin else ["taskset", "-c", cpus]


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    scenario: str
    server: str
    runs: list[WrkRun] = field(default_factory=list)
    error: str | None = None

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    @property
    def p50(self) -> float:
        return _median_known([r.p50_ms for r in self.runs])

    @property
    def p99(self) -> float:
        return _median_known([r.p99_ms for r in self.runs])

    def problems(self) -> str:
        non2xx = sum(r.non_2xx for r in self.runs)
        parts = [f"{non2xx} non-2xx"] if non2xx else []
        for kind in ("connect", "read", "write", "timeout"):
            n = sum(r.socket_errors[kind] for r in self.runs)
            if n:
                parts.append(f"{n} {kind}")
        return ", ".join(parts)


def _median_known(values: list[float]) -> float:
    """The median of the values that are not NaN (NaN if none is known)."""
    known = [v for v in values if v == v]
    return statistics.median(known) if known else float("nan")


def fmt_ms(ms: float) -> str:
    if ms != ms:  # NaN
        return "?"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"


def render(scenarios: list[Scenario], results: dict[tuple[str, str], Result],
           servers: list[Available], args: argparse.Namespace) -> str:
    out: list[str] = []
    for scenario in scenarios:
        rows = [results[(scenario.name, av.kind.name)] for av in servers
                if (scenario.name, av.kind.name) in results]
        if not rows:
            continue
        base = results.get((scenario.name, "fastpool"))
        base_rps = base.rps if base is not None and base.runs else None
        show_errors = any(r.problems() or r.error for r in rows)
        out.append(f"### {scenario.name}: {scenario.title}\n")
        head = ["server", "req/s", "p50", "p99", "vs fastpool"]
        if show_errors:
            head.append("non-2xx / socket errors")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * 4 + ["---"] * show_errors) + "|")
        for r in rows:
            if r.runs:
                ratio = f"{r.rps / base_rps:.2f}" if base_rps else "—"
                cells = [r.server, f"{r.rps:,.0f}", fmt_ms(r.p50), fmt_ms(r.p99), ratio]
            else:
                cells = [r.server, "failed", "—", "—", "—"]
            if show_errors:
                cells.append("; ".join(x for x in (r.problems(), r.error or "") if x) or "—")
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if scenario.name == "pipeline":
            out.append(f"\nwrk times a pipelined batch of {args.depth} as one sample, so p50/p99 "
                       "here are per batch; `?` is a percentile wrk printed as 0.\n")
        else:
            out.append("")
    notes = [f"- {av.kind.name} {av.version}" + (f": {av.kind.note}" if av.kind.note else "")
             + (f", `--threads {args.gunicorn_threads}`" if av.kind.name == "gunicorn" else "")
             for av in servers]
    pinning = ("not pinned" if args.no_pin else
               f"servers pinned to CPU {args.server_cpus}, wrk to CPU {args.wrk_cpus}")
    out.append(
        f"Median of {args.runs} run(s) of {args.duration} s each "
        + (f"(after a {args.warmup} s warm-up), " if args.warmup else "(no warm-up), ")
        + f"{args.connections} connections, "
        f"{args.wrk_threads} wrk thread(s), {args.workers} worker(s) per server, {pinning}. "
        f"{machine()}.\n")
    out.append("Notes:\n" + "\n".join(notes) + "\n")
    return "\n".join(out)


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs"
            + (f" ({model})" if model else "") + f", harness Python {platform.python_version()}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark fastpool against gunicorn, uvicorn, granian, bjoern and nginx.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", action="append", choices=SCENARIO_NAMES,
                   help="scenario to run (repeatable; default: all)")
    p.add_argument("--server", action="append", choices=SERVER_NAMES,
                   help="server to run (repeatable; default: all that are installed)")
    p.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    p.add_argument("--runs", type=int, default=3, help="measured runs per scenario (median)")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of discarded warm-up per scenario (0: none)")
    p.add_argument("--connections", type=int, default=64, help="wrk -c")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk -t")
    p.add_argument("--depth", type=int, default=16, help="requests per write when pipelining")
    p.add_argument("--workers", type=int, default=1, help="worker processes for every server")
    p.add_argument("--gunicorn-threads", type=int, default=1,
                   help="gunicorn gthread --threads")
    p.add_argument("--server-cpus", default="0", help="taskset -c list for the server")
    p.add_argument("--wrk-cpus", default="1", help="taskset -c list for wrk")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--port", type=int, default=18080, help="port every server listens on")
    p.add_argument("--fastpool-python", default=sys.executable,
                   help="interpreter that runs fastpool")
    p.add_argument("--peer-python", default=sys.executable,
                   help="interpreter that runs gunicorn, uvicorn, granian and bjoern")
    p.add_argument("--python", action="append", default=[], metavar="SERVER=PATH",
                   help="interpreter for one server, overriding the two above (repeatable)")
    p.add_argument("--nginx", default="nginx", help="nginx binary (also tried: /usr/sbin/nginx)")
    p.add_argument("--wrk", default="wrk", help="wrk binary")
    p.add_argument("--start-timeout", type=float, default=30.0,
                   help="seconds a server gets to answer its first request")
    p.add_argument("--stop-grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping a server")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the raw results here")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep server logs and nginx.conf here (default: a temporary directory)")
    args = p.parse_args(argv)
    if min(args.runs, args.duration, args.connections, args.depth, args.workers) < 1:
        p.error("--runs, --duration, --connections, --depth and --workers must be positive")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    for item in args.python:
        name, sep, _ = item.partition("=")
        if not sep or name not in SERVER_NAMES:
            p.error(f"--python wants SERVER=PATH with SERVER one of {SERVER_NAMES}: {item!r}")
    return args


def interpreter(name: str, args: argparse.Namespace) -> str | None:
    overrides = dict(item.split("=", 1) for item in args.python)
    if name in overrides:
        return overrides[name]
    if name == "nginx":
        return None
    return args.fastpool_python if name == "fastpool" else args.peer_python


def bench_server(av: Available, scenarios: list[Scenario], args: argparse.Namespace,
                 tmp: Path, results: dict[tuple[str, str], Result],
                 commands: dict[str, str]) -> None:
    name = av.kind.name
    mine = [s for s in scenarios if av.kind.echo or not s.echo]
    for s in scenarios:
        if s not in mine:
            print(f"  {name}: skipping {s.name} (no echo endpoint)")
    if not mine:
        return
    if port_in_use(args.port):
        raise BenchError(f"port {args.port} is already in use; pass --port")
    cmd = pin(args.server_cpus, args) + server_command(av, args, tmp)
    commands[name] = f"PYTHONPATH={BENCH} " * (av.kind.module is not None) + shlex.join(cmd)
    server = Server(name, cmd, tmp / f"{name}.log")

    def fail_all(reason: str) -> None:
        for s in mine:
            result = results.setdefault((s.name, name), Result(s.name, name))
            result.error = result.error or reason

    with running(server, args.stop_grace):
        try:
            server.wait_ready(args.port, args.start_timeout)
        except BenchError as exc:
            print(f"  {name}: NOT MEASURED: {exc}", file=sys.stderr)
            fail_all(f"not measured: {str(exc).splitlines()[0].rstrip(':')}")
            return
        failures = check_server(args.port, mine, args.depth)
        for scenario_name, why in failures.items():
            print(f"  {name}: {scenario_name} NOT MEASURED, check failed: {why}",
                  file=sys.stderr)
            results.setdefault((scenario_name, name), Result(scenario_name, name)).error = (
                f"check failed: {why}")
        print(f"  {name}: ready; checks passed for "
              f"{', '.join(s.name for s in mine if s.name not in failures) or 'nothing'}")
        for s in mine:
            if s.name in failures:
                continue
            result = results.setdefault((s.name, name), Result(s.name, name))
            try:
                if args.warmup > 0:
                    run_wrk(wrk_command(args, s, args.warmup), args.warmup)
                for i in range(args.runs):
                    run = run_wrk(wrk_command(args, s, args.duration), args.duration)
                    result.runs.append(run)
                    bad = run.non_2xx or any(run.socket_errors.values())
                    print(f"  {name} {s.name} run {i + 1}: {run.rps:,.0f} req/s, "
                          f"p50 {fmt_ms(run.p50_ms)}, p99 {fmt_ms(run.p99_ms)}"
                          + (f" [{Result(s.name, name, [run]).problems()}]" if bad else ""))
            except BenchError as exc:
                result.error = "wrk failed: " + (str(exc).splitlines() or ["?"])[0]
                print(f"  {name} {s.name}: {exc}", file=sys.stderr)
            if not server.alive():
                print(f"  {name} exited during {s.name}:\n{server.log_tail()}", file=sys.stderr)
                fail_all(f"server exited during {s.name}")
                return
            try:  # still answering after the load?
                (resp,) = exchange(args.port, [http_request("GET", "/", args.port)],
                                   timeout=5.0)
                if resp.status != 200 or resp.body != HELLO:
                    raise BenchError(f"status {resp.status}, {len(resp.body)}-byte body")
            except (BenchError, OSError) as exc:
                result.error = f"GET / failed after this scenario: {exc or type(exc).__name__}"
                print(f"  {name}: {result.error}", file=sys.stderr)


def _no_nan(value: Any) -> Any:
    """``value`` with NaN floats (unknown percentiles) as None, so the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    scenarios = [s for s in make_scenarios(args.depth)
                 if not args.scenario or s.name in args.scenario]
    for tool in ([args.wrk] + ([] if args.no_pin else ["taskset"])):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found", file=sys.stderr)
            return 2
    if not args.no_pin and (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; server and wrk will share a core", file=sys.stderr)

    servers: list[Available] = []
    for kind in SERVER_KINDS:
        if args.server and kind.name not in args.server:
            continue
        nginx = args.nginx
        if shutil.which(nginx) is None and nginx == "nginx":
            nginx = "/usr/sbin/nginx"
        found = probe(kind, interpreter(kind.name, args), nginx)
        if isinstance(found, str):
            if kind.name == "fastpool":
                print(f"error: fastpool: {found}; pass --fastpool-python", file=sys.stderr)
                return 2
            print(f"skipping {kind.name}: {found}")
            continue
        servers.append(found)

    results: dict[tuple[str, str], Result] = {}
    commands: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastpool-bench-")))
        else:
            tmp = args.workdir.resolve()
            tmp.mkdir(parents=True, exist_ok=True)
        for av in servers:
            print(f"{av.kind.name} {av.version}")
            try:
                bench_server(av, scenarios, args, tmp, results, commands)
            except BenchError as exc:
                print(f"  {av.kind.name}: {exc}", file=sys.stderr)
        nginx_text = (tmp / "nginx.conf").read_text() if (tmp / "nginx.conf").exists() else None

    print()
    print(render(scenarios, results, servers, args))
    print("Commands (servers run with bench/ as working directory; then wrk per scenario):\n")
    print("```")
    for name, cmd in commands.items():
        print(f"# {name}\n{cmd}")
    for s in scenarios:
        print(f"# wrk: {s.name}\n{shlex.join(wrk_command(args, s, args.duration))}")
    print("```")
    if args.json:
        payload: dict[str, Any] = {
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items()},
            "machine": machine(),
            "servers": {av.kind.name: {"version": av.version, "note": av.kind.note,
                                       "command": commands.get(av.kind.name)}
                        for av in servers},
            "nginx_conf": nginx_text,
            "wrk_commands": {s.name: shlex.join(wrk_command(args, s, args.duration))
                             for s in scenarios},
            "results": [
                {"scenario": r.scenario, "server": r.server, "error": r.error,
                 "median": ({"rps": r.rps, "p50_ms": r.p50, "p99_ms": r.p99}
                            if r.runs else None),
                 "runs": [asdict(run) for run in r.runs]}
                for r in results.values()],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_no_nan(payload), indent=2) + "\n")
        print(f"\nraw results: {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; all servers stopped", file=sys.stderr)
        sys.exit(130)


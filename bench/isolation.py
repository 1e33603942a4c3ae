"""Isolation benchmark: does a flood of slow requests hurt the fast path?

The scenario: a slow path (``/slow/sleep`` or ``/slow/cpu``, a handler that blocks
``--slow-ms`` ms, 200 by default) is flooded by ``--slow-connections`` (32) wrk connections
while a second wrk measures the fast path (``GET /``, ``--fast-connections`` = 4) at the
same time. The fast path is also measured alone, on the same servers, as the baseline.

Layouts, every one with the same total worker count (``--workers``, default 4):

* ``fastpool-shared``: one pool serving both paths on one port.
* ``fastpool-groups``: two worker groups on two ports (half the workers each).
* ``fastpool-groups-nice``: the same with the slow group at ``nice = --nice`` (10).
* ``gunicorn-shared``: one gunicorn (gthread) serving both paths.
* ``gunicorn-split``: two gunicorn instances on two ports (half the workers each).
* ``gunicorn-split-nice``: the same with the slow instance started under ``nice -n``.

The ``-nice`` layouts run the ``cpu`` kind only unless named with ``--layout``: with
``sleep`` the slow workers use no CPU, so niceness changes nothing.

``--one-port``: the same scenario through ONE port, the slow path under ``/tast``
(``/tast/sleep``, ``/tast/cpu``), the fast path ``GET /``:

* ``fastpool-routes``: a ``web`` group (half the workers) with the listener and a ``task``
  group (the other half) with ``routes = ["/tast"]`` and no listener: a web worker that
  reads a ``/tast`` request hands the connection over to a task worker.
* ``fastpool-routes-shed``: the same with ``max_pending = --max-pending`` and
  ``retry_after = --retry-after`` on the task group (503 at once when it is saturated).
* ``fastpool-shared``, ``gunicorn-shared``: one pool serving both, as in the two-port mode.
* ``nginx-gunicorn``: nginx (``--nginx-workers`` = 1 worker process) in front of two
  gunicorn instances (half the workers each, on PORT+1 and PORT+2), ``location /tast/``
  proxied to the second, with keep-alive upstream connections.

The flood then counts its responses by status (``wrk/statuses.lua``): the table adds the
slow path's 2xx req/s and its 503 share.

Rules this harness keeps (the plumbing is ``common.py``, shared with ``run.py``):

* Every server serves ``isolation_app:app`` (bench/isolation_app.py) and is checked once
  (exact fast-path body; each slow kind answers) before anything is measured.
* Servers are waited for with a deadline, run in their own process groups and are
  stopped with SIGTERM then SIGKILL in ``finally`` blocks; the background flood wrk dies
  with the harness. Nothing is pinned unless ``--server-cpus`` / ``--wrk-cpus`` ask.
* Before every flood the servers must be idle again: the slow requests queued by the
  previous flood are drained (fresh-connection probes must answer quickly, with a
  deadline), so one measurement does not leak into the next.
* wrk runs with ``--timeout`` ``--wrk-timeout`` (30 s) so that slow responses still land
  in the latency histogram instead of being dropped as timeouts.
* The fast path measured alone is costed like run.py's scenarios: the CPU time (user +
  system) of every process of the layout (each server's whole process tree, from /proc)
  per fast request, and wrk's CPU use (above 85 % of its core the run is flagged
  client-bound: its req/s is a floor). Under the flood no CPU per request is given: two
  wrks overlap, and the servers' CPU goes mostly to the slow path (all of it with
  ``cpu``), so it would say nothing about the fast path.
* Standard library only; the exact server and wrk command lines (and fastpool's
  config files) are printed under the table, and ``--json PATH`` saves the raw wrk output.

Usage (see bench/README.md)::

    python bench/isolation.py --peer-python /path/to/peers-venv/bin/python
    python bench/isolation.py --one-port --peer-python /path/to/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    CLIENT_BOUND,
    HOST,
    BenchError,
    Cost,
    Result,
    Server,
    WrkRun,
    client_bound_line,
    costed_wrk,
    counts_delta,
    die_with_parent,
    exchange,
    find_nginx,
    fmt_ms,
    harness_start,
    http_request,
    interpreter_path,
    machine,
    median_known,
    nginx_head,
    nginx_version,
    parse_wrk,
    port_in_use,
    python_version,
    require_warmup,
    routing_counts,
    run_main,
    run_wrk,
    running,
    settings,
    toml_list,
    work_dir,
    write_json,
)

APP = "isolation_app:app"
HELLO = b"Hello, World!\n"  # what isolation_app answers on GET / (and GET /tast/hello)
KINDS = ("sleep", "cpu")
TWO_PORT_PREFIX = "/slow"  # the slow path of the two-port mode
ONE_PORT_PREFIX = "/tast"  # the slow path of --one-port: the prefix that is routed
STATUSES_LUA = BENCH / "wrk" / "statuses.lua"


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    name: str
    server: str  # "fastpool", "gunicorn" or "nginx" (in front of two gunicorns)
    split: bool  # fast and slow paths on separate pools
    nice: bool = False  # the slow pool runs at --nice
    title: str = ""
    mode: str = "two"  # "two": two-port mode only; "one": --one-port only; "both"
    shed: bool = False  # fastpool-routes with max_pending / retry_after


LAYOUTS = [
    Layout("fastpool-shared", "fastpool", False, title="fastpool, one pool", mode="both"),
    Layout("fastpool-groups", "fastpool", True, title="fastpool, two groups"),
    Layout("fastpool-groups-nice", "fastpool", True, True,
           title="fastpool, two groups, slow nice"),
    Layout("fastpool-routes", "fastpool", True, title="fastpool, web + routed task group",
           mode="one"),
    Layout("fastpool-routes-shed", "fastpool", True,
           title="fastpool, web + routed task group, max_pending", mode="one", shed=True),
    Layout("gunicorn-shared", "gunicorn", False, title="gunicorn, one pool", mode="both"),
    Layout("gunicorn-split", "gunicorn", True, title="gunicorn, two instances"),
    Layout("gunicorn-split-nice", "gunicorn", True, True,
           title="gunicorn, two instances, slow nice"),
    Layout("nginx-gunicorn", "nginx", True, title="nginx in front of two gunicorn instances",
           mode="one"),
]
LAYOUT_NAMES = [layout.name for layout in LAYOUTS]
LAYOUT_BY_NAME = {layout.name: layout for layout in LAYOUTS}


def in_mode(layout: Layout, one_port: bool) -> bool:
    return layout.mode == "both" or layout.mode == ("one" if one_port else "two")


@dataclass
class Plan:
    """What one layout runs: its servers' command lines and its ports."""

    layout: Layout
    servers: list[tuple[str, list[str], list[int]]]  # (name, command line, its ports)
    fast_port: int
    slow_port: int
    slow_prefix: str  # the slow path is SLOW_PREFIX/KIND?ms=N
    configs: dict[str, str] = field(default_factory=dict)  # file name -> contents
    control: Path | None = None  # fastpool's control socket, for the routing counts
    backend_ports: list[int] = field(default_factory=list)  # behind a proxy

    @property
    def ports(self) -> list[int]:
        """The ports the clients use."""
        return sorted({self.fast_port, self.slow_port})

    @property
    def probes(self) -> list[tuple[int, str]]:
        """(port, path) of the GETs that answer at once only when every pool is idle."""
        if self.fast_port == self.slow_port and self.layout.split:
            return [(self.fast_port, "/"), (self.slow_port, f"{self.slow_prefix}/hello")]
        return [(port, "/") for port in self.ports]


def split_workers(args: argparse.Namespace) -> tuple[int, int]:
    fast = args.workers // 2
    return fast, args.workers - fast


def fastpool_groups_config(args: argparse.Namespace, layout: Layout, tmp: Path) -> str:
    fast_workers, slow_workers = split_workers(args)
    sock = tmp / f"{layout.name}.sock"
    lines = [
        "[server]",
        f"control_socket = {json.dumps(str(sock))}",
        "",
        "[group.fast]",
        f"app = {json.dumps(APP)}",
        f"listen = {toml_list([f'{HOST}:{args.port}'])}",
        f"workers = {fast_workers}",
        f"threads = {args.threads}",
        "",
        "[group.slow]",
        f"app = {json.dumps(APP)}",
        f"listen = {toml_list([f'{HOST}:{args.port + 1}'])}",
        f"workers = {slow_workers}",
        f"threads = {args.slow_threads}",
    ]
    if layout.nice:
        lines.append(f"nice = {args.nice}")
    return "\n".join(lines) + "\n"


def fastpool_routes_config(args: argparse.Namespace, layout: Layout, tmp: Path) -> str:
    web_workers, task_workers = split_workers(args)
    sock = tmp / f"{layout.name}.sock"
    lines = [
        "[server]",
        f"control_socket = {json.dumps(str(sock))}",
        "",
        "[group.web]",
        f"app = {json.dumps(APP)}",
        f"listen = {toml_list([f'{HOST}:{args.port}'])}",
        f"workers = {web_workers}",
        f"threads = {args.threads}",
        "",
        "[group.task]",
        f"app = {json.dumps(APP)}",
        f"routes = {toml_list([ONE_PORT_PREFIX])}",
        f"workers = {task_workers}",
        f"threads = {args.slow_threads}",
    ]
    if layout.shed:
        lines += [f"max_pending = {args.max_pending}", f"retry_after = {args.retry_after}"]
    return "\n".join(lines) + "\n"


def nginx_conf(args: argparse.Namespace, tmp: Path, web_port: int, task_port: int) -> str:
    """nginx on --port: ``/tast/`` to the task gunicorn, the rest to the web one, over
    keep-alive upstream connections (HTTP/1.1, no Connection header passed on)."""
    keepalive = args.slow_connections + args.fast_connections
    proxy = ("proxy_http_version 1.1; proxy_set_header Connection \"\"; "
             "proxy_set_header Host $host;")
    return f"""{nginx_head(tmp, args.nginx_workers, temp_prefix="nginx-")}
    upstream web {{ server {HOST}:{web_port}; keepalive {keepalive}; }}
    upstream task {{ server {HOST}:{task_port}; keepalive {keepalive}; }}
    server {{
        listen {HOST}:{args.port} backlog=2048;
        location {ONE_PORT_PREFIX}/ {{ proxy_pass http://task; {proxy} }}
        location / {{ proxy_pass http://web; {proxy} }}
    }}
}}
"""


def gunicorn_command(py: str, workers: int, threads: int, port: int) -> list[str]:
    return [py, "-m", "gunicorn", "-k", "gthread", "--threads", str(threads),
            "--workers", str(workers), "--bind", f"{HOST}:{port}", "--log-level", "warning",
            APP]


def plan(layout: Layout, args: argparse.Namespace, tmp: Path) -> Plan:
    server_pin = pin(args.server_cpus)
    port, fast_workers, slow_workers = args.port, *split_workers(args)
    prefix = ONE_PORT_PREFIX if args.one_port else TWO_PORT_PREFIX
    if layout.server == "fastpool":
        py = args.fastpool_python
        sock = tmp / f"{layout.name}.sock"
        if not layout.split:
            cmd = [py, "-m", "fastpool", "serve", APP, "--bind", f"{HOST}:{port}",
                   "--workers", str(args.workers), "--threads", str(args.threads),
                   "--control-socket", str(sock)]
            return Plan(layout, [(layout.name, server_pin + cmd, [port])], port, port, prefix)
        name = f"{layout.name}.toml"
        if layout.mode == "one":
            config = fastpool_routes_config(args, layout, tmp)
            ports = [port]
        else:
            config = fastpool_groups_config(args, layout, tmp)
            ports = [port, port + 1]
        (tmp / name).write_text(config)
        cmd = [py, "-m", "fastpool", "serve", "--config", str(tmp / name)]
        return Plan(layout, [(layout.name, server_pin + cmd, ports)], port, ports[-1], prefix,
                    {name: config}, control=sock if layout.mode == "one" else None)
    py = args.peer_python
    if layout.server == "nginx":
        web_port, task_port = port + 1, port + 2
        conf = nginx_conf(args, tmp, web_port, task_port)
        (tmp / "nginx.conf").write_text(conf)
        web = gunicorn_command(py, fast_workers, args.threads, web_port)
        task = gunicorn_command(py, slow_workers, args.slow_threads, task_port)
        proxy = [args.nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", "stderr"]
        return Plan(layout, [(f"{layout.name}/web", server_pin + web, [web_port]),
                             (f"{layout.name}/task", server_pin + task, [task_port]),
                             (f"{layout.name}/nginx", server_pin + proxy, [port])],
                    port, port, prefix, {"nginx.conf": conf},
                    backend_ports=[web_port, task_port])
    if not layout.split:
        cmd = gunicorn_command(py, args.workers, args.threads, port)
        return Plan(layout, [(layout.name, server_pin + cmd, [port])], port, port, prefix)
    fast = gunicorn_command(py, fast_workers, args.threads, port)
    slow = gunicorn_command(py, slow_workers, args.slow_threads, port + 1)
    if layout.nice:
        slow = ["nice", "-n", str(args.nice), *slow]
    return Plan(layout, [(f"{layout.name}/fast", server_pin + fast, [port]),
                         (f"{layout.name}/slow", server_pin + slow, [port + 1])],
                port, port + 1, prefix)


def pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


# --------------------------------------------------------------------------- wrk


def fast_wrk(args: argparse.Namespace, port: int, duration: int) -> list[str]:
    return pin(args.wrk_cpus) + [
        args.wrk, "-t1", f"-c{args.fast_connections}", f"-d{duration}s", "--latency",
        f"--timeout={args.wrk_timeout}s", f"http://{HOST}:{port}/"]


def flood_duration(args: argparse.Namespace) -> int:
    return args.ramp + args.duration + 1  # covers the whole fast-path measurement


def flood_wrk(args: argparse.Namespace, port: int, kind: str, prefix: str) -> list[str]:
    threads = min(args.flood_threads, args.slow_connections)
    extra = ["-s", str(STATUSES_LUA)] if args.one_port else []
    if args.flood_close:
        extra += ["-H", "Connection: close"]
    return pin(args.wrk_cpus) + [
        args.wrk, f"-t{threads}", f"-c{args.slow_connections}", f"-d{flood_duration(args)}s",
        "--latency", f"--timeout={args.wrk_timeout}s", *extra,
        f"http://{HOST}:{port}{prefix}/{kind}?ms={args.slow_ms}"]


class Flood:
    """wrk flooding the slow path in the background; killed however the block ends."""

    def __init__(self, cmd: list[str], duration: int) -> None:
        self.cmd = cmd
        self.duration = duration
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Flood:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=die_with_parent)
        return self

    def check_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            _, err = self.proc.communicate()
            raise BenchError(f"flood wrk exited early ({self.proc.returncode}): {err.strip()}")

    def result(self) -> WrkRun:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=self.duration + 60)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"flood wrk did not finish: {shlex.join(self.cmd)}") from exc
        if self.proc.returncode != 0:
            raise BenchError(f"flood wrk exited {self.proc.returncode}: {err.strip() or out}")
        return parse_wrk(out)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.communicate(timeout=5)


# --------------------------------------------------------------------------- checks


def check(p: Plan, kinds: list[str], slow_ms: int) -> None:
    """The fast path answers exactly; every slow kind answers on the slow port; with routes,
    the task group really served the slow path."""
    before = routing_counts(p.control) if p.control else {}
    hellos = [(p.fast_port, "/")]
    if p.slow_prefix == ONE_PORT_PREFIX:
        hellos.append((p.slow_port, f"{ONE_PORT_PREFIX}/hello"))
    for port, path in hellos:
        (resp,) = exchange(port, [http_request("GET", path, port)])
        if resp.status != 200 or resp.body != HELLO:
            raise BenchError(f"GET {path} on port {port}: status {resp.status}, "
                             f"body {resp.body[:60]!r}")
    for kind in kinds:
        path = f"{p.slow_prefix}/{kind}?ms={slow_ms}"
        started = time.monotonic()
        (resp,) = exchange(p.slow_port, [http_request("GET", path, p.slow_port)], timeout=10)
        took = time.monotonic() - started
        if resp.status != 200 or resp.body != f"{kind} {slow_ms} ms\n".encode():
            raise BenchError(f"GET {path} on port {p.slow_port}: status {resp.status}, "
                             f"body {resp.body[:60]!r}")
        if took < slow_ms / 1000 * 0.9:
            raise BenchError(f"GET {path} answered in {took * 1000:.0f} ms: it did not block")
    if p.control:
        moved = counts_delta(before, routing_counts(p.control)).get("task", {})
        if moved.get("handed_in", 0) < 1 + len(kinds):
            raise BenchError(f"the task group took {moved.get('handed_in', 0)} handoffs for "
                             f"{1 + len(kinds)} {p.slow_prefix} requests: not routed")


def settle(probes: list[tuple[int, str]], limit_s: float, deadline_s: float,
           in_a_row: int = 20) -> float:
    """Wait until the servers are idle; return the seconds it took.

    A worker still busy with queued slow requests leaves a new connection waiting, so
    ``in_a_row`` fresh-connection GETs per (port, path) probe must each answer within
    ``limit_s`` (fresh connections land on every worker: SO_REUSEPORT hashing or a shared
    queue; a routed path reaches whichever worker of its group is free).
    """
    started = time.monotonic()
    deadline = started + deadline_s
    for port, path in probes:
        good = 0
        while good < in_a_row:
            if time.monotonic() > deadline:
                raise BenchError(f"GET {path} on port {port} still slow {deadline_s:.0f}s "
                                 "after the flood")
            t0 = time.monotonic()
            try:
                (resp,) = exchange(port, [http_request("GET", path, port)],
                                   timeout=max(limit_s, deadline - t0))
                ok = resp.status == 200 and time.monotonic() - t0 <= limit_s
            except (OSError, BenchError):
                ok = False
                time.sleep(0.05)
            good = good + 1 if ok else 0
    return time.monotonic() - started


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    layout: str
    kind: str
    fast: list[WrkRun] = field(default_factory=list)  # under the flood
    slow: list[WrkRun] = field(default_factory=list)  # the flood itself
    # fastpool routes: per run, each group's handed_in/handed_out/shed during the run
    routing: list[dict[str, dict[str, int]]] = field(default_factory=list)
    error: str | None = None


@dataclass
class LayoutResult:
    layout: Layout
    version: str = ""
    alone: list[WrkRun] = field(default_factory=list)
    alone_costs: list[Cost] = field(default_factory=list)  # one per run of ``alone``
    rows: dict[str, Row] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    configs: dict[str, str] = field(default_factory=dict)
    wrk: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def alone_result(self) -> Result:
        """The fast path alone as a ``Result``, for its costs."""
        return Result("fast alone", self.layout.name, self.alone, costs=self.alone_costs)


def med(runs: list[WrkRun], attr: str) -> float:
    """The median of a percentile over ``runs``; a run that completed no request counts as
    infinitely slow (its requests all took longer than the run), not as unknown."""
    return median_known([float("inf") if r.requests == 0 else getattr(r, attr)
                         for r in runs]) if runs else float("nan")


def fmt_lat(ms: float, duration: int) -> str:
    if ms != ms:  # NaN: not measured
        return "—"
    return f"> {duration} s" if ms == float("inf") else fmt_ms(ms)


def problems(runs: list[WrkRun]) -> str:
    """wrk's non-2xx responses and socket errors over ``runs``. Runs with status counts
    (wrk/statuses.lua) name each status instead, except 503s (their own column), and say
    when a 503 came without Retry-After."""
    parts = []
    if any(r.statuses for r in runs):
        codes: dict[int, int] = {}
        for r in runs:
            for code, n in r.statuses.items():
                codes[code] = codes.get(code, 0) + n
        parts += [f"{n:,}× {code}" for code, n in sorted(codes.items())
                  if not 200 <= code < 400 and code != 503]
        bare = codes.get(503, 0) - sum(r.retry_after for r in runs)
        if bare:
            parts.append(f"{bare:,}× 503 without Retry-After")
    elif non2xx := sum(r.non_2xx for r in runs):
        parts.append(f"{non2xx} non-2xx")
    for kind in ("connect", "read", "write", "timeout"):
        n = sum(r.socket_errors[kind] for r in runs)
        if n:
            parts.append(f"{n} {kind}")
    return ", ".join(parts)


def fmt_rps(runs: list[WrkRun], ok_only: bool = False) -> str:
    """The median req/s of ``runs``; ``ok_only``: of the 2xx responses only."""
    if not runs:
        return "—"
    rps = statistics.median(r.rps * ok_share(r) if ok_only else r.rps for r in runs)
    return f"{rps:,.0f}" if rps >= 100 else f"{rps:.1f}"


def ok_share(run: WrkRun) -> float:
    """The share of ``run``'s responses that were 2xx."""
    if run.statuses:
        total = sum(run.statuses.values())
        return sum(n for code, n in run.statuses.items() if 200 <= code < 300) / (total or 1)
    return 1 - run.non_2xx / run.requests if run.requests else 0.0


def fmt_shed(runs: list[WrkRun]) -> str:
    """The median share of 503s among ``runs``' responses."""
    shares = [r.statuses.get(503, 0) / (sum(r.statuses.values()) or 1) for r in runs
              if r.statuses]
    if not shares:
        return "—"
    share = statistics.median(shares)
    return "0" if share == 0 else f"{share:.1%}" if share >= 0.001 else "< 0.1%"


def render(results: list[LayoutResult], args: argparse.Namespace) -> str:
    head = ["layout", "slow kind", "fast p50 alone", "fast p99 alone", "fast p50 flood",
            "fast p99 flood", "p99 flood/alone", "fast req/s alone", "fast CPU/req alone",
            "wrk CPU alone", "fast req/s flood", "slow req/s"]
    if args.one_port:
        head += ["slow 2xx req/s", "slow p99", "slow 503 share"]
    head.append("errors")
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
    for res in results:
        for kind, row in res.rows.items():
            a50, a99 = med(res.alone, "p50_ms"), med(res.alone, "p99_ms")
            f50, f99 = med(row.fast, "p50_ms"), med(row.fast, "p99_ms")
            if not (a99 == a99 and f99 == f99 and a99 > 0):
                ratio = "—"
            elif f99 == float("inf"):
                ratio = f"> {args.duration * 1000 / a99:,.0f}×"
            else:
                ratio = f"{f99 / a99:,.1f}×"
            errors = [f"{what}: {p}" for what, runs in
                      (("fast alone", res.alone), ("fast", row.fast), ("slow", row.slow))
                      if (p := problems(runs))]
            if row.error or res.error:
                errors.append(row.error or res.error or "")
            d = args.duration
            cells = [res.layout.name, kind, fmt_lat(a50, d), fmt_lat(a99, d), fmt_lat(f50, d),
                     fmt_lat(f99, d), ratio, fmt_rps(res.alone),
                     *([res.alone_result.cpu_cell(), res.alone_result.wrk_cell()]
                       if res.alone else ["—", "—"]),
                     fmt_rps(row.fast), fmt_rps(row.slow)]
            if args.one_port:
                cells += [fmt_rps(row.slow, ok_only=True),
                          fmt_lat(med(row.slow, "p99_ms"), flood_duration(args)),
                          fmt_shed(row.slow)]
            cells.append("; ".join(errors) or "—")
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    fast_w, slow_w = split_workers(args)
    versions = sorted({f"{r.layout.server} {r.version}" for r in results if r.version})
    out.append("")
    if args.one_port:
        shape = (
            f"One port. Fast path: `GET /`, {args.fast_connections} connections. Slow path: "
            f"`{ONE_PORT_PREFIX}/KIND?ms={args.slow_ms}`, {args.slow_connections} "
            + ("new connections (`Connection: close`) " if args.flood_close else
               "keep-alive connections ")
            + f"(`sleep`: time.sleep; `cpu`: a busy loop until the thread used "
            f"{args.slow_ms} ms of CPU). {args.workers} workers per layout: one pool of "
            f"{args.workers}, or {fast_w} for `/` + {slow_w} for `{ONE_PORT_PREFIX}` "
            f"(fastpool: a `web` group with the listener and a `task` group with `routes`; "
            f"`-shed`: max_pending {args.max_pending}, retry_after {args.retry_after}; "
            f"nginx: {args.nginx_workers} worker process(es), keep-alive upstreams); app "
            f"threads {args.threads} (slow pool {args.slow_threads}); gunicorn is gthread. "
            "`slow p99`: of every flood response, 503s included; `slow 503 share`: the "
            "flood's responses that were 503 (wrk retries at once, Retry-After or not). ")
    else:
        shape = (
            f"Fast path: `GET /`, {args.fast_connections} connections. Slow path: "
            f"`{TWO_PORT_PREFIX}/KIND?ms={args.slow_ms}`, {args.slow_connections} connections "
            f"(`sleep`: time.sleep; `cpu`: a busy loop until the thread used {args.slow_ms} "
            f"ms of CPU). {args.workers} workers per layout: one pool of {args.workers}, or "
            f"{fast_w} fast + {slow_w} slow on two ports; app threads {args.threads} "
            f"(slow pool {args.slow_threads}); `nice` rows: slow pool at nice {args.nice}. ")
    out.append(
        shape +
        f"Median of {args.runs} run(s) of {args.duration} s; the fast path under flood is "
        f"measured from {args.ramp} s after the flood starts; slow req/s over the flood's "
        f"{flood_duration(args)} s. wrk --timeout {args.wrk_timeout}s; wrk counts only the "
        f"requests that complete within a run, so `> {args.duration} s` means none did. "
        + ("Not pinned. " if not (args.server_cpus or args.wrk_cpus) else
           f"Pinned: servers {args.server_cpus or 'any'}, wrk {args.wrk_cpus or 'any'}. ")
        + "Fast CPU/req alone: the servers' CPU time (user + system of every process of "
        "the layout, from /proc) per fast-path request with no flood; wrk CPU alone: that "
        f"wrk's CPU time ÷ wall time (above {CLIENT_BOUND:.0%}: client-bound, its req/s is a "
        f"floor). {client_bound_line(r.alone_result for r in results)} "
        f"{', '.join(versions)}. {machine()}.")
    return "\n".join(out)


def render_commands(results: list[LayoutResult]) -> str:
    out = ["Commands (servers run with bench/ as working directory):", "", "```"]
    for res in results:
        out.append(f"# {res.layout.name}")
        out.extend(res.commands)
        for what, cmd in res.wrk.items():
            out.append(f"#   wrk, {what}: {cmd}")
    out.append("```")
    for res in results:
        for name, text in res.configs.items():
            lang = "nginx" if name.endswith(".conf") else "toml"
            out += ["", f"{name}:", "", f"```{lang}", text.rstrip(), "```"]
    return "\n".join(out)


# --------------------------------------------------------------------------- running


def describe(run: WrkRun) -> str:
    extra = problems([run])
    if run.requests == 0:
        return "no request completed" + (f" [{extra}]" if extra else "")
    return (f"{run.rps:,.0f} req/s, p50 {fmt_ms(run.p50_ms)}, p99 {fmt_ms(run.p99_ms)}"
            + (f" [{extra}]" if extra else ""))


def describe_routing(delta: dict[str, dict[str, int]]) -> str:
    task = delta.get("task", {})
    shed = sum(counts.get("shed", 0) for counts in delta.values())
    return f"; task group took {task.get('handed_in', 0):,} handoffs, {shed:,} shed (503)"


def layout_kinds(layout: Layout, args: argparse.Namespace) -> list[str]:
    if layout.nice and not (args.layout and layout.name in args.layout):
        return [k for k in args.kinds if k == "cpu"]
    return list(args.kinds)


def bench_layout(layout: Layout, args: argparse.Namespace, tmp: Path,
                 res: LayoutResult) -> None:
    kinds = layout_kinds(layout, args)
    p = plan(layout, args, tmp)
    res.configs = p.configs
    res.commands = [f"PYTHONPATH={BENCH} {shlex.join(cmd)}" for _, cmd, _ in p.servers]
    res.wrk["fast"] = shlex.join(fast_wrk(args, p.fast_port, args.duration))
    for kind in kinds:
        res.wrk[f"flood {kind}"] = shlex.join(flood_wrk(args, p.slow_port, kind,
                                                        p.slow_prefix))
        res.rows[kind] = Row(layout.name, kind)
    for port in p.ports + p.backend_ports:
        if port_in_use(port):
            raise BenchError(f"port {port} is already in use; pass --port")
    servers = [(Server(name, cmd, tmp / f"{name.replace('/', '-')}.log"), ports)
               for name, cmd, ports in p.servers]
    with contextlib.ExitStack() as stack:
        for server, _ in servers:
            stack.enter_context(running(server, args.stop_grace))
        for server, ports in servers:
            for port in ports:
                server.wait_ready(port, args.start_timeout)
        check(p, kinds, args.slow_ms)
        print(f"  {layout.name}: ready, checks passed")

        def alive() -> None:
            for server, _ in servers:
                if not server.alive():
                    raise BenchError(f"{server.name} exited:\n{server.log_tail()}")

        if args.warmup:
            run_wrk(fast_wrk(args, p.fast_port, args.warmup), args.warmup)
        pids = [server.proc.pid for server, _ in servers if server.proc is not None]
        alone = res.alone_result
        for i in range(args.runs):
            run, extra = costed_wrk(pids, alone,
                                    fast_wrk(args, p.fast_port, args.duration), args.duration)
            res.alone.append(run)
            print(f"  {layout.name} fast alone, run {i + 1}: {describe(run)}{extra}")
        alive()
        for kind in kinds:
            row = res.rows[kind]
            try:
                for i in range(args.runs):
                    took = settle(p.probes, args.settle_limit_ms / 1000, args.settle_timeout)
                    if took > 1:
                        print(f"  {layout.name}: waited {took:.1f}s for the servers to drain")
                    before = routing_counts(p.control) if p.control else {}
                    with Flood(flood_wrk(args, p.slow_port, kind, p.slow_prefix),
                               flood_duration(args)) as fl:
                        time.sleep(args.ramp)
                        fl.check_running()
                        fast = run_wrk(fast_wrk(args, p.fast_port, args.duration),
                                       args.duration)
                        slow = fl.result()
                    moved = counts_delta(before, routing_counts(p.control)) if p.control else {}
                    row.fast.append(fast)
                    row.slow.append(slow)
                    row.routing.append(moved)
                    print(f"  {layout.name} {kind} flood, run {i + 1}: fast {describe(fast)}; "
                          f"slow {describe(slow)}"
                          + (f" ({fmt_shed([slow])} 503)" if slow.statuses else "")
                          + (describe_routing(moved) if p.control else ""))
                    alive()
            except BenchError as exc:
                row.error = str(exc).splitlines()[0]
                print(f"  {layout.name} {kind}: {exc}", file=sys.stderr)
                alive()
        settle(p.probes, args.settle_limit_ms / 1000, args.settle_timeout)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fast-path latency while the slow path is flooded: fastpool (one pool, "
                    "worker groups) and gunicorn (one pool, two instances); with --one-port, "
                    "through one port: fastpool routes, one pool, nginx + two gunicorns.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--one-port", action="store_true",
                   help="both paths on one port, the slow one under /tast (layouts: "
                        + ", ".join(x.name for x in LAYOUTS if in_mode(x, True)) + ")")
    p.add_argument("--layout", action="append", choices=LAYOUT_NAMES,
                   help="layout to run (repeatable; default: all of the mode)")
    p.add_argument("--kind", action="append", choices=KINDS, dest="kinds",
                   help="how the slow handler blocks (repeatable; default: both)")
    p.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    p.add_argument("--runs", type=int, default=1, help="measurements per row (median)")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of discarded fast-path load before the baseline (0: none)")
    p.add_argument("--ramp", type=int, default=1,
                   help="seconds the flood runs before the fast path is measured")
    p.add_argument("--fast-connections", type=int, default=4, help="wrk -c on the fast path")
    p.add_argument("--slow-connections", type=int, default=32, help="wrk -c on the slow path")
    p.add_argument("--flood-threads", type=int, default=1, help="wrk -t of the flood")
    p.add_argument("--slow-ms", type=int, default=200, help="how long a slow request blocks")
    p.add_argument("--workers", type=int, default=4,
                   help="total workers per layout (split layouts: half fast, half slow)")
    p.add_argument("--threads", type=int, default=1,
                   help="app threads per worker (fastpool threads, gunicorn gthread --threads)")
    p.add_argument("--slow-threads", type=int,
                   help="app threads per worker of the slow pool in split layouts "
                        "(default: --threads)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the slow pool in -nice rows")
    p.add_argument("--max-pending", type=int, default=4,
                   help="max_pending of the task group in fastpool-routes-shed")
    p.add_argument("--retry-after", type=int, default=1,
                   help="retry_after of the task group in fastpool-routes-shed")
    p.add_argument("--flood-close", action="store_true",
                   help="the flood sends Connection: close (a new connection per slow request)")
    p.add_argument("--nginx", default="nginx",
                   help="nginx binary for nginx-gunicorn (also tried: /usr/sbin/nginx)")
    p.add_argument("--nginx-workers", type=int, default=1,
                   help="nginx worker_processes in nginx-gunicorn")
    p.add_argument("--wrk-timeout", type=int, default=30, help="wrk --timeout, seconds")
    p.add_argument("--server-cpus", help="taskset -c list for the servers (default: no pinning)")
    p.add_argument("--wrk-cpus", help="taskset -c list for both wrks (default: no pinning)")
    p.add_argument("--port", type=int, default=18180,
                   help="fast-path port (and the shared one); the slow pool gets PORT+1 "
                        "(nginx-gunicorn: the gunicorns get PORT+1 and PORT+2)")
    p.add_argument("--fastpool-python", default=sys.executable, type=interpreter_path,
                   help="interpreter that runs fastpool")
    p.add_argument("--peer-python", default=sys.executable, type=interpreter_path,
                   help="interpreter that runs gunicorn")
    p.add_argument("--wrk", default="wrk", help="wrk binary")
    p.add_argument("--start-timeout", type=float, default=30.0,
                   help="seconds a server gets to answer its first request")
    p.add_argument("--stop-grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping a server")
    p.add_argument("--settle-timeout", type=float, default=60.0,
                   help="seconds the servers get to drain the slow requests of a flood")
    p.add_argument("--settle-limit-ms", type=float, default=100.0,
                   help="an idle server answers a fresh connection's GET / within this")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the raw results here")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep server logs and configs here (default: a temporary directory)")
    args = p.parse_args(argv)
    args.kinds = args.kinds or list(KINDS)
    if args.slow_threads is None:
        args.slow_threads = args.threads
    if min(args.duration, args.runs, args.ramp, args.fast_connections, args.slow_connections,
           args.flood_threads, args.slow_ms, args.threads, args.slow_threads,
           args.wrk_timeout) < 1:
        p.error("durations, counts, --slow-ms, threads and --wrk-timeout must be positive")
    if args.workers < 2:
        p.error("--workers must be at least 2 (split layouts halve it)")
    require_warmup(p, args)
    if not -20 <= args.nice <= 19:
        p.error("--nice must be in -20..19")
    if args.max_pending < 1 or args.retry_after < 0 or args.nginx_workers < 1:
        p.error("--max-pending and --nginx-workers must be positive, --retry-after 0 or more")
    wrong = [x for x in args.layout or [] if not in_mode(LAYOUT_BY_NAME[x], args.one_port)]
    if wrong:
        p.error(f"layout(s) {', '.join(wrong)} "
                + ("need two ports (drop --one-port)" if args.one_port else "need --one-port"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reproduce = harness_start(argv, announce=False)
    layouts = [x for x in LAYOUTS if (x.name in args.layout if args.layout
                                      else in_mode(x, args.one_port))]
    layouts = [x for x in layouts if layout_kinds(x, args)]
    tools = [args.wrk] + (["taskset"] if args.server_cpus or args.wrk_cpus else [])
    tools += ["nice"] if any(x.nice and x.server == "gunicorn" for x in layouts) else []
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"error: {tool} not found", file=sys.stderr)
            return 2
    versions: dict[str, str] = {}
    if any(x.server == "nginx" for x in layouts):
        nginx = find_nginx(args.nginx)
        if nginx is None:
            print(f"error: {args.nginx} not found; pass --nginx", file=sys.stderr)
            return 2
        args.nginx = nginx
        versions["nginx"] = nginx_version(nginx)
    for server, py, flag in (("fastpool", args.fastpool_python, "--fastpool-python"),
                             ("gunicorn", args.peer_python, "--peer-python")):
        if not any(x.server == server or (server == "gunicorn" and x.server == "nginx")
                   for x in layouts):
            continue
        try:
            versions[server] = python_version(py, [server], server)
        except BenchError as exc:
            print(f"error: {server}: {exc}; pass {flag}", file=sys.stderr)
            return 2
    if "nginx" in versions:
        versions["nginx"] += f" + gunicorn {versions['gunicorn']}"

    results: list[LayoutResult] = []
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-iso-")
        for layout in layouts:
            print(f"{layout.name} ({layout.server} {versions[layout.server]})")
            res = LayoutResult(layout, versions[layout.server])
            results.append(res)
            try:
                bench_layout(layout, args, tmp, res)
            except (BenchError, OSError) as exc:
                res.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"  {layout.name}: {exc}", file=sys.stderr)

    print()
    print(render(results, args))
    print()
    if reproduce:
        print(f"Reproduce: `{reproduce}`")
        print()
    print(render_commands(results))
    if args.json:
        payload: dict[str, Any] = {
            "settings": settings(args),
            "reproduce": reproduce,
            "machine": machine(),
            "versions": versions,
            "layouts": [
                {"layout": asdict(r.layout), "error": r.error, "commands": r.commands,
                 "configs": r.configs, "wrk_commands": r.wrk,
                 "alone": r.alone_result.to_json(),
                 "rows": [{"kind": row.kind, "error": row.error,
                           "fast": [asdict(run) for run in row.fast],
                           "slow": [asdict(run) for run in row.slow],
                           "routing": row.routing}
                          for row in r.rows.values()]}
                for r in results],
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    run_main(main)

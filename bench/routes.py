"""Handoff cost: req/s of a hello served where it was read vs handed to another group.

With ``routes``, a worker that reads a request for another group's prefix hands the
connection over (its fd and the bytes already read, over a SEQPACKET queue with
SCM_RIGHTS) to a free worker of that group, which answers the client itself. This harness
measures what that costs, on one port, with ``isolation_app:app`` (``/`` and
``/tast/hello`` both answer ``Hello, World!\\n`` the same way):

Servers (``--workers`` = 1 worker per group):

* ``single``: ``fastpool serve isolation_app:app``, no routes: the baseline of run.py.
* ``routes``: a ``web`` group with the listener and a ``task`` group with
  ``routes = ["/tast"]`` and no listener.

Scenarios (wrk ``-t1 -c64``, like run.py):

* ``hello`` (single): ``GET /`` keep-alive.
* ``direct`` (routes): ``GET /``, served by the web worker that read it; the difference to
  ``hello`` is what having routes costs a request that stays.
* ``routed`` (routes): ``GET /tast/hello`` keep-alive. Each connection moves to the task
  group with its first request and stays there (its next requests are the task group's
  own), so this is one handoff per connection, not per request.
* ``pair-direct`` / ``pair-alternate`` (routes): every write carries two pipelined GETs
  (``wrk/sequence.lua``): ``/`` + ``/``, or ``/`` + ``/tast/hello``. Alternating, every
  request is for the other group than the one holding the connection: web to task, then
  back to web with the next ``/``: the worst case, one handoff per request.
* ``stay`` / ``alternate`` (routes): keep-alive, one GET per write (no pipelining), one
  connection per wrk thread (``-tN -cN``, ``--alt-connections``; ``wrk/alternate.lua``
  walks each connection through its paths in turn): ``/`` only, or ``/`` and
  ``/tast/hello`` in turn, so every request after a connection's first moves it: what a
  client that goes back and forth between the groups gets.
* ``close`` (single), ``close-direct`` / ``close-routed`` (routes): ``Connection: close``,
  a new connection per request; routed, every request is accepted and read by the web
  worker and handed to the task worker, which answers and closes.

The table shows each scenario's median req/s, p50 and p99, the handoffs per request (read
from fastpool's control socket around the measured runs, so it shows what really moved),
the req/s divided by its baseline's (``routed``: ÷ ``direct``; ``pair-alternate``: ÷
``pair-direct``; ``close-routed``: ÷ ``close-direct``; ``direct``: ÷ ``hello``;
``close-direct``: ÷ ``close``), the server's CPU time per request (user + system of its
whole process tree, master and every worker, from /proc, over each measured run) and the
baseline's ÷ it, wrk's CPU use (above 85 % of its core the run is flagged client-bound: its
req/s is a floor), and for the rows that move at least every other request the server CPU
time per handoff: (CPU/req - baseline CPU/req) / the extra handoffs per request.

Rules, as in run.py: the servers (master and every worker) are pinned to CPU 0 with
``taskset``, wrk to CPU 1; every server is waited for with a deadline, checked (exact
bodies, a routed request really handed over, alternation on one connection, pipelined
pairs, ``Connection: close`` closing) and re-checked after each scenario; a 1 s warm-up,
then ``--runs`` (3) runs of ``--duration`` (5) s, medians; servers are stopped with
SIGTERM to the process group then SIGKILL, also on Ctrl-C. Standard library only.

Usage (see bench/README.md)::

    python bench/routes.py --json bench/results/routes.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    HOST,
    BenchError,
    Result,
    Server,
    WrkRun,
    check_tools,
    client_bound_line,
    cost_columns,
    cost_note,
    costed_wrk,
    counts_delta,
    exchange,
    fmt_ms,
    harness_start,
    http_request,
    interpreter_path,
    machine,
    pin,
    port_in_use,
    python_version,
    require_positive,
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
HELLO = b"Hello, World!\n"
PREFIX = "/tast"
ROUTED = f"{PREFIX}/hello"  # isolation_app answers it exactly like GET /
SETUPS = ("single", "routes")


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: str  # "single" or "routes"
    request: str  # what the table says about it
    paths: tuple[str, ...]  # one path: plain wrk; more: pipelined by wrk/sequence.lua
    close: bool = False  # Connection: close
    one_per_thread: bool = False  # wrk -tN -cN with wrk/alternate.lua: paths in turn
    baseline: str | None = None  # the scenario its req/s is divided by


SCENARIOS = [
    Scenario("hello", "single", "`GET /` keep-alive, no routes configured", ("/",)),
    Scenario("direct", "routes", "`GET /` keep-alive, served by the web group", ("/",),
             baseline="hello"),
    Scenario("routed", "routes", f"`GET {ROUTED}` keep-alive: moves once per connection",
             (ROUTED,), baseline="direct"),
    Scenario("pair-direct", "routes", "`GET /` + `GET /` pipelined per write", ("/", "/")),
    Scenario("pair-alternate", "routes",
             f"`GET /` + `GET {ROUTED}` pipelined per write: every request moves",
             ("/", ROUTED), baseline="pair-direct"),
    Scenario("stay", "routes", "`GET /` keep-alive, one per write, a wrk thread per "
             "connection", ("/",), one_per_thread=True),
    Scenario("alternate", "routes",
             f"`GET /` and `GET {ROUTED}` in turn on each keep-alive connection, one per "
             "write: every request moves", ("/", ROUTED), one_per_thread=True,
             baseline="stay"),
    Scenario("close", "single", "`GET /`, `Connection: close`, no routes configured", ("/",),
             close=True),
    Scenario("close-direct", "routes", "`GET /`, `Connection: close`", ("/",), close=True,
             baseline="close"),
    Scenario("close-routed", "routes",
             f"`GET {ROUTED}`, `Connection: close`: every request moves", (ROUTED,),
             close=True, baseline="close-direct"),
]
SCENARIO_NAMES = [s.name for s in SCENARIOS]
BY_NAME = {s.name: s for s in SCENARIOS}


# --------------------------------------------------------------------------- servers


def routes_config(args: argparse.Namespace, sock: Path) -> str:
    return "\n".join([
        "[server]",
        f"control_socket = {json.dumps(str(sock))}",
        "",
        "[group.web]",
        f"app = {json.dumps(APP)}",
        f"listen = {toml_list([f'{HOST}:{args.port}'])}",
        f"workers = {args.workers}",
        f"threads = {args.threads}",
        "",
        "[group.task]",
        f"app = {json.dumps(APP)}",
        f"routes = {toml_list([PREFIX])}",
        f"workers = {args.workers}",
        f"threads = {args.threads}",
    ]) + "\n"


def server_command(setup: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    py = args.fastpool_python
    sock = tmp / f"{setup}.sock"
    if setup == "single":
        cmd = [py, "-m", "fastpool", "serve", APP, "--bind", f"{HOST}:{args.port}",
               "--workers", str(args.workers), "--threads", str(args.threads),
               "--control-socket", str(sock)]
    else:
        (tmp / "routes.toml").write_text(routes_config(args, sock))
        cmd = [py, "-m", "fastpool", "serve", "--config", str(tmp / "routes.toml")]
    return pin(args.server_cpus, args) + cmd


def wrk_command(s: Scenario, args: argparse.Namespace, duration: int) -> list[str]:
    if s.one_per_thread:
        shape = [f"-t{args.alt_connections}", f"-c{args.alt_connections}"]
    else:
        shape = ["-t1", f"-c{args.connections}"]
    cmd = pin(args.wrk_cpus, args) + [args.wrk, *shape, f"-d{duration}s", "--latency"]
    if s.close:
        cmd += ["-H", "Connection: close"]
    url = f"http://{HOST}:{args.port}"
    if s.one_per_thread:
        return cmd + ["-s", str(BENCH / "wrk" / "alternate.lua"), url, "--", *s.paths]
    if len(s.paths) == 1:
        return cmd + [url + s.paths[0]]
    return cmd + ["-s", str(BENCH / "wrk" / "sequence.lua"), url, "--", *s.paths]


# --------------------------------------------------------------------------- checks


def check(setup: str, port: int, control: Path, full: bool) -> None:
    """Exact bodies for ``/`` and ``/tast/hello``; with routes, that a routed request is
    handed over, alternation on one connection and pipelined pairs; then that
    ``Connection: close`` closes, direct and routed. ``full``: all of it (else the bodies)."""

    def expect(responses: list[Any], what: str) -> None:
        for i, resp in enumerate(responses):
            if resp.status != 200 or resp.body != HELLO:
                raise BenchError(f"{what}, response {i + 1}: status {resp.status}, "
                                 f"body {resp.body[:60]!r}")

    def get(path: str, close: bool = False) -> bytes:
        return http_request("GET", path, port, close=close)

    before = routing_counts(control)
    expect(exchange(port, [get("/")]), "GET /")
    expect(exchange(port, [get(ROUTED)]), f"GET {ROUTED}")
    if not full:
        return
    if setup == "routes":
        moved = counts_delta(before, routing_counts(control))
        if moved.get("task", {}).get("handed_in", 0) != 1:
            raise BenchError(f"GET {ROUTED} on a new connection: the task group took "
                             f"{moved.get('task', {}).get('handed_in', 0)} handoffs, not 1")
        expect(exchange(port, [get("/"), get(ROUTED)] * 3), "alternating on one connection")
        expect(exchange(port, [get("/") + get(ROUTED)] * 3, count=6),
               f"pipelined / + {ROUTED} pairs")
        moved = counts_delta(before, routing_counts(control))
        taken = sum(g.get("handed_in", 0) for g in moved.values())
        if taken != 1 + 5 + 5:  # alternation: every request after the first moves
            raise BenchError(f"the checks moved {taken} requests between groups, not 11")
    for path in ("/", ROUTED):
        expect(exchange(port, [get(path, close=True)], expect_close=True),
               f"GET {path} with Connection: close")


# --------------------------------------------------------------------------- results


@dataclass
class RouteResult(Result):
    """A scenario's runs (``Result``: scenario = its name, server = its setup), with the
    routing counts over them."""

    spec: Scenario | None = None
    routing: dict[str, dict[str, int]] = field(default_factory=dict)  # over the runs

    def per_request(self) -> float:
        """Handoffs (into any group) per completed request over the measured runs."""
        total = sum(r.requests for r in self.runs)
        moved = sum(g.get("handed_in", 0) for g in self.routing.values())
        return moved / total if total else float("nan")


def render(results: dict[str, RouteResult], args: argparse.Namespace, version: str) -> str:
    head = ["scenario", "server", "request", "req/s", "p50", "p99", "handoffs / request",
            "÷ baseline", *cost_columns("baseline"), "µs per handoff", "errors"]
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] * 3 + ["---:"] * 10 + ["---"]) + "|"]
    for res in results.values():
        s = res.spec
        assert s is not None
        base = results.get(s.baseline) if s.baseline else None
        ratio = per_handoff = "—"
        moves = res.per_request()
        if base is not None and base.runs and res.runs:
            ratio = f"{res.rps / base.rps:.2f} (÷ `{base.scenario}`)"
            extra_moves = moves - base.per_request()
            cost = res.cpu_us - base.cpu_us
            if extra_moves >= 0.5 and cost == cost:
                per_handoff = f"{cost / extra_moves:.1f}"
        cells = [f"`{s.name}`", s.setup, s.request,
                 f"{res.rps:,.0f}" if res.runs else "—",
                 fmt_ms(res.p50) if res.runs else "—",
                 fmt_ms(res.p99) if res.runs else "—",
                 "—" if moves != moves else f"{moves:.4f}" if moves < 0.01 else f"{moves:.2f}",
                 ratio, *(res.cost_cells(base) if res.runs else ["—"] * 4), per_handoff,
                 "; ".join(x for x in (res.problems(), res.error) if x) or "—"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out.append("")
    out.append(
        f"fastpool {version}, {args.workers} worker(s) per group, {args.threads} app "
        f"thread(s); `single`: one group, no routes; `routes`: `web` (listener) + `task` "
        f"(`routes = [\"{PREFIX}\"]`), both serving `{APP}`. wrk -t1 -c{args.connections} "
        f"(`stay`, `alternate`: -t{args.alt_connections} -c{args.alt_connections}); "
        f"median of {args.runs} run(s) of {args.duration} s after a {args.warmup} s warm-up. "
        + ("Not pinned. " if args.no_pin else
           f"Pinned: servers (every process) on CPU {args.server_cpus}, wrk on CPU "
           f"{args.wrk_cpus}. ")
        + "Handoffs per request: every group's handed_in over the measured runs ÷ the "
        f"requests wrk completed. {cost_note('baseline')}. µs per handoff: (CPU/req − the "
        "baseline's CPU/req) ÷ the extra handoffs per request, the server's CPU time (both "
        f"workers and the master) per move. {client_bound_line(results.values())} "
        f"{machine()}.")
    return "\n".join(out)


# --------------------------------------------------------------------------- running


def describe(run: WrkRun) -> str:
    extra = Result("", "", [run]).problems()
    return (f"{run.rps:,.0f} req/s, p50 {fmt_ms(run.p50_ms)}, p99 {fmt_ms(run.p99_ms)}"
            + (f" [{extra}]" if extra else ""))


def bench_setup(setup: str, scenarios: list[Scenario], args: argparse.Namespace, tmp: Path,
                results: dict[str, RouteResult], commands: dict[str, str]) -> None:
    cmd = server_command(setup, args, tmp)
    commands[setup] = f"PYTHONPATH={BENCH} {shlex.join(cmd)}"
    control = tmp / f"{setup}.sock"
    if port_in_use(args.port):
        raise BenchError(f"port {args.port} is already in use; pass --port")
    server = Server(setup, cmd, tmp / f"{setup}.log")
    with running(server, args.stop_grace):
        server.wait_ready(args.port, args.start_timeout)
        check(setup, args.port, control, full=True)
        print(f"  {setup}: ready, checks passed")
        for s in scenarios:
            res = results[s.name]
            try:
                if args.warmup:
                    run_wrk(wrk_command(s, args, args.warmup), args.warmup)
                before = routing_counts(control)
                for i in range(args.runs):
                    assert server.proc is not None
                    run, extra = costed_wrk(server.proc.pid, res,
                                            wrk_command(s, args, args.duration), args.duration)
                    res.runs.append(run)
                    print(f"  {s.name}, run {i + 1}: {describe(run)}{extra}")
                res.routing = counts_delta(before, routing_counts(control))
                print(f"  {s.name}: {res.per_request():.4f} handoffs per request")
                if not server.alive():
                    raise BenchError(f"{setup} exited:\n{server.log_tail()}")
                check(setup, args.port, control, full=False)
            except BenchError as exc:
                res.error = str(exc).splitlines()[0]
                print(f"  {s.name}: {exc}", file=sys.stderr)
                if not server.alive():
                    raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="The cost of a handoff: a hello served by the group that read it vs "
                    "routed to another group, on one port (fastpool routes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", action="append", choices=SCENARIO_NAMES,
                   help="scenario to run (repeatable; default: all)")
    p.add_argument("--duration", type=int, default=5, help="seconds per run")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario (median)")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of discarded load before each scenario (0: none)")
    p.add_argument("--connections", type=int, default=64, help="wrk -c")
    p.add_argument("--alt-connections", type=int, default=16,
                   help="wrk -tN -cN of `stay` and `alternate` (a wrk thread per connection)")
    p.add_argument("--workers", type=int, default=1, help="workers per group")
    p.add_argument("--threads", type=int, default=1, help="app threads per worker")
    p.add_argument("--server-cpus", default="0", help="taskset -c list for the server")
    p.add_argument("--wrk-cpus", default="1", help="taskset -c list for wrk")
    p.add_argument("--no-pin", action="store_true", help="pin nothing")
    p.add_argument("--port", type=int, default=18280, help="the one port")
    p.add_argument("--fastpool-python", default=sys.executable, type=interpreter_path,
                   help="interpreter that runs fastpool")
    p.add_argument("--wrk", default="wrk", help="wrk binary")
    p.add_argument("--start-timeout", type=float, default=30.0,
                   help="seconds the server gets to answer its first request")
    p.add_argument("--stop-grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the server")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the raw results here")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep server logs and the config here (default: a temporary directory)")
    args = p.parse_args(argv)
    require_positive(p, args, "duration", "runs", "connections", "alt_connections", "workers",
                     "threads")
    require_warmup(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reproduce = harness_start(argv, announce=False)
    if not check_tools(args):
        return 2
    try:
        version = python_version(args.fastpool_python, ["fastpool"], "fastpool")
    except BenchError as exc:
        print(f"error: fastpool: {exc}; pass --fastpool-python", file=sys.stderr)
        return 2
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    results = {s.name: RouteResult(s.name, s.setup, spec=s) for s in scenarios}
    commands: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-routes-")
        for setup in SETUPS:
            mine = [s for s in scenarios if s.setup == setup]
            if not mine:
                continue
            print(f"{setup} (fastpool {version})")
            try:
                bench_setup(setup, mine, args, tmp, results, commands)
            except (BenchError, OSError) as exc:
                for s in mine:
                    results[s.name].error = results[s.name].error or (
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                print(f"  {setup}: {exc}", file=sys.stderr)
        config = (tmp / "routes.toml").read_text() if (tmp / "routes.toml").exists() else None

    print()
    print(render(results, args, version))
    print()
    if reproduce:
        print(f"Reproduce: `{reproduce}`")
        print()
    print("Commands (the server runs with bench/ as working directory):")
    print()
    print("```")
    for setup, cmd in commands.items():
        print(f"# {setup}")
        print(cmd)
    for s in scenarios:
        print(f"#   wrk, {s.name}: {shlex.join(wrk_command(s, args, args.duration))}")
    print("```")
    if config:
        print()
        print("routes.toml:")
        print()
        print("```toml")
        print(config.rstrip())
        print("```")
    if args.json:
        payload: dict[str, Any] = {
            "settings": settings(args),
            "reproduce": reproduce,
            "machine": machine(),
            "version": version,
            "commands": commands,
            "config": config,
            "scenarios": [
                results[s.name].to_json() | {
                    "spec": asdict(s), "routing": results[s.name].routing,
                    "handoffs_per_request": results[s.name].per_request(),
                    "wrk_command": shlex.join(wrk_command(s, args, args.duration))}
                for s in scenarios],
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    run_main(main, "the server is stopped")

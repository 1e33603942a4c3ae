"""Many cores: how the hello request scales with workers, fastpool against granian and nginx.

The ``hello`` scenario of ``run.py`` (keep-alive ``GET /``, ``Hello, World!\\n`` from
``apps:app``) at 1, 2, 4, 8 and 16 workers (``--workers-list``), for

* ``fastpool``: ``fastpool serve apps:app --workers N`` (WSGI; one SO_REUSEPORT socket per
  worker, its default);
* ``granian``: ``granian --interface wsgi --workers N`` (WSGI, ``--http 1 --no-ws``);
* ``nginx``: ``worker_processes N`` answering ``return 200`` with the same bytes (a
  reference, not Python);

(``--server`` picks others of run.py's WSGI suite: gunicorn, uvicorn, bjoern). The
commands, the check and wrk's command line are run.py's own (imported, not copied).

Rules this harness keeps:

* The machine is split in two: the CPUs this process may use (``sched_getaffinity``, or
  ``--cpus``), in order; the server, all its processes, is pinned to the first half
  (``taskset -c``) and wrk to the rest, with one wrk thread per CPU of its half (``-t``).
  No flag is needed: on 16 CPUs the server gets 0-7 and ``wrk -t8`` gets 8-15; on this
  project's 2-CPU machine the server gets CPU 0 and ``wrk -t1`` CPU 1. A worker count
  above the server's half is skipped with a line saying so (on 2 CPUs only 1 worker runs;
  on 16, 16 workers would share 8 CPUs). Where a server CPU's hyperthread sibling is in
  wrk's half, a warning says so (``--cpus`` can then pick one thread per core).
* wrk's connections scale with the workers: ``--connections-per-worker`` (64, run.py's
  ``-c64`` at one worker) × N, and never fewer than wrk's threads.
* As in run.py: every server is waited for with a deadline and checked (the exact body
  twice on one keep-alive connection) before it is measured and again after; a 1 s
  warm-up, then ``--runs`` runs of ``--duration`` s, medians; servers are stopped (SIGTERM
  to the group, then SIGKILL) however the run ends. The worker counts are the outer loop,
  so the servers compared at one N are measured close together in time.
* Besides wrk's figures, ``common.costing`` accounts each run: the server's CPU time per
  request (its whole process tree, from /proc), how many CPUs' worth it used, and wrk's
  CPU as a share of its half; above ``CLIENT_BOUND`` (85 %) the run is flagged
  client-bound: its req/s is a floor set by wrk, not a figure of the server.
* Then per server the scaling (req/s at N ÷ req/s at 1 worker) and per N fastpool ÷ granian
  on req/s. The targets (on a 16-core machine: 8 workers >= 7x one worker, and >= 2x
  granian at 8 workers) are printed, not asserted.
* The soft limit of open files is raised to the hard one (wrk and the servers inherit it):
  16 workers' 1,024 connections would meet the usual 1,024.

Standard library only (and taskset, wrk). Usage (see bench/README.md)::

    python bench/multicore.py --peer-python /path/to/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import sys
from pathlib import Path

from common import (
    BENCH,
    CLIENT_BOUND,
    BenchError,
    Result,
    Server,
    WrkRun,
    check_tools,
    costing,
    find_nginx,
    harness_start,
    machine,
    measure_scenarios,
    pin,
    port_in_use,
    require_positive,
    require_warmup,
    result_table,
    run_main,
    run_wrk,
    settings,
    work_dir,
    write_json,
)
from run import SERVER_KINDS, Available, Scenario, check_server, make_scenarios, probe
from run import server_command as run_server_command
from run import wrk_command as run_wrk_command

BASE = "fastpool"
PEER = "granian"   # the Python peer of the targets (its WSGI interface)
DEFAULT_SERVERS = ("fastpool", "granian", "nginx")
WSGI_NAMES = [k.name for k in SERVER_KINDS if k.interface == "wsgi"]
HELLO: Scenario = next(s for s in make_scenarios(16) if s.name == "hello")
DEFAULT_WORKERS = "1,2,4,8,16"
# The targets (issue: part 5), at TARGET_WORKERS on a 16-core machine: fastpool's req/s
# at least SCALING_TARGET times its one-worker figure and PEER_TARGET times granian's.
TARGET_WORKERS = 8
SCALING_TARGET = 7.0
PEER_TARGET = 2.0


# --------------------------------------------------------------------------- CPUs


def parse_cpus(text: str) -> list[int]:
    """A taskset-style list (``0-7,12``) as sorted CPU numbers; ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        lo, hi = int(first), int(last) if dash else int(first)
        if lo < 0 or hi < lo:
            raise ValueError(part)
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def cpu_list(cpus: list[int]) -> str:
    """CPU numbers as taskset's compact list: ``0-7`` rather than ``0,1,...,7``."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def split_cpus(cpus: list[int]) -> tuple[list[int], list[int]]:
    """The server's half (the first, rounded down) and wrk's (the rest)."""
    half = len(cpus) // 2
    return cpus[:half], cpus[half:]


def shared_cores(server: list[int], wrk: list[int]) -> list[tuple[int, int]]:
    """(server CPU, wrk CPU) pairs that are hyperthreads of one core (from sysfs)."""
    pairs = []
    for cpu in server:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            siblings = parse_cpus(path.read_text().strip())
        except (OSError, ValueError):
            continue
        pairs += [(cpu, other) for other in siblings if other in wrk]
    return pairs


def raise_open_files() -> None:
    """The soft RLIMIT_NOFILE up to the hard one, for wrk's and the servers' sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------- one N


def load_args(args: argparse.Namespace, workers: int) -> argparse.Namespace:
    """run.py's options for ``workers`` workers: its server and wrk commands read these."""
    threads = len(args.wrk_cpu_list)
    return argparse.Namespace(**vars(args) | {
        "workers": workers, "wrk_threads": threads,
        "connections": max(threads, args.connections_per_worker * workers),
        "server_cpus": cpu_list(args.server_cpu_list), "wrk_cpus": cpu_list(args.wrk_cpu_list),
        "depth": 16, "gunicorn_threads": 1, "loop": "uvloop"})


def measure(av: Available, workers: int, args: argparse.Namespace, tmp: Path,
            results: dict[tuple[str, int], Result], commands: dict[str, str]) -> None:
    """Start ``av`` with ``workers`` workers on the server's half, check, measure, stop."""
    name, these = av.kind.name, load_args(args, workers)
    label = f"{name} ×{workers}"
    if port_in_use(args.port):
        raise BenchError(f"port {args.port} is already in use; pass --port")
    cmd = pin(these.server_cpus, these) + run_server_command(av, these, tmp)
    commands[label] = shlex.join(cmd)
    commands[f"wrk ×{workers}"] = shlex.join(run_wrk_command(these, HELLO, args.duration))
    server = Server(label, cmd, tmp / f"{name}-{workers}.log")
    result = results.setdefault((name, workers), Result(
        f"hello ×{workers}", name, wrk_cpus=len(args.wrk_cpu_list)))

    def run(r: Result, wrk: list[str], duration: int) -> tuple[WrkRun, str]:
        assert server.proc is not None
        with costing(server.proc.pid, r.costs):
            one = run_wrk(wrk, duration)
        cost = r.costs[-1]
        per = (f"{cost.server_cpu_s / one.requests * 1e6:.1f} µs/req" if one.requests
               else "? µs/req")
        return one, (f", {per}, server {cost.server_cpu_s / cost.wall_s:.2f} CPUs, wrk "
                     f"{cost.wrk_cpu_s / cost.wall_s / len(args.wrk_cpu_list):.0%}")

    measure_scenarios(
        server, name, label, [HELLO], these,
        check=lambda group: check_server(args.port, group, 16),
        result=lambda _s: result,
        wrk_command=lambda s, duration: run_wrk_command(these, s, duration),
        run=run)


# --------------------------------------------------------------------------- results


def ratio(a: Result | None, b: Result | None) -> float | None:
    """``a``'s req/s ÷ ``b``'s, or None when either was not measured."""
    if a is None or b is None or not a.runs or not b.runs or not b.rps:
        return None
    return a.rps / b.rps


def scaling(results: dict[tuple[str, int], Result], name: str, workers: int) -> float | None:
    return ratio(results.get((name, workers)), results.get((name, 1)))


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def render(results: dict[tuple[str, int], Result], servers: list[Available],
           counts: list[int], skipped: list[int], args: argparse.Namespace) -> str:
    names = [av.kind.name for av in servers]
    out: list[str] = []
    for n in counts:
        rows = [results[(name, n)] for name in names if (name, n) in results]
        if not rows:
            continue
        base = results.get((BASE, n))
        these = load_args(args, n)
        out.append(f"### {n} worker(s): `wrk -t{these.wrk_threads} -c{these.connections}`\n")

        def cells(r: Result) -> list[str]:
            used = r.server_cpus_used
            return ["?" if used != used else f"{used:.2f}"]

        out += result_table(rows, BASE, base, costs=True, more_head=("server CPUs used",),
                            more_cells=cells)
        out.append("")
    out.append("### Scaling: req/s at N workers ÷ req/s at 1 worker\n")
    head = ["workers", *names]
    if BASE in names and PEER in names:
        head.append(f"{BASE} ÷ {PEER} (req/s)")
    out += ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for n in counts:
        row = [str(n)]
        for name in names:
            r = results.get((name, n))
            row.append("—" if r is None or not r.runs else
                       f"{r.rps:,.0f} ({fmt_ratio(scaling(results, name, n))}×)")
        if BASE in names and PEER in names:
            row.append(fmt_ratio(ratio(results.get((BASE, n)), results.get((PEER, n)))))
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append(f"Targets (on a 16-core machine, {TARGET_WORKERS} workers; printed, not "
               "asserted):\n")
    out += target_lines(results, counts, args)
    out.append("")
    server_cpus, wrk_cpus = args.server_cpu_list, args.wrk_cpu_list
    out.append(
        f"Median of {args.runs} run(s) of {args.duration} s each"
        + (f" (after a {args.warmup} s warm-up)" if args.warmup else " (no warm-up)")
        + f"; {args.connections_per_worker} connections per worker; "
        + ("not pinned (wrk and the servers still sized for the halves below)"
           if args.no_pin else
           f"servers pinned to CPU(s) {cpu_list(server_cpus)}, wrk (one thread per CPU) to "
           f"CPU(s) {cpu_list(wrk_cpus)}")
        + (f"; skipped (more workers than the server's {len(server_cpus)} CPU(s)): "
           + ", ".join(map(str, skipped)) if skipped else "")
        + f". CPU/req: the server's process tree's CPU time (user + system) per request; "
        f"'CPU/req vs {BASE}': {BASE}'s ÷ the server's (above 1 it spends less); wrk CPU: "
        f"wrk's CPU time ÷ wall time ÷ its {len(wrk_cpus)} CPU(s) (above {CLIENT_BOUND:.0%}: "
        "client-bound, the req/s is a floor); server CPUs used: the server's CPU time ÷ "
        f"wall time. {machine()}.\n")
    out.append("Notes:\n" + "\n".join(
        f"- {av.kind.name} {av.version}" + (f": {av.kind.note}" if av.kind.note else "")
        for av in servers) + "\n")
    return "\n".join(out)


def target_lines(results: dict[tuple[str, int], Result], counts: list[int],
                 args: argparse.Namespace) -> list[str]:
    """The two targets at TARGET_WORKERS, met or not, or why not measured."""
    if TARGET_WORKERS not in counts:
        why = (f"not measured: {TARGET_WORKERS} workers need {2 * TARGET_WORKERS} CPUs (the "
               f"server gets half; here {len(args.server_cpu_list)})"
               if TARGET_WORKERS in args.workers_list else
               f"not measured: {TARGET_WORKERS} is not in --workers-list")
        return [f"- {BASE} at {TARGET_WORKERS} workers >= {SCALING_TARGET:g}× its 1-worker "
                f"req/s: {why}",
                f"- {BASE} >= {PEER_TARGET:g}× {PEER} (WSGI) at {TARGET_WORKERS} workers: {why}"]
    got = scaling(results, BASE, TARGET_WORKERS)
    vs = ratio(results.get((BASE, TARGET_WORKERS)), results.get((PEER, TARGET_WORKERS)))

    def verdict(value: float | None, least: float) -> str:
        if value is None:
            return "not measured"
        return f"{value:.2f} ({'met' if value >= least else 'NOT met'})"

    bound = [f"{name} ×{n}" for (name, n), r in results.items()
             if n in (1, TARGET_WORKERS) and name in (BASE, PEER) and r.runs and r.client_bound]
    return [f"- {BASE} at {TARGET_WORKERS} workers >= {SCALING_TARGET:g}× its 1-worker req/s: "
            + verdict(got, SCALING_TARGET),
            f"- {BASE} >= {PEER_TARGET:g}× {PEER} (WSGI) at {TARGET_WORKERS} workers: "
            + verdict(vs, PEER_TARGET)] + (
        [f"- client-bound (req/s is a floor): {', '.join(bound)}"] if bound else [])


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="The hello request at 1-16 workers: fastpool against granian (WSGI) and "
                    "nginx, the server on the first half of the CPUs, wrk on the rest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers-list", default=DEFAULT_WORKERS, metavar="N,N,...",
                   help="worker counts; those above the server's half of the CPUs are skipped")
    p.add_argument("--server", action="append", choices=WSGI_NAMES,
                   help=f"server to run (repeatable; default: {', '.join(DEFAULT_SERVERS)})")
    p.add_argument("--cpus", metavar="LIST",
                   help="CPUs to split between server and wrk (taskset list; default: every "
                        "CPU this process may use)")
    p.add_argument("--connections-per-worker", type=int, default=64,
                   help="wrk -c is this × the worker count")
    p.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    p.add_argument("--runs", type=int, default=3, help="measured runs per figure (median)")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of discarded warm-up per figure (0: none)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--port", type=int, default=18081, help="port every server listens on")
    p.add_argument("--fastpool-python", default=sys.executable,
                   help="interpreter that runs fastpool")
    p.add_argument("--peer-python", default=sys.executable,
                   help="interpreter that runs granian (and gunicorn, uvicorn, bjoern)")
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
    require_positive(p, args, "runs", "duration", "connections_per_worker")
    require_warmup(p, args)
    try:
        args.workers_list = sorted(set(int(x) for x in args.workers_list.split(",")))
    except ValueError:
        p.error(f"--workers-list wants numbers separated by commas: {args.workers_list!r}")
    if not args.workers_list or args.workers_list[0] < 1:
        p.error("--workers-list wants positive numbers")
    try:
        cpus = parse_cpus(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
    except ValueError:
        p.error(f"--cpus wants a taskset list such as 0-7,16-23: {args.cpus!r}")
    if len(cpus) < 2:
        p.error(f"needs at least 2 CPUs, one for the server and one for wrk (have {cpus})")
    args.server_cpu_list, args.wrk_cpu_list = split_cpus(cpus)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reproduce = harness_start(argv)
    if not check_tools(args):
        return 2
    raise_open_files()
    server_cpus, wrk_cpus = args.server_cpu_list, args.wrk_cpu_list
    counts = [n for n in args.workers_list if n <= len(server_cpus)]
    skipped = [n for n in args.workers_list if n > len(server_cpus)]
    print(f"server on CPU(s) {cpu_list(server_cpus)}, wrk -t{len(wrk_cpus)} on CPU(s) "
          f"{cpu_list(wrk_cpus)}" + (" (sizes only: --no-pin)" if args.no_pin else ""))
    if skipped:
        print(f"skipping {', '.join(map(str, skipped))} worker(s): more than the server's "
              f"{len(server_cpus)} CPU(s) (half of the {len(server_cpus) + len(wrk_cpus)})")
    for cpu, other in shared_cores(server_cpus, wrk_cpus):
        print(f"warning: server CPU {cpu} and wrk CPU {other} are hyperthreads of one core; "
              "pass --cpus with one thread per core to keep them apart", file=sys.stderr)

    servers: list[Available] = []
    wanted = args.server or list(DEFAULT_SERVERS)
    for kind in SERVER_KINDS:
        if kind.name not in wanted:
            continue
        python = (None if kind.module is None else
                  args.fastpool_python if kind.name == BASE else args.peer_python)
        found = probe(kind, python, find_nginx(args.nginx) or args.nginx)
        if isinstance(found, str):
            if kind.name == BASE:
                print(f"error: {BASE}: {found}; pass --fastpool-python", file=sys.stderr)
                return 2
            print(f"skipping {kind.name}: {found}")
            continue
        servers.append(found)

    results: dict[tuple[str, int], Result] = {}
    commands: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-multicore-")
        for n in counts:
            for av in servers:
                print(f"{av.kind.name} {av.version}, {n} worker(s)")
                try:
                    measure(av, n, args, tmp, results, commands)
                except BenchError as exc:
                    print(f"  {av.kind.name}: {exc}", file=sys.stderr)

    print()
    print(render(results, servers, counts, skipped, args))
    if reproduce:
        print(f"Reproduce: `{reproduce}`\n")
    print("Commands (servers run with bench/ as working directory, PYTHONPATH=bench/):\n")
    print("```")
    for label, cmd in commands.items():
        print(f"# {label}\n{cmd}")
    print("```")
    if args.json:
        write_json(args.json, {
            "settings": settings(args), "reproduce": reproduce, "machine": machine(),
            "bench": str(BENCH), "skipped_workers": skipped,
            "servers": {av.kind.name: {"version": av.version, "note": av.kind.note}
                        for av in servers},
            "commands": commands,
            "results": [r.to_json() | {"workers": n, "server_cpus_used": r.server_cpus_used,
                                        "scaling": scaling(results, r.server, n)}
                        for (_, n), r in results.items()],
        })
    return 0


if __name__ == "__main__":
    run_main(main)

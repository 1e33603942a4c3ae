"""Deferred work: what a burst of slow requests does under three layouts.

A burst of ``--burst`` requests for a slow report (``--seconds`` of work each, 0.2 s by
default), all sent at once, while one client keeps asking for a fast page; per layout:
how many were accepted and how many shed (503), when the last result was there, and the
fast page's p99 during the burst. Every layout has the same four app workers and uses
the apps of ``examples/deferred`` (README, "Deferred work"):

* ``routes``: the example's ``web`` group (2 workers) and its ``task`` group (2 workers,
  ``routes = ["/tast"]``, ``max_pending = 8``): the burst is ``GET /tast/report``,
  answered directly by the task workers, or refused with 503 + Retry-After.
* ``queue``: ``web`` (2 workers), ``reports`` (ASGI, 1 worker) and 2 RQ consumers
  (``[process.worker]``, ``rq worker``) over a redis-server this script starts: the burst
  is ``POST /reports`` (202 at once); the last result is there when every job is
  finished (polled with ``GET /reports/ID``).
* ``shared``: one group of 4 workers serving everything (``GET /tast/report`` and the
  fast page alike), no admission control: the layout without isolation.

The fast page is ``GET /`` on one keep-alive connection, one request after the other.
The servers are not pinned (the consumers and redis need a core of their own).

No CPU time per request is reported here (unlike the wrk harnesses, see common.py
``costing``): no figure of this harness is a throughput. The burst is a fixed number of
requests, each ``--seconds`` of work by design, and the fast page is one client waiting
for each answer; what is measured is admission (accepted/shed), the time to the last
result and the fast page's latency, none of which a CPU-per-request figure would explain,
and with the layouts unpinned and the queue layout's redis and consumers outside the
server's process tree it could not be measured comparably either.

Needs ``redis-server`` and ``rq`` (in the interpreter given by ``--fastpool-python``, as
fastpool's test extra installs it). Usage::

    python bench/deferred.py [--burst 200] [--seconds 0.2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import (
    HOST,
    BenchError,
    Server,
    machine,
    port_in_use,
    run_main,
    work_dir,
    write_json,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deferred"
LAYOUTS = ("routes", "queue", "shared")

SHARED_CONFIG = """[group.all]
app = "pages:app"
listen = ["{address}"]
workers = 4
"""


@dataclass
class Outcome:
    layout: str
    accepted: int = 0
    shed: int = 0
    failed: int = 0
    last_result_s: float = float("nan")
    fast_p50_ms: float = float("nan")
    fast_p99_ms: float = float("nan")
    quiet_p99_ms: float = float("nan")   # the fast page before the burst
    fast_requests: int = 0
    notes: list[str] = field(default_factory=list)


def request(port: int, method: str, path: str, body: bytes | None = None,
            timeout: float = 120.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fast_path(port: int, stop: threading.Event) -> list[tuple[float, float]]:
    """``GET /`` on one keep-alive connection until ``stop``: (when, seconds) of each."""
    times = []
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        while not stop.is_set():
            began = time.monotonic()
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            times.append((began, time.monotonic() - began))
    finally:
        conn.close()
    return times


def config_for(layout: str, directory: Path, port: int, redis_url: str) -> Path:
    """The layout's config in ``directory`` (a copy of the example)."""
    shutil.copytree(EXAMPLE, directory, ignore=shutil.ignore_patterns("__pycache__"))
    config = directory / "fastpool.toml"
    text = config.read_text().replace("127.0.0.1:8000", f"{HOST}:{port}")
    if layout == "shared":
        text = SHARED_CONFIG.format(address=f"{HOST}:{port}")
    elif layout == "routes":
        # The example without its queue: web and task only.
        text = text.split("[group.reports]")[0]
    else:
        text = text.replace("${REDIS_URL:-redis://127.0.0.1:6379/0}", redis_url)
    config.write_text(text)
    return config


def run_layout(layout: str, args: argparse.Namespace, tmp: Path, redis_url: str) -> Outcome:
    outcome = Outcome(layout)
    directory = tmp / layout
    config = config_for(layout, directory, args.port, redis_url)
    python_bin = os.path.dirname(args.fastpool_python)
    env = {"PYTHONPATH": str(directory), "REDIS_URL": redis_url,
           "PATH": python_bin + os.pathsep + os.environ.get("PATH", "")}
    cmd = [args.fastpool_python, "-m", "fastpool", "serve", "--config", str(config)]
    server = Server(layout, cmd, tmp / f"{layout}.log", env)
    if port_in_use(args.port):
        raise BenchError(f"port {args.port} is already in use; pass --port")
    server.start()
    try:
        server.wait_ready(args.port, args.start_timeout)
        if layout == "queue":
            deadline = time.monotonic() + args.start_timeout
            while (server.log_path.read_text(errors="replace").count("Listening on reports")
                   < 2):
                if time.monotonic() > deadline:
                    raise BenchError("the RQ consumers did not start")
                time.sleep(0.05)
        # warm every worker up
        for _ in range(8):
            request(args.port, "GET", "/")
        stop = threading.Event()
        with ThreadPoolExecutor(1) as fast_pool:
            fast = fast_pool.submit(fast_path, args.port, stop)
            time.sleep(args.quiet)   # a moment of quiet first, as a reference
            began = time.monotonic()
            jobs: list[str] = []
            body = json.dumps({"name": "burst", "seconds": args.seconds}).encode()

            def one(_: int) -> tuple[int, float, bytes]:
                if layout == "queue":
                    status, data = request(args.port, "POST", "/reports", body)
                else:
                    status, data = request(args.port, "GET",
                                           f"/tast/report?name=burst&seconds={args.seconds}")
                return status, time.monotonic() - began, data

            with ThreadPoolExecutor(args.burst) as pool:
                answers = list(pool.map(one, range(args.burst)))
            for status, _, data in answers:
                if status in (200, 202):
                    outcome.accepted += 1
                    if status == 202:
                        jobs.append(json.loads(data)["id"])
                elif status == 503:
                    outcome.shed += 1
                else:
                    outcome.failed += 1
            last = max((at for status, at, _ in answers if status in (200, 202)), default=0.0)
            if jobs:
                pending = list(jobs)
                while pending:
                    state = json.loads(request(args.port, "GET", f"/reports/{pending[-1]}")[1])
                    if state.get("status") == "finished":
                        pending.pop()
                        continue
                    if time.monotonic() - began > args.limit:
                        outcome.notes.append(f"{len(pending)} jobs unfinished after "
                                             f"{args.limit:g} s")
                        break
                    time.sleep(0.05)
                last = time.monotonic() - began
            burst_end = time.monotonic()
            stop.set()
            times = fast.result()
        outcome.last_result_s = last
        quiet = [t for at, t in times if at < began]
        during = [t for at, t in times if began <= at <= burst_end]
        outcome.fast_requests = len(during)
        if len(quiet) >= 2:
            outcome.quiet_p99_ms = statistics.quantiles(quiet, n=100)[98] * 1000
        if len(during) >= 2:
            outcome.fast_p50_ms = statistics.median(during) * 1000
            outcome.fast_p99_ms = statistics.quantiles(during, n=100)[98] * 1000
    finally:
        server.stop(args.stop_grace)
    return outcome


def start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    (tmp / "redis").mkdir()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                             "--appendonly", "no", "--dir", str(tmp / "redis")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_in_use(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise BenchError("redis-server did not start")
        time.sleep(0.05)
    return proc


def render(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    titles = {"routes": "`/tast` group, `max_pending = 8`",
              "queue": "queue: RQ, 2 consumers",
              "shared": "one shared pool, no routes"}
    lines = ["| layout | accepted | shed (503) | last result | fast page p50 | fast page p99 "
             "| p99 before the burst |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for o in outcomes:
        lines.append(f"| {titles[o.layout]} | {o.accepted} | {o.shed} | "
                     f"{o.last_result_s:.1f} s | {o.fast_p50_ms:.2f} ms | "
                     f"{o.fast_p99_ms:.2f} ms | {o.quiet_p99_ms:.2f} ms |"
                     + (f" ({'; '.join(o.notes)})" if o.notes else ""))
    lines.append("")
    lines.append(f"A burst of {args.burst} requests at once, {args.seconds:g} s of work each, "
                 "4 app workers per layout, while one keep-alive client asks for the fast "
                 f"page; failed answers: {', '.join(str(o.failed) for o in outcomes)}. "
                 f"{machine()}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layout", action="append", choices=LAYOUTS,
                   help="layout to run (repeatable; default: all)")
    p.add_argument("--burst", type=int, default=200, help="slow requests sent at once")
    p.add_argument("--seconds", type=float, default=0.2, help="work per slow request")
    p.add_argument("--quiet", type=float, default=1.0,
                   help="seconds of fast-page requests before the burst")
    p.add_argument("--limit", type=float, default=300.0,
                   help="seconds to wait for the queue's last result")
    p.add_argument("--port", type=int, default=18280)
    p.add_argument("--redis-port", type=int, default=18281)
    p.add_argument("--fastpool-python", default=sys.executable)
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--stop-grace", type=float, default=15.0)
    p.add_argument("--json", type=Path, metavar="PATH")
    p.add_argument("--workdir", type=Path, metavar="DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("redis-server") is None:
        print("error: redis-server not found", file=sys.stderr)
        return 2
    layouts = [layout for layout in LAYOUTS if not args.layout or layout in args.layout]
    outcomes = []
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-deferred-")
        redis = start_redis(tmp, args.redis_port)
        stack.callback(redis.terminate)
        for layout in layouts:
            print(f"{layout} ...", flush=True)
            outcomes.append(run_layout(layout, args, tmp,
                                       f"redis://{HOST}:{args.redis_port}/0"))
    print()
    print(render(outcomes, args))
    print(f"\n`{' '.join(['python', 'bench/deferred.py', *(argv or sys.argv[1:])])}`")
    if args.json:
        write_json(args.json, {"settings": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine(),
                               "outcomes": [asdict(o) for o in outcomes]})
    return 0


if __name__ == "__main__":
    run_main(main)

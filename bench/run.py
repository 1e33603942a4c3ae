"""Throughput benchmark: fastpool against other Python servers, with nginx as a reference.

Two suites, one per run (``--interface``):

* ``wsgi`` (the default): fastpool's WSGI worker against gunicorn, uvicorn, granian (WSGI),
  bjoern and nginx, on every scenario.
* ``asgi``: fastpool's ASGI worker (``fastpool-asgi``) against uvicorn (``uvicorn-asgi``,
  httptools) and granian (``granian-asgi``, ``--interface asgi``), all on the same event
  loop (``--loop``, default uvloop), on hello keep-alive, pipelined, 4 KiB JSON and 1 KiB
  POST echo unless ``--scenario`` picks others; a summary gives fastpool-asgi's req/s
  divided by each peer's and each peer's CPU per request divided by fastpool-asgi's.

Rules this harness keeps:

* In the WSGI suite every server serves the same app behaviour from ``bench/apps.py`` (WSGI
  ``apps:app``; uvicorn, being ASGI-only, serves ``apps:asgi_app``, which sends the same
  bytes; nginx answers the fixed routes with ``return 200 '...'`` and cannot echo, so it is
  left out of the echo scenarios). In the ASGI suite every server serves the same
  single-purpose app of ``bench/apps_asgi.py`` per scenario (``Scenario.app``), started
  once per app. Every server gets the same worker count (``--workers``, default 1).
* The server and all its processes are pinned to one set of CPUs (``taskset -c``, default
  core 0) and wrk to another (default core 1), so client and server never share a core.
* A peer that its interpreter cannot import (or, for nginx, that is not on disk) is
  skipped with a line saying so; only the absence of the suite's fastpool (``fastpool`` or
  ``fastpool-asgi``) is an error, unless ``--server`` leaves it out.
* Every server is waited for with a deadline (polled until a request succeeds, never a
  fixed sleep) and then checked for correctness once -- exact bodies, echo, pipelining,
  ``Connection: close`` -- before anything is measured, and again after each scenario's
  load; a server failing a check is not measured.
* Each scenario gets a short warm-up run (discarded) and then ``--runs`` measured runs of
  ``--duration`` seconds; req/s, p50 and p99 are each the median over those runs.
* Every measured run is costed (``common.costing``): the server's CPU time per request (user
  + system of its whole process tree) and wrk's CPU share; a run with wrk above 85 % of its
  core is flagged client-bound (its req/s is a floor). Ratios between servers are given on
  req/s and on CPU per request, and the targets (``TARGETS``) are checked on the measures
  each names: printed, not asserted.
* Every server runs in its own process group and is stopped with SIGTERM to the whole
  group, then SIGKILL after a grace period; this happens in ``finally`` blocks, so Ctrl-C,
  SIGTERM or an exception never leaves a server running.
* Standard library only; the exact server and wrk command lines are printed under the
  tables, and ``--json PATH`` saves every run's numbers and raw wrk output.

Starting, waiting for and stopping servers, the HTTP checks' client, wrk's parser and the
medians of a scenario's runs live in ``common.py``, shared with the other harnesses.

Usage (see bench/README.md)::

    python bench/run.py --peer-python /path/to/peers-venv/bin/python
    python bench/run.py --interface asgi --peer-python /path/to/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    HOST,
    BenchError,
    Response,
    Result,
    Server,
    Target,
    add_load_options,
    check_targets,
    check_tools,
    client_bound_line,
    cost_note,
    costed_run,
    exchange,
    harness_start,
    http_request,
    interpreter_path,
    load_apps,
    load_summary,
    machine,
    measure_scenarios,
    nginx_app_locations,
    nginx_head,
    pin,
    port_in_use,
    python_version,
    require_positive,
    require_warmup,
    result_table,
    run_main,
    settings,
    target_lines,
    work_dir,
    write_json,
)

WRK_SCRIPTS = BENCH / "wrk"
APPS = load_apps()
HELLO: bytes = APPS.HELLO
JSON_BODY: bytes = APPS.JSON_BODY


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
    app: str | None = None  # ASGI suite: the apps_asgi attribute served (None: WSGI suite)


# The ASGI suite: which apps_asgi app serves each scenario, and what runs by default.
ASGI_APPS = {"hello": "hello", "pipeline": "hello", "json": "json", "post-1k": "echo",
             "post-64k": "echo", "close": "hello"}
ASGI_DEFAULT_SCENARIOS = ("hello", "pipeline", "json", "post-1k")
# What the performance issue asks for, with 1 worker pinned to one core: fastpool-asgi at
# least 1.5x granian and 2.5x uvicorn on req/s and on CPU per request in every default
# scenario; the WSGI worker's hello at most nginx's `return 200` and bjoern's CPU per
# request (their req/s are a reference only).
TARGETS = {
    "asgi": [Target(s, peer, least) for s in ASGI_DEFAULT_SCENARIOS
             for peer, least in (("granian-asgi", 1.5), ("uvicorn-asgi", 2.5))],
    "wsgi": [Target("hello", peer, 1.0, on=("cpu",)) for peer in ("nginx", "bjoern")],
}


def make_scenarios(depth: int, interface: str = "wsgi") -> list[Scenario]:
    scenarios = _scenarios(depth)
    if interface == "asgi":
        scenarios = [replace(s, app=ASGI_APPS[s.name]) for s in scenarios]
    return scenarios


def _scenarios(depth: int) -> list[Scenario]:
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
    interface: str = "wsgi"  # the suite it belongs to


SERVER_KINDS = [
    ServerKind("fastpool", "fastpool", "fastpool"),
    ServerKind("gunicorn", "gunicorn", "gunicorn", note="gthread worker"),
    ServerKind("uvicorn", "uvicorn", "uvicorn", ("uvloop", "httptools"),
               note="ASGI app (`apps:asgi_app`, same bytes); httptools + uvloop"),
    ServerKind("granian", "granian", "granian", note="WSGI interface"),
    ServerKind("bjoern", "bjoern", "bjoern", note="via bench/bjoern_serve.py"),
    ServerKind("nginx", None, None, echo=False,
               note="reference, not Python: `return 200 '...'`; no echo"),
    ServerKind("fastpool-asgi", "fastpool", "fastpool", ("fastpool._asgi",),
               note="`--interface asgi`", interface="asgi"),
    ServerKind("uvicorn-asgi", "uvicorn", "uvicorn", ("httptools",),
               note="httptools", interface="asgi"),
    ServerKind("granian-asgi", "granian", "granian",
               note="`--interface asgi --http 1 --no-ws`", interface="asgi"),
]
SERVER_NAMES = [k.name for k in SERVER_KINDS]
INTERFACES = ("wsgi", "asgi")
BASE = {"wsgi": "fastpool", "asgi": "fastpool-asgi"}  # each suite's ratios are against this


@dataclass
class Available:
    kind: ServerKind
    python: str | None
    version: str


def probe(kind: ServerKind, python: str | None, nginx: str,
          extra: tuple[str, ...] = ()) -> Available | str:
    """An ``Available`` if ``kind`` can be run (importing ``extra`` too), else the reason."""
    if kind.module is None:
        path = shutil.which(nginx) or (nginx if os.access(nginx, os.X_OK) else None)
        if path is None:
            return f"{nginx} not found"
        out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
        version = out.stderr.strip().rpartition("/")[2] or "?"
        return Available(kind, path, version)
    assert python is not None and kind.dist is not None
    try:
        version = python_version(python, [kind.module, *kind.extra_imports, *extra],
                                 kind.dist)
    except BenchError as exc:
        return str(exc)
    return Available(kind, python, version)


def nginx_conf(tmp: Path, port: int, workers: int) -> str:
    return f"""{nginx_head(tmp, workers, user=False)}
    server {{
        listen {HOST}:{port} backlog=2048;
{nginx_app_locations(HELLO, JSON_BODY)}    }}
}}
"""


def server_command(av: Available, args: argparse.Namespace, tmp: Path,
                   app: str | None = None) -> list[str]:
    """The command line (without taskset) that starts ``av`` on ``args.port``.

    ``app``: the ``apps_asgi`` attribute an ASGI-suite server serves.
    """
    name, py, port, workers = av.kind.name, av.python or "", str(args.port), str(args.workers)
    target = f"apps_asgi:{app}"
    if name == "fastpool-asgi":
        return [py, "-m", "fastpool", "serve", target, "--host", HOST, "--port", port,
                "--workers", workers, "--interface", "asgi", "--loop", args.loop]
    if name == "uvicorn-asgi":
        return [py, "-m", "uvicorn", target, "--host", HOST, "--port", port,
                "--workers", workers, "--http", "httptools", "--loop", args.loop,
                "--no-access-log", "--log-level", "warning"]
    if name == "granian-asgi":
        return [py, "-m", "granian", "--interface", "asgi", "--host", HOST, "--port", port,
                "--workers", workers, "--loop", args.loop, "--http", "1", "--no-ws",
                "--log-level", "warning", target]
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


# --------------------------------------------------------------------------- HTTP checks


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


# --------------------------------------------------------------------------- results


def render(scenarios: list[Scenario], results: dict[tuple[str, str], Result],
           servers: list[Available], args: argparse.Namespace) -> str:
    out: list[str] = []
    for scenario in scenarios:
        rows = [results[(scenario.name, av.kind.name)] for av in servers
                if (scenario.name, av.kind.name) in results]
        if not rows:
            continue
        base_name = BASE[args.interface]
        title = scenario.title + (f", `apps_asgi:{scenario.app}`" if scenario.app else "")
        out.append(f"### {scenario.name}: {title}\n")
        out += result_table(rows, base_name, results.get((scenario.name, base_name)),
                            costs=True)
        if scenario.name == "pipeline":
            out.append(f"\nwrk times a pipelined batch of {args.depth} as one sample, so p50/p99 "
                       "here are per batch; `?` is a percentile wrk printed as 0.\n")
        else:
            out.append("")
    base = BASE[args.interface]
    if args.interface == "asgi":
        out.append(render_asgi_summary(scenarios, results, servers))
    out += target_lines(check_targets(TARGETS[args.interface], results, base), base, args,
                        "the performance issue")
    notes = [f"- {av.kind.name} {av.version}" + (f": {av.kind.note}" if av.kind.note else "")
             + (f", `--threads {args.gunicorn_threads}`" if av.kind.name == "gunicorn" else "")
             + (f", `--loop {args.loop}`" if av.kind.interface == "asgi" else "")
             for av in servers]
    out.append(f"{load_summary(args)}. {cost_note(base)}. "
               f"{client_bound_line(results.values())} {machine()}.\n")
    out.append("Notes:\n" + "\n".join(notes) + "\n")
    return "\n".join(out)


def asgi_ratios(scenarios: list[Scenario], results: dict[tuple[str, str], Result],
                servers: list[Available]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{scenario: {peer: {"rps": fastpool-asgi req/s ÷ peer's, "cpu": peer CPU/req ÷
    fastpool-asgi's}}}, None where either is missing."""
    base = BASE["asgi"]
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for s in scenarios:
        mine = results.get((s.name, base))
        row: dict[str, dict[str, float | None]] = {}
        for av in servers:
            if av.kind.name == base:
                continue
            peer = results.get((s.name, av.kind.name))
            if mine is None or peer is None:
                row[av.kind.name] = {"rps": None, "cpu": None}
            else:
                row[av.kind.name] = {"rps": mine.rps_ratio(peer), "cpu": mine.cpu_ratio(peer)}
        out[s.name] = row
    return out


def render_asgi_summary(scenarios: list[Scenario], results: dict[tuple[str, str], Result],
                        servers: list[Available]) -> str:
    """One table: each server's req/s and CPU/req per scenario, and fastpool-asgi's
    advantage over each peer on both."""
    base = BASE["asgi"]
    ratios = asgi_ratios(scenarios, results, servers)
    peers = [av.kind.name for av in servers if av.kind.name != base]
    head = ["scenario"]
    for av in servers:
        head += [f"{av.kind.name} req/s", "CPU/req"]
    for peer in peers:
        head += [f"÷ {peer} req/s", "on CPU/req"]
    out = [f"### Summary: {base} against its peers\n",
           "| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for s in scenarios:
        cells = [s.name]
        for av in servers:
            r = results.get((s.name, av.kind.name))
            cells += ([f"{r.rps:,.0f}" + (" (client-bound)" if r.client_bound else ""),
                       r.cpu_cell()] if r is not None and r.runs else ["—", "—"])
        for peer in peers:
            cells += ["—" if (x := ratios[s.name][peer][m]) is None else f"{x:.2f}"
                      for m in ("rps", "cpu")]
        out.append("| " + " | ".join(cells) + " |")
    out.append(f"\n÷ peer: {base}'s req/s ÷ the peer's, and the peer's CPU per request ÷ "
               f"{base}'s (above 1 {base} does better).\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark fastpool against gunicorn, uvicorn, granian, bjoern and nginx "
                    "(WSGI suite), or fastpool's ASGI worker against uvicorn and granian "
                    "(--interface asgi).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--interface", choices=INTERFACES, default="wsgi",
                   help="the suite: wsgi (fastpool, gunicorn, uvicorn, granian, bjoern, nginx) "
                        "or asgi (fastpool-asgi, uvicorn-asgi, granian-asgi)")
    p.add_argument("--scenario", action="append", choices=SCENARIO_NAMES,
                   help="scenario to run (repeatable; default: all for wsgi, "
                        f"{', '.join(ASGI_DEFAULT_SCENARIOS)} for asgi)")
    p.add_argument("--server", action="append", choices=SERVER_NAMES,
                   help="server of the suite to run (repeatable; default: all that are "
                        "installed)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop of every server in the asgi suite (their --loop)")
    add_load_options(
        p, port=18080,
        peer_python_help="interpreter that runs gunicorn, uvicorn, granian and bjoern (and "
                         "their -asgi entries)",
        workdir_help="keep server logs and nginx.conf here (default: a temporary directory)",
        before={"--workers": lambda p: p.add_argument(
                    "--depth", type=int, default=16, help="requests per write when pipelining"),
                "--nginx": lambda p: p.add_argument(
                    "--python", action="append", default=[], metavar="SERVER=PATH",
                    help="interpreter for one server, overriding the two above (repeatable)")})
    args = p.parse_args(argv)
    require_positive(p, args, "runs", "duration", "connections", "depth", "workers")
    require_warmup(p, args)
    for item in args.python:
        name, sep, _ = item.partition("=")
        if not sep or name not in SERVER_NAMES:
            p.error(f"--python wants SERVER=PATH with SERVER one of {SERVER_NAMES}: {item!r}")
    suite = [k.name for k in SERVER_KINDS if k.interface == args.interface]
    for name in args.server or ():
        if name not in suite:
            p.error(f"--server {name} is not in the {args.interface} suite ({', '.join(suite)});"
                    " see --interface")
    if args.interface == "asgi" and not args.scenario:
        args.scenario = list(ASGI_DEFAULT_SCENARIOS)
    return args


def interpreter(name: str, args: argparse.Namespace) -> str | None:
    overrides = dict(item.split("=", 1) for item in args.python)
    if name in overrides:
        return interpreter_path(overrides[name])
    if name == "nginx":
        return None
    return args.fastpool_python if name.startswith("fastpool") else args.peer_python


Commands = dict[tuple[str, str | None], str]  # (server, app) -> its command line


def bench_server(av: Available, scenarios: list[Scenario], args: argparse.Namespace,
                 tmp: Path, results: dict[tuple[str, str], Result],
                 commands: Commands) -> None:
    """Measure ``av`` on ``scenarios``: one start for the WSGI suite, one per app for ASGI."""
    name = av.kind.name
    mine = [s for s in scenarios if av.kind.echo or not s.echo]
    for s in scenarios:
        if s not in mine:
            print(f"  {name}: skipping {s.name} (no echo endpoint)")
    by_app: dict[str | None, list[Scenario]] = {}
    for s in mine:
        by_app.setdefault(s.app, []).append(s)
    for app, group in by_app.items():
        bench_app(av, app, group, args, tmp, results, commands)


def bench_app(av: Available, app: str | None, mine: list[Scenario],
              args: argparse.Namespace, tmp: Path, results: dict[tuple[str, str], Result],
              commands: Commands) -> None:
    """Start ``av`` serving ``app``, check it, measure ``mine``, stop it."""
    name = av.kind.name
    label = name if app is None else f"{name} (apps_asgi:{app})"
    if port_in_use(args.port):
        raise BenchError(f"port {args.port} is already in use; pass --port")
    cmd = pin(args.server_cpus, args) + server_command(av, args, tmp, app)
    commands[(name, app)] = (f"PYTHONPATH={BENCH} " * (av.kind.module is not None)
                             + shlex.join(cmd))
    server = Server(label, cmd, tmp / (f"{name}.log" if app is None else f"{name}-{app}.log"))

    measure_scenarios(
        server, name, label, mine, args,
        check=lambda group: check_server(args.port, group, args.depth),
        result=lambda s: results.setdefault((s.name, name), Result(s.name, name)),
        wrk_command=lambda s, duration: wrk_command(args, s, duration),
        run=costed_run(server))


def server_json(av: Available, commands: Commands) -> dict[str, Any]:
    """A server's entry in the JSON file: ``command`` (WSGI), or ``commands`` per app (ASGI)."""
    out: dict[str, Any] = {"version": av.version, "note": av.kind.note}
    if av.kind.interface == "asgi":
        out["commands"] = {f"apps_asgi:{app}": cmd for (name, app), cmd in commands.items()
                           if name == av.kind.name}
    else:
        out["command"] = commands.get((av.kind.name, None))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness_start(argv, announce=False)
    scenarios = [s for s in make_scenarios(args.depth, args.interface)
                 if not args.scenario or s.name in args.scenario]
    if not check_tools(args):
        return 2

    servers: list[Available] = []
    base = BASE[args.interface]
    for kind in SERVER_KINDS:
        if kind.interface != args.interface or (args.server and kind.name not in args.server):
            continue
        nginx = args.nginx
        if shutil.which(nginx) is None and nginx == "nginx":
            nginx = "/usr/sbin/nginx"
        loop = ("uvloop",) if kind.interface == "asgi" and args.loop == "uvloop" else ()
        found = probe(kind, interpreter(kind.name, args), nginx, loop)
        if isinstance(found, str):
            if kind.name == base:
                print(f"error: {base}: {found}; pass --fastpool-python"
                      + (", or --server to run the peers alone" if base != "fastpool" else ""),
                      file=sys.stderr)
                return 2
            print(f"skipping {kind.name}: {found}")
            continue
        servers.append(found)

    results: dict[tuple[str, str], Result] = {}
    commands: Commands = {}
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-bench-")
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
    for (name, app), cmd in commands.items():
        served = ", ".join(s.name for s in scenarios if s.app == app)
        print(f"# {name}" + (f" (apps_asgi:{app}: {served})" if app else "") + f"\n{cmd}")
    for s in scenarios:
        print(f"# wrk: {s.name}\n{shlex.join(wrk_command(args, s, args.duration))}")
    print("```")
    if args.json:
        payload: dict[str, Any] = {
            "settings": settings(args),
            "machine": machine(),
            "servers": {av.kind.name: server_json(av, commands) for av in servers},
            "nginx_conf": nginx_text,
            "wrk_commands": {s.name: shlex.join(wrk_command(args, s, args.duration))
                             for s in scenarios},
            "results": [r.to_json() for r in results.values()],
            "targets": check_targets(TARGETS[args.interface], results, base),
        }
        if args.interface == "asgi":
            payload["asgi_ratios"] = asgi_ratios(scenarios, results, servers)
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    run_main(main)


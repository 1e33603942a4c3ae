"""Real frameworks: what a user of Flask, Django, FastAPI or Starlette sees from each server.

The apps are in ``bench/frameworks_apps/`` (one module per framework, the same data):

* ``flask/json``: Flask, ``GET /json``, a dict returned from a view (Flask's JSON provider);
* ``flask/page``: Flask, ``GET /page``, ``render_template`` of a Jinja2 template (20 rows);
* ``django/json``: Django, ``GET /json``, ``JsonResponse``, through ``startproject``'s
  default middleware (security, sessions, common, CSRF, auth, messages, clickjacking),
  settings configured in code, no database;
* ``django/page``: Django, ``GET /page``, ``render`` of the same page (cached loader);
* ``fastapi/model``: FastAPI, ``POST /orders`` with a 756-byte JSON body validated into a
  Pydantic model (nested items) and returned through ``response_model``;
* ``starlette/json``: Starlette, ``GET /json``, a ``JSONResponse``.

Servers, one worker each (``--workers``): ``fastpool`` (the WSGI worker for Flask and
Django, ``--interface asgi --loop uvloop`` for FastAPI and Starlette), ``gunicorn``
(``gthread`` for WSGI; for ASGI its ``uvicorn.workers.UvicornWorker`` when the peer
interpreter has it, else skipped with a line saying so), ``uvicorn`` (ASGI only; httptools
+ uvloop; the WSGI apps are skipped: uvicorn's WSGI adapter is deprecated) and ``granian``
(``--interface wsgi`` or ``asgi``, ``--http 1 --no-ws``, ASGI on uvloop).

Rules, as in run.py and tls.py: the server (all its processes) is pinned to CPU 0 and wrk to
CPU 1; every server is waited for with a deadline and checked (per case, the request twice
on one keep-alive connection: status 200 and the exact body of
``frameworks_apps.expected_body``) before anything is measured and again after each case's
load; a failing check means not measured. A 1 s warm-up, then ``--runs`` runs of
``--duration`` s, medians; beside wrk's figures the server's CPU per request (its whole
process tree, from /proc) and wrk's CPU use, as in tls.py. A framework or server that an
interpreter cannot import is skipped with a line saying so.

``--profile``: instead of wrk, fastpool alone under callgrind (the machinery of
instructions.py: a pair of runs with N and N + E requests from a sequential client, the
difference per request), per case, grouped by object file: how much of a request's
user-space instructions are fastpool's own compiled code (its ``_http``, ``_wsgi``,
``_asgi``, ``_worker`` ... extension modules), the interpreter's (libpython, or the
``python`` executable when it is linked statically), and the rest (the framework's own
extensions, uvloop, libc). Beside each, fastpool's whole cost with a trivial app (the
``hello`` of instructions.py, same interface) as a share of the case: the upper bound of
what the server can weigh in that case (it includes the interpreter's work on fastpool's
behalf, which no object file separates). Shares above ``FINDING_SHARE`` are listed as
findings.

Standard library only (the apps need their frameworks in both interpreters). Usage::

    python bench/frameworks.py --peer-python /work/peers-venv/bin/python
    python bench/frameworks.py --profile
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import frameworks_apps
from common import (
    BENCH,
    CLIENT_BOUND,
    HOST,
    BenchError,
    Result,
    Server,
    WrkRun,
    add_load_options,
    check_tools,
    costing,
    exchange,
    harness_start,
    http_request,
    load_summary,
    machine,
    measure_scenarios,
    pin,
    port_in_use,
    python_version,
    require_positive,
    require_warmup,
    result_table,
    run_main,
    run_wrk,
    settings,
    work_dir,
    write_json,
)

WRK_SCRIPTS = BENCH / "wrk"
BASE = "fastpool"
# A case where fastpool's own compiled code runs more than this share of a request's
# instructions is a finding (the framework is expected to dominate).
FINDING_SHARE = 0.10


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Framework:
    name: str
    target: str  # module:attribute, importable from bench/
    interface: str  # wsgi or asgi
    imports: tuple[str, ...]  # what an interpreter must import to serve it
    dist: str  # whose version is reported


FRAMEWORKS = {f.name: f for f in [
    Framework("flask", "frameworks_apps.flask_app:app", "wsgi", ("flask", "jinja2"), "flask"),
    Framework("django", "frameworks_apps.django_app:application", "wsgi", ("django",),
              "django"),
    Framework("fastapi", "frameworks_apps.fastapi_app:app", "asgi", ("fastapi", "pydantic"),
              "fastapi"),
    Framework("starlette", "frameworks_apps.starlette_app:app", "asgi", ("starlette",),
              "starlette"),
]}


@dataclass(frozen=True)
class Case:
    name: str  # framework/kind
    framework: str
    path: str
    title: str
    post: bool = False  # POST the order (frameworks_apps.ORDER_BODY) as JSON

    @property
    def body(self) -> bytes:
        """The exact body of the answer."""
        return frameworks_apps.expected_body(self.framework, self.path)

    def request(self, port: int) -> bytes:
        if self.post:
            return http_request("POST", self.path, port, frameworks_apps.ORDER_BODY,
                                content_type="application/json")
        return http_request("GET", self.path, port)


CASES = [
    Case("flask/json", "flask", "/json", "Flask, GET /json (a dict from the view)"),
    Case("flask/page", "flask", "/page", "Flask, GET /page (Jinja2 template, 20 rows)"),
    Case("django/json", "django", "/json",
         "Django, GET /json (JsonResponse, default middleware)"),
    Case("django/page", "django", "/page",
         "Django, GET /page (template, 20 rows, default middleware)"),
    Case("fastapi/model", "fastapi", "/orders",
         f"FastAPI, POST /orders ({len(frameworks_apps.ORDER_BODY)}-byte JSON body "
         "validated into a Pydantic model and returned)", post=True),
    Case("starlette/json", "starlette", "/json", "Starlette, GET /json (JSONResponse)"),
]
CASE_NAMES = [c.name for c in CASES]


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerKind:
    name: str
    python: str  # "fastpool" or "peer": which interpreter
    interfaces: tuple[str, ...]
    imports: tuple[str, ...]
    dist: str
    note: str
    asgi_imports: tuple[str, ...] = ()  # more imports for the ASGI cases


SERVER_KINDS = [
    ServerKind("fastpool", "fastpool", ("wsgi", "asgi"), ("fastpool",), "fastpool",
               "WSGI worker; ASGI: `--interface asgi --loop uvloop`",
               ("fastpool._asgi", "uvloop")),
    ServerKind("gunicorn", "peer", ("wsgi", "asgi"), ("gunicorn",), "gunicorn",
               "`-k gthread --threads 1`; ASGI: `-k uvicorn.workers.UvicornWorker`",
               ("uvicorn.workers", "uvloop", "httptools")),
    ServerKind("uvicorn", "peer", ("asgi",), ("uvicorn", "uvloop", "httptools"), "uvicorn",
               "ASGI only: `--http httptools --loop uvloop`"),
    ServerKind("granian", "peer", ("wsgi", "asgi"), ("granian",), "granian",
               "`--interface wsgi` / `--interface asgi --loop uvloop`, `--http 1 --no-ws`"),
]
SERVER_NAMES = [k.name for k in SERVER_KINDS]


@dataclass
class Available:
    kind: ServerKind
    python: str
    version: str


def interpreter(kind: ServerKind, args: argparse.Namespace) -> str:
    return args.fastpool_python if kind.python == "fastpool" else args.peer_python


def probe(kind: ServerKind, args: argparse.Namespace) -> Available | str:
    try:
        version = python_version(interpreter(kind, args), list(kind.imports), kind.dist)
    except BenchError as exc:
        return str(exc)
    return Available(kind, interpreter(kind, args), version)


def skip_reason(av: Available, fw: Framework, args: argparse.Namespace,
                versions: dict[tuple[str, str], str]) -> str | None:
    """Why ``av`` cannot serve ``fw`` (None: it can); ``versions`` caches the framework's
    version per interpreter ("?" when that interpreter cannot import it)."""
    if fw.interface not in av.kind.interfaces:
        return f"{av.kind.name} serves no {fw.interface.upper()} app here"
    extra = av.kind.asgi_imports if fw.interface == "asgi" else ()
    try:
        python_version(av.python, [*av.kind.imports, *extra], av.kind.dist)
    except BenchError as exc:
        return f"{' '.join(extra) or av.kind.name}: {exc}"
    key = (av.python, fw.name)
    if key not in versions:
        try:
            versions[key] = python_version(av.python, list(fw.imports), fw.dist)
        except BenchError as exc:
            versions[key] = "?"
            return f"{fw.name}: {exc}"
    return None if versions[key] != "?" else f"{fw.name} not importable by {av.python}"


def server_command(av: Available, fw: Framework, args: argparse.Namespace,
                   tmp: Path) -> list[str]:
    """The command line (without taskset) that serves ``fw`` with ``av`` on ``args.port``."""
    name, py, port, workers = av.kind.name, av.python, str(args.port), str(args.workers)
    asgi = fw.interface == "asgi"
    if name == "fastpool":
        return [py, "-m", "fastpool", "serve", fw.target, "--host", HOST, "--port", port,
                "--workers", workers, "--control-socket", str(tmp / "fastpool.sock"),
                *(["--interface", "asgi", "--loop", "uvloop"] if asgi else [])]
    if name == "gunicorn":
        worker = ["-k", "uvicorn.workers.UvicornWorker"] if asgi else [
            "-k", "gthread", "--threads", str(args.gunicorn_threads)]
        return [py, "-m", "gunicorn", *worker, "--workers", workers,
                "--bind", f"{HOST}:{port}", "--log-level", "warning", fw.target]
    if name == "uvicorn":
        return [py, "-m", "uvicorn", fw.target, "--host", HOST, "--port", port,
                "--workers", workers, "--http", "httptools", "--loop", "uvloop",
                "--no-access-log", "--log-level", "warning"]
    if name == "granian":
        return [py, "-m", "granian", "--interface", fw.interface, "--host", HOST,
                "--port", port, "--workers", workers,
                *(["--loop", "uvloop"] if asgi else []), "--http", "1", "--no-ws",
                "--log-level", "warning", fw.target]
    raise AssertionError(name)


def check_server(port: int, cases: list[Case]) -> dict[str, str]:
    """{case: why its check failed}: the case's request twice on one keep-alive
    connection, each answered 200 with exactly the expected body."""
    failures = {}
    for c in cases:
        try:
            request = c.request(port)
            for i, answer in enumerate(exchange(port, [request, request])):
                if answer.status != 200:
                    raise BenchError(f"answer {i + 1}: status {answer.status}, "
                                     f"body {answer.body[:80]!r}")
                if answer.body != c.body:
                    raise BenchError(f"answer {i + 1}: {len(answer.body)}-byte body differs "
                                     f"from the expected {len(c.body)} bytes (starts "
                                     f"{answer.body[:60]!r})")
        except (BenchError, OSError) as exc:
            failures[c.name] = f"{type(exc).__name__}: {exc}"
    return failures


def wrk_command(args: argparse.Namespace, c: Case, duration: int, order_file: Path) -> list[str]:
    cmd = [args.wrk, f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{duration}s",
           "--latency"]
    url = f"http://{HOST}:{args.port}{c.path}"
    if c.post:
        cmd += ["-s", str(WRK_SCRIPTS / "post_json.lua"), url, "--", str(order_file)]
    else:
        cmd.append(url)
    return pin(args.wrk_cpus, args) + cmd


# --------------------------------------------------------------------------- results


def render(results: dict[tuple[str, str], Result], cases: list[Case], servers: list[str],
           args: argparse.Namespace, skipped: list[str], notes: list[str]) -> str:
    out: list[str] = []
    for c in cases:
        rows = [results[(c.name, s)] for s in servers if (c.name, s) in results]
        if not rows:
            continue
        base = results.get((c.name, BASE))
        out.append(f"### {c.name}: {c.title}\n")

        out += result_table(rows, BASE, base, costs=True)
        out.append("")
    out.append("### Summary: req/s (server CPU per request)\n")
    out.append("| case | " + " | ".join(servers) + " | fastpool ÷ peer, req/s "
               "| peer ÷ fastpool, CPU/req |")
    out.append("|---|" + "---:|" * len(servers) + "---|---|")
    for c in cases:
        cells, rps_ratios, cpu_ratios = [], [], []
        base = results.get((c.name, BASE))
        for s in servers:
            r = results.get((c.name, s))
            if r is None:
                cells.append("—")
            elif not r.runs:
                cells.append("failed")
            else:
                cells.append(f"{r.rps:,.0f} ({r.cpu_us:,.0f} µs)"
                             + (" ¹" if r.client_bound else ""))
                if s != BASE and base is not None and base.runs:
                    rps_ratios.append(f"{s} {base.rps / r.rps:.2f}")
                    if base.cpu_us == base.cpu_us and r.cpu_us == r.cpu_us:
                        cpu_ratios.append(f"{s} {r.cpu_us / base.cpu_us:.2f}")
        out.append(f"| {c.name} | " + " | ".join(cells) + f" | {', '.join(rps_ratios) or '—'}"
                   f" | {', '.join(cpu_ratios) or '—'} |")
    out.append("")
    out.append(f"{load_summary(args)}. CPU/req: the server's process tree's CPU time (user + "
               f"system) per request; in the tables per case the two 'vs {BASE}' columns "
               f"read as in tls.py (above 1 the server does better than {BASE}), in the summary "
               f"the ratios are the other way up (above 1 {BASE} does better); ¹ client-bound "
               "(wrk above "
               f"{CLIENT_BOUND:.0%} of its core: the req/s is a floor). {machine()}.\n")
    out.append("Notes:\n" + "\n".join(f"- {n}" for n in notes + skipped) + "\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- --profile


def fastpool_objects(python: str) -> set[str]:
    """The file names of fastpool's compiled extension modules, as ``python`` imports them."""
    code = ("import pathlib, fastpool\n"
            "for p in pathlib.Path(fastpool.__file__).parent.glob('*.so'): print(p.name)\n")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                         cwd=BENCH)
    return set(out.stdout.split())


def parser_object(name: str) -> bool:
    """Whether callgrind's object ``name`` is httptools' ``parser`` module, whose llhttp
    fastpool loads and calls (nothing else in fastpool's worker uses it)."""
    return name.startswith("parser.")


def interpreter_object(name: str) -> bool:
    """Whether callgrind's object ``name`` is the interpreter (libpython, or a ``python``
    executable with the interpreter linked in)."""
    return name.startswith(("libpython", "python"))


def profile_case(instructions: Any, iargs: argparse.Namespace, av: Any, request: Any,
                 tmp: Path, annotate_tool: str) -> dict[str, Any]:
    """One case under callgrind: per-request Ir, and the first pair's Ir per object."""
    result = instructions.Result(av.kind.name, request.name)
    instructions.measure(av, request, iargs, tmp, result)
    bd = instructions.breakdown(result.pairs[0], 0, annotate_tool)
    return {"per_request": result.per_request(), "mean": result.mean(),
            "objects": bd["objects"], "total_first_pair": bd["total_per_request"],
            "command": result.command}


def profile(args: argparse.Namespace, cases: list[Case]) -> int:
    """``--profile``: fastpool's share of each case's instructions (see the docstring)."""
    import shutil
    import tempfile

    import instructions  # bench/instructions.py: its client, runs, pairs and breakdown

    annotate_tool = shutil.which("callgrind_annotate")
    if shutil.which("valgrind") is None or annotate_tool is None:
        print("error: valgrind and callgrind_annotate are needed", file=sys.stderr)
        return 2
    iargs = instructions.parse_args([
        "--warm", str(args.warm), "--extra", str(args.extra), "--repeat", str(args.repeat),
        "--port", str(args.port), "--fastpool-python", args.fastpool_python,
        "--start-timeout", str(max(args.start_timeout, 300.0))])
    kinds = {k.name: k for k in instructions.SERVER_KINDS}
    wsgi, asgi = kinds["fastpool-wsgi"], kinds["fastpool-asgi-uvloop"]
    ours = fastpool_objects(args.fastpool_python)
    print(f"fastpool's objects: {', '.join(sorted(ours))}")
    host = instructions.HOST_HEADER
    todo: list[tuple[str, Any, Any]] = []  # (label, server kind, RequestKind)
    for iface, kind in (("wsgi", wsgi), ("asgi", asgi)):
        if any(FRAMEWORKS[c.framework].interface == iface for c in cases):
            todo.append((f"baseline/{iface}", kind, instructions.REQUESTS["hello"]))
    for c in cases:
        fw = FRAMEWORKS[c.framework]
        write = c.request(0).replace(f"Host: {HOST}:0".encode(), f"Host: {host}".encode())
        request = instructions.RequestKind(c.name.replace("/", "-"), c.title, write, 1,
                                           c.body, "hello", app=fw.target)
        todo.append((c.name, wsgi if fw.interface == "wsgi" else asgi, request))
    figures: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-frameworks-profile-")
        if args.workdir is not None and any(tmp.iterdir()):
            print(f"error: --workdir {tmp} is not empty (the runs' directories must be "
                  "new)", file=sys.stderr)
            return 2
        iargs.control_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fpf-")))
        for label, kind, request in todo:
            av = instructions.Available(kind, args.fastpool_python, "")
            print(f"{label} ({time.monotonic() - started:.0f} s)", flush=True)
            try:
                figures[label] = profile_case(instructions, iargs, av, request,
                                              tmp / label.replace("/", "-"), annotate_tool)
            except BenchError as exc:
                print(f"  {label}: NOT MEASURED: {exc}", file=sys.stderr)
    elapsed = time.monotonic() - started
    print()
    print(render_profile(figures, cases, ours, args))
    print(f"\n{elapsed:.0f} s in all. Commands (the first run of each; the client sends N or "
          "N + E requests):\n\n```")
    for label, f in figures.items():
        print(f"# {label}\n{f['command']}")
    print("```")
    if args.json:
        write_json(args.json, {"settings": settings(args), "machine": machine(),
                               "fastpool_objects": sorted(ours), "profile": figures})
    return 0


def shares(f: dict[str, Any], ours: set[str]) -> dict[str, float]:
    """The shares of a case's instructions (first pair): fastpool's extension modules
    (``own``), llhttp (``parser``), the interpreter, and the rest."""
    total = f["total_first_pair"]
    out = {"own": 0.0, "parser": 0.0, "interpreter": 0.0, "rest": 0.0}
    for name, ir in f["objects"].items():
        group = ("own" if name in ours else "parser" if parser_object(name) else
                 "interpreter" if interpreter_object(name) else "rest")
        out[group] += ir / total
    return out


def render_profile(figures: dict[str, dict[str, Any]], cases: list[Case], ours: set[str],
                   args: argparse.Namespace) -> str:
    out = ["| case | Ir / request | fastpool's modules | llhttp | interpreter "
           "| rest (top objects) | fastpool + trivial app ÷ case |",
           "|---|---:|---:|---:|---:|---|---:|"]
    findings = []
    rows = [(c.name, FRAMEWORKS[c.framework].interface) for c in cases] + [
        (f"baseline/{iface}", iface) for iface in ("wsgi", "asgi")]
    for label, iface in rows:
        f = figures.get(label)
        if f is None:
            if not label.startswith("baseline/"):
                out.append(f"| {label} | not measured | | | | | |")
            continue
        share = shares(f, ours)
        total = f["total_first_pair"]
        rest = [(k, v) for k, v in f["objects"].items() if k not in ours
                and not parser_object(k) and not interpreter_object(k)]
        top = ", ".join(f"`{k.split('.')[0]}` {v / total:.1%}" for k, v in rest[:3])
        base = figures.get(f"baseline/{iface}")
        bound = f"{base['mean'] / f['mean']:.1%}" if base else "?"
        name = (f"hello ({iface}, a trivial app)" if label.startswith("baseline/")
                else label)
        out.append(f"| {name} | {f['mean']:,.0f} | {share['own']:.1%} | {share['parser']:.1%} "
                   f"| {share['interpreter']:.1%} | {top} | {bound} |")
        if not label.startswith("baseline/") and share["own"] + share["parser"] > FINDING_SHARE:
            mine = ", ".join(f"`{k.split('.')[0]}` {v / total:.1%}"
                             for k, v in f["objects"].items() if k in ours)
            findings.append(f"- {label}: fastpool's compiled code and llhttp run "
                            f"{share['own'] + share['parser']:.1%} of a request ({mine})")
    out.append("")
    out.append(f"Instructions (Ir) per request of fastpool's worker under callgrind, N = "
               f"{args.warm:,}, E = {args.extra:,}, {args.repeat} pair(s); shares by object "
               "file from the first pair (callgrind_annotate --inclusive=no: self cost). "
               "fastpool's modules: its extension modules only, so the interpreter's work on "
               "their behalf (building the environ or scope, the response's objects) is in "
               "'interpreter'; the last column is the upper bound that includes it: fastpool's "
               "whole cost with a trivial app of the same interface (instructions.py's hello) "
               f"÷ the case's. {machine()}.")
    out.append("")
    out.append(f"Findings (fastpool's compiled code and llhttp above {FINDING_SHARE:.0%} of a "
               "request): " + ("\n" + "\n".join(findings) if findings else "none."))
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Real frameworks (Flask, Django, FastAPI, Starlette) under fastpool, "
                    "gunicorn, uvicorn and granian; --profile: fastpool's share of each "
                    "case's instructions under callgrind.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--case", action="append", choices=CASE_NAMES,
                   help="case to run (repeatable; default: all)")
    p.add_argument("--server", action="append", choices=SERVER_NAMES,
                   help="server to run (repeatable; default: all that are installed)")
    p.add_argument("--profile", action="store_true",
                   help="fastpool alone under callgrind instead of wrk (see --warm)")
    p.add_argument("--warm", type=int, default=300,
                   help="--profile: N, the requests of the shorter run of each pair")
    p.add_argument("--extra", type=int, default=1000,
                   help="--profile: E, the longer run's requests beyond N")
    p.add_argument("--repeat", type=int, default=1, help="--profile: pairs per case")
    add_load_options(p, port=18480,
                     peer_python_help="interpreter that runs gunicorn, uvicorn and granian",
                     workdir_help="keep the logs (and --profile's callgrind files) here")
    args = p.parse_args(argv)
    require_positive(p, args, "runs", "duration", "connections", "workers", "wrk_threads",
                     "gunicorn_threads", "warm", "extra", "repeat")
    require_warmup(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reproduce = harness_start(argv)
    cases = [c for c in CASES if not args.case or c.name in args.case]
    if args.profile:
        return profile(args, cases)
    if not check_tools(args):
        return 2
    servers: list[Available] = []
    skipped: list[str] = []
    for kind in SERVER_KINDS:
        if args.server and kind.name not in args.server:
            continue
        found = probe(kind, args)
        if isinstance(found, str):
            skipped.append(f"skipped {kind.name}: {found}")
            print(skipped[-1])
            continue
        servers.append(found)

    results: dict[tuple[str, str], Result] = {}
    commands: dict[str, str] = {}
    versions: dict[tuple[str, str], str] = {}
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-frameworks-")
        order_file = tmp / "order.json"
        order_file.write_bytes(frameworks_apps.ORDER_BODY)
        for fw in FRAMEWORKS.values():
            group = [c for c in cases if c.framework == fw.name]
            if not group:
                continue
            for av in servers:
                name = av.kind.name
                why = skip_reason(av, fw, args, versions)
                if why is not None:
                    skipped.append(f"{fw.name} on {name} skipped: {why}")
                    print(skipped[-1])
                    continue
                label = f"{name} ({fw.name})"
                print(f"{label}: {name} {av.version}, {fw.name} {versions[(av.python, fw.name)]}")
                if port_in_use(args.port):
                    raise BenchError(f"port {args.port} is already in use; pass --port")
                cmd = pin(args.server_cpus, args) + server_command(av, fw, args, tmp)
                commands[label] = shlex.join(cmd)
                server = Server(name, cmd, tmp / f"{name}-{fw.name}.log")

                def run(r: Result, cmd: list[str], duration: int,
                        server: Server = server) -> tuple[WrkRun, str]:
                    assert server.proc is not None
                    with costing(server.proc.pid, r.costs):
                        one = run_wrk(cmd, duration)
                    cost = r.costs[-1]
                    per = (f"{cost.server_cpu_s / one.requests * 1e6:.1f} µs/req"
                           if one.requests else "? µs/req")
                    return one, f", {per}, wrk {cost.wrk_cpu_s / cost.wall_s:.0%}"

                try:
                    measure_scenarios(
                        server, name, label, group, args,
                        check=lambda group: check_server(args.port, group),
                        result=lambda c, name=name: results.setdefault(
                            (c.name, name), Result(c.name, name)),
                        wrk_command=lambda c, duration: wrk_command(args, c, duration,
                                                                    order_file),
                        run=run)
                except BenchError as exc:
                    print(f"  {label}: {exc}", file=sys.stderr)

    notes = [f"{av.kind.name} {av.version}: {av.kind.note}" for av in servers]
    notes += [f"{fw} {version} ({python})" for (python, fw), version in versions.items()]
    print()
    print(render(results, cases, [av.kind.name for av in servers], args, skipped, notes))
    if reproduce:
        print(f"Reproduce: `{reproduce}`\n")
    print("Commands (servers run with bench/ as working directory; order.json holds "
          "frameworks_apps.ORDER_BODY):\n\n```")
    for label, cmd in commands.items():
        print(f"# {label}\n{cmd}")
    for c in cases:
        print(f"# wrk: {c.name}\n{shlex.join(wrk_command(args, c, args.duration, order_file))}")
    print("```")
    if args.json:
        write_json(args.json, {
            "settings": settings(args), "reproduce": reproduce, "machine": machine(),
            "servers": {av.kind.name: {"version": av.version, "note": av.kind.note}
                        for av in servers},
            "frameworks": {f"{fw} ({python})": v for (python, fw), v in versions.items()},
            "skipped": skipped, "commands": commands,
            "results": [r.to_json() for r in results.values()],
        })
    return 0


if __name__ == "__main__":
    run_main(main)

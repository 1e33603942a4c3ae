"""Static files: fastpool's compiled-loop file serving against nginx and Python peers.

Every server serves the same two files (generated in a temporary directory, fixed bytes and
mtime) under ``/static/``, with one worker, on keep-alive connections (``wrk -t1 -c64``):

Scenarios:

* ``file-1k``: ``GET /static/file-1k.bin``, a 1 KiB file, 200.
* ``file-1m``: ``GET /static/file-1m.bin``, a 1 MiB file, 200.
* ``revalidate``: ``GET /static/file-1k.bin`` with ``If-None-Match`` set to the file's
  current ETag (``wrk/if_none_match.lua``), 304. Every server makes its own ETag, so it is
  read from each server (its 200 response) before the scenario, and its wrk command line
  differs per server.

Servers (``--workers``, default 1, each; the files' directory is ``DIR``):

* ``fastpool``: ``fastpool serve apps:app --static /static=DIR`` (WSGI worker).
* ``fastpool-asgi``: ``fastpool serve apps:asgi_app --interface asgi --loop uvloop
  --static /static=DIR``.
* ``nginx``: ``root`` in a generated nginx.conf, ``sendfile on; tcp_nopush on;`` (a
  reference, not Python).
* ``granian``: ``--interface wsgi --static-path-route /static --static-path-mount DIR``,
  ``apps:app``.
* ``gunicorn-whitenoise``: gunicorn (gthread, ``--gunicorn-threads``) serving
  ``whitenoise.WhiteNoise(apps:app, root=DIR, prefix="static/")``
  (``static_apps:whitenoise_app()``).
* ``uvicorn-starlette``: uvicorn (httptools, uvloop) serving a Starlette app with
  ``StaticFiles(directory=DIR)`` mounted at ``/static`` (``static_apps:starlette_app``).

``apps.py`` answers everything else (``GET /`` is what the harness polls until a server is
ready). The peer apps read DIR from ``$STATIC_BENCH_DIR``.

Rules, as in run.py: the server (all its processes) is pinned to CPU 0 with ``taskset`` and
wrk to CPU 1; every server is waited for with a deadline, then checked per scenario before
anything is measured -- the exact bytes and a 200 (a ``Content-Length`` of the file's size,
or chunked framing) twice on one keep-alive connection, and for ``revalidate`` an ETag in
the 200 and a bodiless 304 for it, twice -- and re-checked after each scenario's load (the
same ETag still answered with 304). A scenario whose check fails is not measured and the
table says why. A 1 s warm-up, then ``--runs`` (3) runs of ``--duration`` (5) s; req/s,
p50 and p99 are medians. Servers are stopped with SIGTERM to the process group, then
SIGKILL, also on Ctrl-C.

Besides wrk's figures, each run is costed (``common.costing``: the CPU time of the
server's whole process tree, from /proc, and wrk's), and the table shows the median server
CPU per request, fastpool's ÷ it, how busy the server and wrk were (CPU seconds / wall
seconds; 100% is one core saturated), a run with wrk above 85 % flagged client-bound.
Beside the tables, the targets for fastpool with both ratios (printed, not asserted).

Standard library only. Usage (see bench/README.md)::

    python bench/static.py --peer-python /work/peers-venv/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import sys
from dataclasses import asdict, dataclass, field
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
    find_nginx,
    harness_start,
    http_request,
    load_apps,
    load_summary,
    machine,
    measure_scenarios,
    nginx_head,
    nginx_version,
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
HELLO: bytes = load_apps().HELLO
PREFIX = "/static"
FILES = {"file-1k.bin": 1024, "file-1m.bin": 1 << 20}
FILES_MTIME = 1_767_225_600  # 2026-01-01 00:00 UTC: the same ETags from run to run
DIR_ENV = "STATIC_BENCH_DIR"  # read by static_apps.py
BASE = "fastpool"


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    file: str
    revalidate: bool = False  # If-None-Match: the ETag, 304 expected

    @property
    def path(self) -> str:
        return f"{PREFIX}/{self.file}"


SCENARIOS = [
    Scenario("file-1k", "GET a 1 KiB file, 200", "file-1k.bin"),
    Scenario("file-1m", "GET a 1 MiB file, 200", "file-1m.bin"),
    Scenario("revalidate", "GET the 1 KiB file with If-None-Match: its ETag, 304",
             "file-1k.bin", revalidate=True),
]
SCENARIO_NAMES = [s.name for s in SCENARIOS]

# fastpool's req/s ÷ the peer's at least this: printed beside the tables, not asserted
# (with the ratio on CPU per request). The granian and whitenoise targets hold for every
# scenario.
TARGETS = ([Target("file-1k", "nginx", 0.8, on=("rps",)),
            Target("file-1m", "nginx", 0.9, on=("rps",))]
           + [Target(s, "granian", 2.0, on=("rps",)) for s in SCENARIO_NAMES]
           + [Target(s, "gunicorn-whitenoise", 10.0, on=("rps",)) for s in SCENARIO_NAMES])


def make_files(directory: Path) -> dict[str, bytes]:
    """Write the files (fixed pseudo-random bytes: nothing compresses; fixed mtime)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261204)
    out = {}
    for name, size in FILES.items():
        data = rng.randbytes(size)
        path = directory / name
        path.write_bytes(data)
        os.utime(path, (FILES_MTIME, FILES_MTIME))
        out[name] = data
    return out


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerKind:
    name: str
    python: str | None  # "fastpool" or "peer": which interpreter; None: nginx
    imports: tuple[str, ...] = ()  # what that interpreter must import
    dists: tuple[str, ...] = ()  # distributions whose versions are reported
    note: str = ""


SERVER_KINDS = [
    ServerKind("fastpool", "fastpool", ("fastpool",), ("fastpool",),
               "WSGI worker, `--static /static=DIR`, `apps:app`"),
    ServerKind("fastpool-asgi", "fastpool", ("fastpool", "fastpool._asgi", "uvloop"),
               ("fastpool",),
               "ASGI worker (`--interface asgi --loop uvloop`), `--static /static=DIR`, "
               "`apps:asgi_app`"),
    ServerKind("nginx", None, note="reference, not Python: `root`, `sendfile on; "
                                   "tcp_nopush on;`"),
    ServerKind("granian", "peer", ("granian",), ("granian",),
               "WSGI, `--static-path-route /static --static-path-mount DIR`, `apps:app`"),
    ServerKind("gunicorn-whitenoise", "peer", ("gunicorn", "whitenoise"),
               ("gunicorn", "whitenoise"),
               "gthread worker, `WhiteNoise(apps:app, root=DIR, prefix=\"static/\")`"),
    ServerKind("uvicorn-starlette", "peer", ("uvicorn", "uvloop", "httptools", "starlette"),
               ("uvicorn", "starlette"),
               "httptools + uvloop, Starlette `StaticFiles(directory=DIR)` at /static"),
]
SERVER_NAMES = [k.name for k in SERVER_KINDS]


@dataclass
class Available:
    kind: ServerKind
    path: str  # its interpreter, or the nginx binary
    version: str


def probe(kind: ServerKind, args: argparse.Namespace) -> Available | str:
    """An ``Available`` if ``kind`` can be run, else why not."""
    if kind.python is None:
        nginx = find_nginx(args.nginx)
        if nginx is None:
            return f"{args.nginx} not found"
        return Available(kind, nginx, nginx_version(nginx))
    python = args.fastpool_python if kind.python == "fastpool" else args.peer_python
    try:
        versions = [python_version(python, list(kind.imports), dist) for dist in kind.dists]
    except BenchError as exc:
        return str(exc)
    if len(versions) > 1:  # e.g. "gunicorn 27.0.1, whitenoise 6.12.0"
        versions = [f"{dist} {v}" for dist, v in zip(kind.dists, versions, strict=True)]
    return Available(kind, python, ", ".join(versions))


def nginx_conf(tmp: Path, www: Path, port: int, workers: int) -> str:
    hello = HELLO.decode().replace("\n", "\\n")
    head = nginx_head(tmp, workers, http="    sendfile on;\n    tcp_nopush on;\n"
                                         "    default_type application/octet-stream;\n")
    return f"""{head}
    server {{
        listen {HOST}:{port} backlog=2048;
        root {www};
        location = / {{ default_type text/plain; return 200 '{hello}'; }}
        location {PREFIX}/ {{ }}
    }}
}}
"""


def server_command(av: Available, args: argparse.Namespace, tmp: Path,
                   directory: Path) -> tuple[list[str], dict[str, str]]:
    """The command line (without taskset) that starts ``av``, and its extra environment."""
    name, py, port, workers = av.kind.name, av.path, str(args.port), str(args.workers)
    static = ["--static", f"{PREFIX}={directory}"]
    if name == "fastpool":
        return [py, "-m", "fastpool", "serve", "apps:app", "--host", HOST, "--port", port,
                "--workers", workers, *static], {}
    if name == "fastpool-asgi":
        return [py, "-m", "fastpool", "serve", "apps:asgi_app", "--interface", "asgi",
                "--loop", "uvloop", "--host", HOST, "--port", port, "--workers", workers,
                *static], {}
    if name == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, directory.parent, args.port, args.workers))
        return [py, "-p", str(tmp), "-c", str(conf), "-e", "stderr"], {}
    if name == "granian":
        return [py, "-m", "granian", "--interface", "wsgi", "--host", HOST, "--port", port,
                "--workers", workers, "--http", "1", "--no-ws", "--log-level", "warning",
                "--static-path-route", PREFIX, "--static-path-mount", str(directory),
                "apps:app"], {}
    env = {DIR_ENV: str(directory)}
    if name == "gunicorn-whitenoise":
        return [py, "-m", "gunicorn", "-k", "gthread", "--threads", str(args.gunicorn_threads),
                "--workers", workers, "--bind", f"{HOST}:{port}", "--log-level", "warning",
                "static_apps:whitenoise_app()"], env
    if name == "uvicorn-starlette":
        return [py, "-m", "uvicorn", "--factory", "static_apps:starlette_app", "--host", HOST,
                "--port", port, "--workers", workers, "--http", "httptools", "--loop",
                "uvloop", "--no-access-log", "--log-level", "warning"], env
    raise AssertionError(name)


# --------------------------------------------------------------------------- HTTP checks


@dataclass
class Seen:
    """What the checks saw of one server: its ETag for file-1k, framing, headers."""

    etag: str | None = None
    framing: dict[str, str] = field(default_factory=dict)  # file -> Content-Length/chunked
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # what -> headers


def check_server(port: int, scenarios: list[Scenario], files: dict[str, bytes],
                 seen: Seen) -> dict[str, str]:
    """Check the server once per scenario; return {scenario: why it failed} for failures.

    Fills ``seen`` (the ETag ``revalidate`` sends; if ``seen.etag`` is already set, the
    server must still give that one).
    """

    def get_file(name: str, headers: tuple[str, ...] = ()) -> bytes:
        return http_request("GET", f"{PREFIX}/{name}", port, headers=headers)

    def expect_file(resp: Response, name: str, what: str) -> None:
        data = files[name]
        if resp.status != 200:
            raise BenchError(f"{what}: status {resp.status}, expected 200")
        length = resp.headers.get("content-length")
        chunked = "chunked" in resp.headers.get("transfer-encoding", "").lower()
        if length is not None and length != str(len(data)):
            raise BenchError(f"{what}: Content-Length {length}, expected {len(data)}")
        if length is None and not chunked:
            raise BenchError(f"{what}: neither Content-Length nor chunked")
        if resp.body != data:
            raise BenchError(f"{what}: {len(resp.body)}-byte body differs from the "
                             f"{len(data)}-byte file")
        if "close" in resp.headers.get("connection", "").lower():
            raise BenchError(f"{what}: Connection: close (no keep-alive)")
        seen.framing[name] = "Content-Length" if length is not None else "chunked"

    def file(s: Scenario) -> None:
        what = f"GET {s.path}"
        first, second = exchange(port, [get_file(s.file)] * 2)
        expect_file(first, s.file, what)
        expect_file(second, s.file, f"second {what} on a keep-alive connection")
        seen.headers[s.file] = first.headers

    def revalidate(s: Scenario) -> None:
        what = f"GET {s.path}"
        (resp,) = exchange(port, [get_file(s.file)])
        expect_file(resp, s.file, what)
        etag = resp.headers.get("etag")
        if not etag:
            raise BenchError(f"{what}: no ETag in the 200 response")
        if seen.etag is not None and etag != seen.etag:
            raise BenchError(f"{what}: ETag {etag}, but the load sent {seen.etag}")
        seen.etag = etag
        conditional = get_file(s.file, (f"If-None-Match: {etag}",))
        for i, r in enumerate(exchange(port, [conditional] * 2)):
            what = f"GET {s.path} with If-None-Match: {etag}" + (" (second)" if i else "")
            if r.status != 304:
                raise BenchError(f"{what}: status {r.status}, expected 304")
            if "close" in r.headers.get("connection", "").lower():
                raise BenchError(f"{what}: Connection: close (no keep-alive)")
            seen.headers["304"] = r.headers

    failures: dict[str, str] = {}
    for s in scenarios:
        try:
            (revalidate if s.revalidate else file)(s)
        except (BenchError, OSError) as exc:
            failures[s.name] = (f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError)
                                else str(exc))
    return failures


# --------------------------------------------------------------------------- wrk


def wrk_command(args: argparse.Namespace, s: Scenario, duration: int,
                etag: str | None) -> list[str]:
    cmd = [args.wrk, f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{duration}s",
           "--latency"]
    if s.revalidate:
        assert etag is not None
        cmd += ["-s", str(WRK_SCRIPTS / "if_none_match.lua"),
                f"http://{HOST}:{args.port}{s.path}", "--", etag]
    else:
        cmd.append(f"http://{HOST}:{args.port}{s.path}")
    return pin(args.wrk_cpus, args) + cmd


# --------------------------------------------------------------------------- results


def render(scenarios: list[Scenario], results: dict[tuple[str, str], Result],
           servers: list[Available], seen: dict[str, Seen], args: argparse.Namespace) -> str:
    out: list[str] = []
    for s in scenarios:
        rows = [results[(s.name, av.kind.name)] for av in servers
                if (s.name, av.kind.name) in results]
        if not rows:
            continue
        out.append(f"### {s.name}: {s.title} (`{s.path}`)\n")
        out += result_table(rows, BASE, results.get((s.name, BASE)), costs=True,
                            errors_head="non-2xx / socket errors / not measured")
        out.append("")
    out += target_lines(check_targets(TARGETS, results, BASE), BASE, args)
    out.append(f"{load_summary(args)}. {cost_note(BASE)}. "
               f"{client_bound_line(results.values())} {machine()}.\n")
    notes = []
    for av in servers:
        look = seen.get(av.kind.name)
        framing = ""
        if look is not None and "chunked" in look.framing.values():
            framing = "; files sent chunked (no Content-Length)"
        notes.append(f"- {av.kind.name} ({av.version}): {av.kind.note}"
                     + (f", `--threads {args.gunicorn_threads}`"
                        if av.kind.name == "gunicorn-whitenoise" else "") + framing)
    out.append("Notes:\n" + "\n".join(notes) + "\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark static files: fastpool (--static) against nginx, granian, "
                    "gunicorn + whitenoise and uvicorn + Starlette StaticFiles.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", action="append", choices=SCENARIO_NAMES,
                   help="scenario to run (repeatable; default: all)")
    p.add_argument("--server", action="append", choices=SERVER_NAMES,
                   help="server to run (repeatable; default: all that are installed)")
    add_load_options(
        p, port=18180,
        peer_python_help="interpreter that runs granian, gunicorn + whitenoise and uvicorn + "
                         "starlette",
        workdir_help="keep the files, server logs and nginx.conf here (default: a temporary "
                     "directory)")
    args = p.parse_args(argv)
    require_positive(p, args, "runs", "duration", "connections", "workers", "wrk_threads",
                     "gunicorn_threads")
    require_warmup(p, args)
    return args


Commands = dict[str, str]  # server -> its command line


def bench_server(av: Available, scenarios: list[Scenario], args: argparse.Namespace,
                 tmp: Path, directory: Path, files: dict[str, bytes],
                 results: dict[tuple[str, str], Result], commands: Commands,
                 wrk_cmds: dict[tuple[str, str], str], seen: Seen) -> None:
    """Start ``av``, check it, measure ``scenarios``, stop it."""
    name = av.kind.name
    if port_in_use(args.port):
        raise BenchError(f"port {args.port} is already in use; pass --port")
    cmd, env = server_command(av, args, tmp, directory)
    cmd = pin(args.server_cpus, args) + cmd
    shown = ({"PYTHONPATH": str(BENCH)} if av.kind.python else {}) | env
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in shown.items())
    commands[name] = prefix + shlex.join(cmd)
    server = Server(name, cmd, tmp / f"{name}.log", env)

    def result(s: Scenario) -> Result:
        return results.setdefault((s.name, name), Result(s.name, name))

    def etag(s: Scenario) -> str | None:
        return seen.etag if s.revalidate else None

    def record(s: Scenario) -> None:
        wrk_cmds[(s.name, name)] = shlex.join(wrk_command(args, s, args.duration, etag(s)))

    # the check after each scenario's load wants the same ETag again (seen.etag) for revalidate
    measure_scenarios(
        server, name, name, scenarios, args,
        check=lambda group: check_server(args.port, group, files, seen),
        result=result,
        wrk_command=lambda s, duration: wrk_command(args, s, duration, etag(s)),
        run=costed_run(server),
        ready_note=lambda: f" (ETag {seen.etag})" if seen.etag else "",
        loading=record)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness_start(argv, announce=False)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    if not check_tools(args):
        return 2

    servers: list[Available] = []
    for kind in SERVER_KINDS:
        if args.server and kind.name not in args.server:
            continue
        found = probe(kind, args)
        if isinstance(found, str):
            if kind.name == BASE:
                print(f"error: {BASE}: {found}; pass --fastpool-python, or --server to run "
                      "the others alone", file=sys.stderr)
                return 2
            print(f"skipping {kind.name}: {found}")
            continue
        servers.append(found)

    results: dict[tuple[str, str], Result] = {}
    commands: Commands = {}
    wrk_cmds: dict[tuple[str, str], str] = {}
    seen: dict[str, Seen] = {}
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-static-")
        directory = tmp / "www" / PREFIX.strip("/")
        files = make_files(directory)
        for av in servers:
            print(f"{av.kind.name}: {av.version}")
            seen[av.kind.name] = Seen()
            try:
                bench_server(av, scenarios, args, tmp, directory, files, results, commands,
                             wrk_cmds, seen[av.kind.name])
            except BenchError as exc:
                print(f"  {av.kind.name}: {exc}", file=sys.stderr)
        nginx_text = (tmp / "nginx.conf").read_text() if (tmp / "nginx.conf").exists() else None

    print()
    print(render(scenarios, results, servers, seen, args))
    print(f"Commands (servers run with bench/ as working directory; DIR = {directory}, "
          "deleted after the run unless --workdir; then wrk):\n")
    print("```")
    for name, cmd in commands.items():
        print(f"# {name}\n{cmd}")
    for s in scenarios:
        by_cmd: dict[str, list[str]] = {}
        for (scenario, name), cmd in wrk_cmds.items():
            if scenario == s.name:
                by_cmd.setdefault(cmd, []).append(name)
        for cmd, names in by_cmd.items():
            which = "" if len(by_cmd) == 1 else f" ({', '.join(names)})"
            print(f"# wrk: {s.name}{which}\n{cmd}")
    print("```")
    if args.json:
        payload: dict[str, Any] = {
            "settings": settings(args),
            "machine": machine(),
            "files": {name: len(data) for name, data in files.items()},
            "servers": {av.kind.name: {"version": av.version, "note": av.kind.note,
                                       "command": commands.get(av.kind.name),
                                       "seen": asdict(seen[av.kind.name])}
                        for av in servers},
            "nginx_conf": nginx_text,
            "wrk_commands": {f"{scenario}/{name}": cmd
                             for (scenario, name), cmd in wrk_cmds.items()},
            "results": [r.to_json() for r in results.values()],
            "targets": check_targets(TARGETS, results, BASE),
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    run_main(main)

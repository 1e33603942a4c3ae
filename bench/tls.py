"""TLS: fastpool's HTTPS listeners against nginx and the Python servers' own TLS.

Every server answers ``GET /`` with ``Hello, World!\\n`` over HTTPS, one worker each, with
the same certificate, made for the run by the ``openssl`` command line (a self-signed
certificate for 127.0.0.1; the checks trust exactly it). Two certificates, each a run of
every server:

* ``ecdsa``: ECDSA P-256 (``openssl req -x509 -newkey ec -pkeyopt
  ec_paramgen_curve:P-256``);
* ``rsa``: RSA 2048 (``-newkey rsa:2048``).

Scenarios per certificate:

* ``keepalive``: ``wrk`` over https on keep-alive connections (``-c64``): the cost of a
  request once the handshake is done (record encryption, the server's I/O path).
* ``handshake``: the same with ``-H 'Connection: close'``: every request on a new TLS
  connection with a full handshake (the certificate's signature, a key exchange), so the
  handshake's cost dominates. wrk would resume the previous connection's session (it
  keeps it across ``SSL_clear``): for this scenario it runs with ``LD_PRELOAD`` of a
  shim, compiled for the run with ``cc``, that drops the session first (the scenario is
  skipped without a C compiler).
* ``resumed``: ``Connection: close`` with wrk as it is: each new connection resumes the
  session of the one before (TLS 1.3 PSK with a key exchange; no certificate, no
  signature) where the server lets it. Whether it does is checked with Python's ``ssl``
  client and printed (``resumes sessions``).

Servers (``--server``, repeatable; default: all that are installed):

* ``fastpool``: ``fastpool serve apps:app --tls-bind ... --certfile C --keyfile K`` (WSGI);
* ``fastpool-asgi``: the same with ``apps:asgi_app --interface asgi --loop uvloop``;
* ``nginx``: ``listen ... ssl`` with ``return 200`` (a reference, not Python), with
  ``ssl_protocols TLSv1.2 TLSv1.3`` (nginx before 1.23.4 offers no TLS 1.3 by default;
  the others all negotiate TLS 1.3 with wrk);
* ``granian`` / ``granian-asgi``: ``--ssl-certificate C --ssl-keyfile K``;
* ``uvicorn``: ``--ssl-certfile C --ssl-keyfile K`` (httptools + uvloop, ``apps:asgi_app``);
* ``gunicorn``: gthread, ``--certfile C --keyfile K``.

Rules, as in run.py and static.py: the server (all its processes) is pinned to CPU 0 and wrk
to CPU 1; each server is waited for with a deadline and checked (a 200 with the exact body
twice on one HTTPS keep-alive connection; for ``handshake`` and ``resumed``, a closed
connection after ``Connection: close``) before anything is measured and again after each
scenario's load; a 1 s warm-up, then ``--runs`` runs of ``--duration`` s, medians. Besides
wrk's figures: the server's CPU time per request (user + system of its whole process tree,
from /proc) and how busy wrk was -- above 85 % of its core the run is flagged client-bound
(the req/s is then a floor). Ratios to fastpool are given on req/s and on CPU per request;
the targets of issue 14 are printed beside the tables, not asserted.

Standard library only (and the openssl and cc commands). Usage::

    python bench/tls.py --peer-python /work/peers-venv/bin/python --json tls.json
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import (
    HOST,
    BenchError,
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

HELLO: bytes = load_apps().HELLO
BASE = "fastpool"

CERTIFICATES = {
    "ecdsa": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa": ["-newkey", "rsa:2048"],
}


@dataclass(frozen=True)
class Scenario:
    name: str          # certificate/kind
    certificate: str
    kind: str          # keepalive, handshake (full) or resumed
    title: str

    @property
    def close(self) -> bool:
        """Connection: close: a new TLS connection per request."""
        return self.kind != "keepalive"


KINDS = {"keepalive": "GET / on keep-alive HTTPS connections",
         "handshake": "GET / with Connection: close: a full TLS handshake per request",
         "resumed": "GET / with Connection: close: a resumed TLS session per request"}
SCENARIOS = [Scenario(f"{cert}/{kind}", cert, kind, title)
             for cert in CERTIFICATES for kind, title in KINDS.items()]
SCENARIO_NAMES = [s.name for s in SCENARIOS]

# (scenario kind, peer, least fastpool/peer on req/s), from issue 14 ("new connections"
# is both handshake kinds); each becomes a ``Target`` per certificate.
TARGET_KINDS = [("keepalive", "granian", 1.5), ("keepalive", "uvicorn", 3.0),
                ("handshake", "nginx", 0.8), ("resumed", "nginx", 0.8)]
TARGETS = [Target(s.name, peer, least, on=("rps",)) for s in SCENARIOS
           for kind, peer, least in TARGET_KINDS if s.kind == kind]

# LD_PRELOADed into wrk for ``handshake``: wrk ends a connection with SSL_shutdown and
# SSL_clear and reconnects with the same SSL object, which keeps its session and resumes
# it; dropping the session first makes every connection a full handshake.
NO_RESUME_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <openssl/ssl.h>

int SSL_clear(SSL *s) {
    static int (*next)(SSL *);
    if (next == NULL)
        next = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    SSL_set_session(s, NULL);
    return next(s);
}
"""


def build_no_resume_shim(tmp: Path) -> Path | str:
    """The shared object that stops wrk resuming sessions, built in ``tmp``; or why not."""
    source, shim = tmp / "wrk-no-resume.c", tmp / "wrk-no-resume.so"
    source.write_text(NO_RESUME_SHIM)
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(source),
                        "-ldl", "-lssl"], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        return "no C compiler (cc)"
    except subprocess.CalledProcessError as exc:
        return f"cc failed: {(exc.stderr.strip().splitlines() or ['?'])[-1]}"
    return shim


def make_certificate(directory: Path, kind: str) -> tuple[Path, Path]:
    cert, key = directory / f"{kind}-cert.pem", directory / f"{kind}-key.pem"
    subprocess.run(["openssl", "req", "-x509", *CERTIFICATES[kind], "-nodes", "-days", "2",
                    "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False    # (the certificate is for the IP; checked by the CA)
    return context


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerKind:
    name: str
    python: str | None   # "fastpool" or "peer": which interpreter; None: nginx
    imports: tuple[str, ...] = ()
    dists: tuple[str, ...] = ()
    note: str = ""


SERVER_KINDS = [
    ServerKind("fastpool", "fastpool", ("fastpool",), ("fastpool",),
               "WSGI worker, `--tls-bind`, `apps:app`"),
    ServerKind("fastpool-asgi", "fastpool", ("fastpool", "uvloop"), ("fastpool",),
               "ASGI worker (`--loop uvloop`), `--tls-bind`, `apps:asgi_app`"),
    ServerKind("nginx", None, note="reference, not Python: `listen ... ssl`, `return 200`"),
    ServerKind("granian", "peer", ("granian",), ("granian",),
               "WSGI, `--ssl-certificate --ssl-keyfile`, `apps:app`"),
    ServerKind("granian-asgi", "peer", ("granian",), ("granian",),
               "ASGI, `--ssl-certificate --ssl-keyfile`, `apps:asgi_app`"),
    ServerKind("uvicorn", "peer", ("uvicorn", "uvloop", "httptools"), ("uvicorn",),
               "httptools + uvloop, `--ssl-certfile --ssl-keyfile`, `apps:asgi_app`"),
    ServerKind("gunicorn", "peer", ("gunicorn",), ("gunicorn",),
               "gthread worker, `--certfile --keyfile`, `apps:app`"),
]
SERVER_NAMES = [k.name for k in SERVER_KINDS]


@dataclass
class Available:
    kind: ServerKind
    path: str
    version: str


def probe(kind: ServerKind, args: argparse.Namespace) -> Available | str:
    if kind.python is None:
        nginx = find_nginx(args.nginx)
        return Available(kind, nginx, nginx_version(nginx)) if nginx else \
            f"{args.nginx} not found"
    python = args.fastpool_python if kind.python == "fastpool" else args.peer_python
    try:
        version = ", ".join(python_version(python, list(kind.imports), dist)
                            for dist in kind.dists)
    except BenchError as exc:
        return str(exc)
    return Available(kind, python, version)


def nginx_conf(tmp: Path, port: int, workers: int, cert: Path, key: Path) -> str:
    hello = HELLO.decode().replace("\n", "\\n")
    return f"""{nginx_head(tmp, workers)}
    server {{
        listen {HOST}:{port} ssl backlog=2048;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = / {{ default_type text/plain; return 200 '{hello}'; }}
    }}
}}
"""


def server_command(av: Available, args: argparse.Namespace, tmp: Path, cert: Path,
                   key: Path) -> list[str]:
    name, py, port, workers = av.kind.name, av.path, str(args.port), str(args.workers)
    address = f"{HOST}:{port}"
    if name in ("fastpool", "fastpool-asgi"):
        app = ["apps:app"] if name == "fastpool" else [
            "apps:asgi_app", "--interface", "asgi", "--loop", "uvloop"]
        return [py, "-m", "fastpool", "serve", *app, "--tls-bind", address, "--certfile",
                str(cert), "--keyfile", str(key), "--workers", workers,
                "--control-socket", str(tmp / "fastpool.sock")]
    if name == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, args.port, args.workers, cert, key))
        return [py, "-p", str(tmp), "-c", str(conf), "-e", "stderr"]
    if name in ("granian", "granian-asgi"):
        interface, app = ("wsgi", "apps:app") if name == "granian" else ("asgi",
                                                                          "apps:asgi_app")
        return [py, "-m", "granian", "--interface", interface, "--host", HOST, "--port", port,
                "--workers", workers, "--http", "1", "--no-ws", "--log-level", "warning",
                "--ssl-certificate", str(cert), "--ssl-keyfile", str(key), app]
    if name == "uvicorn":
        return [py, "-m", "uvicorn", "apps:asgi_app", "--host", HOST, "--port", port,
                "--workers", workers, "--http", "httptools", "--loop", "uvloop",
                "--no-access-log", "--log-level", "warning", "--ssl-certfile", str(cert),
                "--ssl-keyfile", str(key)]
    if name == "gunicorn":
        return [py, "-m", "gunicorn", "-k", "gthread", "--threads", str(args.gunicorn_threads),
                "--workers", workers, "--bind", address, "--log-level", "warning",
                "--certfile", str(cert), "--keyfile", str(key), "apps:app"]
    raise AssertionError(name)


def check_server(port: int, scenarios: list[Scenario],
                 context: ssl.SSLContext) -> dict[str, str]:
    """{scenario: why its check failed}: the exact body twice on one keep-alive
    connection; with ``close``, the connection closed after the answer."""
    failures = {}
    for s in scenarios:
        try:
            request = http_request("GET", "/", port, close=s.close)
            answers = exchange(port, [request] if s.close else [request] * 2,
                               expect_close=s.close, tls=context)
            for answer in answers:
                if answer.status != 200 or answer.body != HELLO:
                    raise BenchError(f"status {answer.status}, body {answer.body[:60]!r}")
        except (BenchError, OSError) as exc:
            failures[s.name] = f"{type(exc).__name__}: {exc}"
    return failures


def resumes(port: int, context: ssl.SSLContext) -> bool:
    """Whether the server resumes a session: a second connection offering the session
    of a first one (after a whole request, so TLS 1.3 tickets have arrived)."""
    session = None
    for _ in range(2):
        with socket.create_connection((HOST, port), timeout=5) as plain, \
                context.wrap_socket(plain, server_hostname=HOST, session=session) as sock:
            sock.sendall(http_request("GET", "/", port, close=True))
            while sock.recv(65536):
                pass
            session, reused = sock.session, sock.session_reused
    return reused


def wrk_command(args: argparse.Namespace, s: Scenario, duration: int,
                shim: Path | None = None) -> list[str]:
    """wrk for ``s`` (``shim``: the no-resumption shim, which ``handshake`` needs)."""
    cmd = [args.wrk, f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{duration}s",
           "--latency"]
    if s.close:
        cmd += ["-H", "Connection: close"]
    if s.kind == "handshake":
        assert shim is not None
        cmd = ["env", f"LD_PRELOAD={shim}"] + cmd
    return pin(args.wrk_cpus, args) + cmd + [f"https://{HOST}:{args.port}/"]


# --------------------------------------------------------------------------- results


def render(results: dict[tuple[str, str], Result], servers: list[Available],
           args: argparse.Namespace, resumption: dict[str, str]) -> str:
    out: list[str] = []
    for s in SCENARIOS:
        rows = [results[(s.name, av.kind.name)] for av in servers
                if (s.name, av.kind.name) in results]
        if not rows:
            continue
        out.append(f"### {s.name}: {s.title}\n")
        out += result_table(rows, BASE, results.get((s.name, BASE)), costs=True)
        out.append("")
    out += target_lines(check_targets(TARGETS, results, BASE), BASE, args, "issue 14")
    out.append(f"{load_summary(args)}. {cost_note(BASE)}. "
               f"{client_bound_line(results.values())} {machine()}; "
               f"{ssl.OPENSSL_VERSION} (this Python's).\n")
    out.append("Notes:\n" + "\n".join(f"- {av.kind.name} ({av.version}): {av.kind.note}"
                                      for av in servers) + "\n")
    if resumption:
        out.append("Resumes sessions (a second connection offering the first one's session, "
                   "Python's ssl client; where not, `resumed` is full handshakes too): "
                   + ", ".join(f"{label} {answer}" for label, answer in resumption.items())
                   + "\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark HTTPS: fastpool (--tls-bind) against nginx, granian, uvicorn "
                    "and gunicorn, with an ECDSA and an RSA certificate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", action="append", choices=SCENARIO_NAMES,
                   help="scenario to run (repeatable; default: all)")
    p.add_argument("--server", action="append", choices=SERVER_NAMES,
                   help="server to run (repeatable; default: all that are installed)")
    add_load_options(p, port=18443,
                     peer_python_help="interpreter that runs granian, uvicorn and gunicorn",
                     workdir_help="keep the certificates, logs and nginx.conf here")
    args = p.parse_args(argv)
    require_positive(p, args, "runs", "duration", "connections", "workers", "wrk_threads",
                     "gunicorn_threads")
    require_warmup(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reproduce = harness_start(argv)
    if not check_tools(args):
        return 2
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    servers: list[Available] = []
    for kind in SERVER_KINDS:
        if args.server and kind.name not in args.server:
            continue
        found = probe(kind, args)
        if isinstance(found, str):
            print(f"skipping {kind.name}: {found}")
            continue
        servers.append(found)

    results: dict[tuple[str, str], Result] = {}
    commands: dict[str, str] = {}
    resumption: dict[str, str] = {}   # "server (certificate)": "yes", "no" or why unknown
    with contextlib.ExitStack() as stack:
        tmp = work_dir(stack, args, "fastpool-tls-")
        shim: Path | None = None
        if any(s.kind == "handshake" for s in scenarios):
            built = build_no_resume_shim(tmp)
            if isinstance(built, str):
                print(f"skipping the handshake scenarios: {built} to build the shim that "
                      "stops wrk resuming sessions", file=sys.stderr)
                scenarios = [s for s in scenarios if s.kind != "handshake"]
            else:
                shim = built
        for certificate in dict.fromkeys(s.certificate for s in scenarios):
            cert, key = make_certificate(tmp, certificate)
            context = client_context(cert)
            group = [s for s in scenarios if s.certificate == certificate]
            for av in servers:
                name = av.kind.name
                print(f"{name} ({certificate}): {av.version}")
                if port_in_use(args.port):
                    raise BenchError(f"port {args.port} is already in use; pass --port")
                cmd = pin(args.server_cpus, args) + server_command(av, args, tmp, cert, key)
                commands[f"{name} ({certificate})"] = shlex.join(cmd)
                server = Server(name, cmd, tmp / f"{name}-{certificate}.log", tls=context)

                def resumption_note(label: str = f"{name} ({certificate})",
                                    context: ssl.SSLContext = context,
                                    group: list[Scenario] = group) -> str:
                    if not any(s.kind == "resumed" for s in group):
                        return ""
                    try:
                        resumption[label] = "yes" if resumes(args.port, context) else "no"
                    except (OSError, ssl.SSLError) as exc:
                        resumption[label] = f"? ({type(exc).__name__}: {exc})"
                    return f"; resumes sessions: {resumption[label]}"

                try:
                    measure_scenarios(
                        server, name, f"{name} ({certificate})", group, args,
                        check=lambda group, context=context: check_server(
                            args.port, group, context),
                        result=lambda s, name=name: results.setdefault(
                            (s.name, name), Result(s.name, name)),
                        wrk_command=lambda s, duration: wrk_command(args, s, duration, shim),
                        run=costed_run(server), ready_note=resumption_note)
                except BenchError as exc:
                    print(f"  {name}: {exc}", file=sys.stderr)

    print()
    print(render(results, servers, args, resumption))
    if reproduce:
        print(f"Reproduce: `{reproduce}`\n")
    print("Commands (servers run with bench/ as working directory; certificates made with "
          "`openssl req -x509` in a temporary directory):\n")
    print("```")
    for name, cmd in commands.items():
        print(f"# {name}\n{cmd}")
    for s in {s.kind: s for s in scenarios}.values():
        print(f"# wrk: {s.kind}\n{shlex.join(wrk_command(args, s, args.duration, shim))}")
    if shim is not None:
        print(f"# {shim.name}: built with cc -shared -fPIC -O2 -ldl -lssl from\n"
              + NO_RESUME_SHIM.strip())
    print("```")
    if args.json:
        write_json(args.json, {
            "settings": settings(args), "reproduce": reproduce, "machine": machine(),
            "openssl": ssl.OPENSSL_VERSION,
            "servers": {av.kind.name: {"version": av.version, "note": av.kind.note}
                        for av in servers},
            "commands": commands, "resumes_sessions": resumption,
            "results": [r.to_json() for r in results.values()],
            "targets": check_targets(TARGETS, results, BASE),
        })
    return 0


if __name__ == "__main__":
    run_main(main)

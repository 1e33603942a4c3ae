"""Fixtures and the server under test: the real ``fastpool serve`` in a subprocess.

What it holds: ``Server`` (one ``python -m fastpool serve`` process) and the
fixtures that start it (``serve``, ``clusters``, ``interface``,
``starlette_server``), ``start_server``/``stop_server`` for module-scoped
fixtures, the environment of every child process (``child_env``), and the
process helpers (``wait_for``, ``wait_exit``, ``alive``, ``children``,
``cmdline``, ``record``).  Requests are in client.py; config-file servers
(worker groups) in clusters.py.

Rules: every server is started through the CLI (``python -m fastpool serve``),
waited for with a deadline (never a fixed sleep), and stopped at the end of
the test, killed if it does not stop in time.  Test modules import helpers from
here, client.py and clusters.py, never from another test module.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
DEADLINE = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = DEADLINE,
              interval: float = 0.02, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy, or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process a test starts: this one's, less the
    settings a developer may have exported (``FASTPOOL_*``, ``WEB_CONCURRENCY``),
    with tests/ first on PYTHONPATH (the apps), then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FASTPOOL_") and k != "WEB_CONCURRENCY"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


# ---------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s live children, sorted (read from /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return sorted(int(token) for token in text.split())


def cmdline(pid: int) -> str:
    """``pid``'s command line (its process title), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- the server


class Server:
    """A running ``fastpool serve`` process (started through ``launcher``, a
    program that execs the rest of its command line, when given: e.g. to pass
    it sockets as systemd does, tests/test_systemd.py)."""

    def __init__(self, args: list[str], *, port: int | None, workers: int,
                 env: dict[str, str] | None, cwd: Path, log_path: Path,
                 stdout_closed: bool = False, nofile: int | None = None,
                 launcher: tuple[str, ...] = (), pass_fds: tuple[int, ...] = ()) -> None:
        self.port = port
        self.host = "127.0.0.1"
        self.workers = workers
        self.log_path = log_path
        self.args = args
        self._log = open(log_path, "wb")  # noqa: SIM115
        # stdout_closed: stdout is a pipe whose reader has gone (``serve | head``);
        # the log then has stderr only.
        stdout: int | object = self._log
        if stdout_closed:
            reader, stdout = os.pipe()
            os.close(reader)
        try:
            # launcher: a program that execs the command line after it (the
            # same pid), e.g. to hand it sockets as systemd does (pass_fds).
            self.proc = subprocess.Popen(
                [*launcher, sys.executable, "-m", "fastpool", "serve", *args],
                pass_fds=pass_fds,
                stdout=stdout, stderr=self._log, cwd=cwd, env=child_env(env),
                start_new_session=True,
                # nofile: the descriptor limit of the server (and its workers).
                preexec_fn=None if nofile is None else lambda: resource.setrlimit(
                    resource.RLIMIT_NOFILE, (nofile, nofile)),
            )
        finally:
            if stdout_closed:
                os.close(stdout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """Pids of the master's live children (read from /proc)."""
        return children(self.pid)

    def booted_workers(self) -> list[int]:
        return [int(p) for p in re.findall(r"Booting worker \d+ with pid: (\d+)", self.log)]

    def wait_ready(self, timeout: float = DEADLINE) -> Server:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode} before it was ready:\n{self.log}")
            return len(self.booted_workers()) >= self.workers and (
                self.port is None or self.can_connect())
        wait_for(ready, timeout, what=f"{self.workers} worker(s) to boot:\n{self.log}")
        return self

    def can_connect(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"server did not stop within {timeout}s:\n{self.log}") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve("apps:hello", "--workers", "2")`` starts a server and waits for it.

    A ``--port``/``--bind`` is added unless the args already have one.  Pass
    ``wait=False`` to get the process without waiting (for boot failures).
    """
    servers: list[Server] = []

    def start(app: str, *args: str, workers: int = 1, wait: bool = True,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              stdout_closed: bool = False, nofile: int | None = None) -> Server:
        argv = [app, *args]
        port: int | None = None
        if not any(a in ("--port", "--bind", "-b") or a.startswith("--bind=") for a in args):
            port = free_port()
            argv += ["--port", str(port)]
        else:
            for flag, value in zip(args, args[1:], strict=False):
                if flag == "--port":
                    port = int(value)
                elif flag in ("--bind", "-b") and not value.startswith(("unix:", "fd:")):
                    port = int(value.rsplit(":", 1)[1])
        if "--workers" not in args and "-w" not in args:
            argv += ["--workers", str(workers)]
        else:
            index = args.index("--workers") if "--workers" in args else args.index("-w")
            workers = int(args[index + 1])
        server = Server(argv, port=port, workers=workers, env=env, cwd=cwd or tmp_path,
                        log_path=tmp_path / f"server-{len(servers)}.log",
                        stdout_closed=stdout_closed, nofile=nofile)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        stop_server(server, signal.SIGQUIT)


def start_server(app: str, directory: Path, *args: str,
                 env: dict[str, str] | None = None) -> Server:
    """One worker on a free port, for module-scoped fixtures (which cannot use ``serve``)."""
    port = free_port()
    server = Server([app, "--port", str(port), "--workers", "1", *args],
                    port=port, workers=1, env=env, cwd=directory,
                    log_path=directory / "server.log")
    try:
        return server.wait_ready()
    except BaseException:
        server.kill()
        raise


def stop_server(server: Server, sig: int = signal.SIGTERM) -> None:
    """Stop ``server`` with ``sig`` (10 s at the most), killed if it does not stop:
    the teardown of every fixture."""
    try:
        server.stop(sig, timeout=10)
    except AssertionError:
        server.kill()


def wait_exit(server: Server, timeout: float = DEADLINE) -> tuple[int, float]:
    """The master's exit code and how long it took to exit (killed, and the test
    failed, past ``timeout``)."""
    start = time.monotonic()
    try:
        code = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError(f"server did not exit within {timeout}s:\n{server.log}") from None
    return code, time.monotonic() - start


def record(server: Server, name: str, timeout: float = 10.0) -> Any:
    """The JSON record ``name`` that the app writes next to the server's log
    (facts the wire does not show), once it exists."""
    path = server.log_path.parent / name
    wait_for(path.exists, timeout, what=f"the app to write {name}:\n{server.log}")
    return json.loads(path.read_text())


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[object]:
    """Config-file servers (see clusters.Clusters)."""
    from clusters import Clusters

    factory = Clusters(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def starlette_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``apps_asgi_starlette:app`` (HTTP and WebSocket routes), one worker."""
    srv = start_server("apps_asgi_starlette:app", tmp_path_factory.mktemp("starlette"))
    yield srv
    stop_server(srv)


# ---------------------------------------------------------------- both interfaces

# The apps of the HTTP protocol and limit tests, one per interface, with the same
# routes and the same bytes (tests/apps_http.py, tests/apps_http_asgi.py).
HTTP_APPS = {"wsgi": "apps_http:app", "asgi": "apps_http_asgi:app"}


@pytest.fixture(scope="module", params=list(HTTP_APPS))
def interface(request: pytest.FixtureRequest) -> str:
    """Every test that takes ``interface`` runs against ``--interface wsgi``
    (apps_http.py) and ``--interface asgi`` (apps_http_asgi.py), unless it is
    parametrised (``indirect=True``) to one of them."""
    return request.param


def start_http_server(interface: str, directory: Path, *args: str,
                      env: dict[str, str] | None = None) -> Server:
    """``start_server`` of the HTTP test app of ``interface``, with ``--interface`` set."""
    return start_server(HTTP_APPS[interface], directory, "--interface", interface, *args,
                        env=env)

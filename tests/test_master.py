"""The master process: workers, signals, boot failures, logs, binds, settings.

Every server is the real ``python -m fastpool serve`` (see conftest.py); the
apps are in apps_wsgi.py (``/pid`` answers the worker's pid, ``/sleep?s=N&tag=T``
writes ``sleeping T`` to wsgi.errors and then sleeps).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from client import Reply, fetch, start_sleeper, worker_pid
from conftest import Server, alive, free_port, wait_exit, wait_for

# ---------------------------------------------------------------- helpers


def assert_cut_off(future: Future) -> None:
    """The in-flight request got no response: the connection was closed under it."""
    try:
        result = future.result(timeout=10)
    except (ConnectionError, http.client.HTTPException):
        return
    raise AssertionError(f"the in-flight request was answered: {result}")


def error_lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


# ---------------------------------------------------------------- workers


def test_workers_spread_new_connections_with_reuse_port(serve):
    server = serve("apps_wsgi:main", "--workers", "3")
    workers = wait_for(lambda: len(server.worker_pids()) == 3 and server.worker_pids(),
                       what="3 workers")
    assert sorted(server.booted_workers()) == workers
    assert server.pid not in workers
    seen = {worker_pid(server) for _ in range(40)}
    assert seen <= set(workers)
    assert len(seen) > 1, "every new connection went to the same worker"
    assert len(server.worker_pids()) == 3


def test_workers_share_one_socket_with_no_reuse_port(serve):
    server = serve("apps_wsgi:main", "--workers", "3", "--no-reuse-port")
    workers = wait_for(lambda: len(server.worker_pids()) == 3 and server.worker_pids(),
                       what="3 workers")
    assert sorted(server.booted_workers()) == workers
    assert {worker_pid(server) for _ in range(10)} <= set(workers)
    # While two workers are busy, a third connection must reach the idle one.
    with ThreadPoolExecutor(3) as pool:
        sleepers = [start_sleeper(pool, server, 0.5) for _ in range(3)]
        results = [future.result(timeout=15) for future in sleepers]
    pids = set()
    for status, _, body in results:
        assert status == 200
        pids.add(int(body.split()[1]))
    assert pids == set(workers)


def test_killed_worker_is_replaced(serve):
    server = serve("apps_wsgi:main", "--workers", "2")
    before = wait_for(lambda: len(server.worker_pids()) == 2 and server.worker_pids(),
                      what="2 workers")
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    after = wait_for(
        lambda: (pids := server.worker_pids()) and len(pids) == 2 and victim not in pids
        and pids, what="a replacement worker")
    replacement = (set(after) - set(before)).pop()
    wait_for(lambda: replacement in server.booted_workers(), what="the replacement to boot")
    assert error_lines(server.log, f"pid {victim}"), server.log
    assert any("SIGKILL" in line for line in error_lines(server.log, f"pid {victim}"))
    seen = {worker_pid(server) for _ in range(30)}
    assert seen <= set(after)
    assert victim not in seen
    assert replacement in seen


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_graceful_stop_finishes_in_flight_request(serve, sig):
    server = serve("apps_wsgi:main", "--workers", "2")
    workers = server.worker_pids()
    with ThreadPoolExecutor(1) as pool:
        future = start_sleeper(pool, server, 1)
        server.proc.send_signal(sig)
        status, _, body = future.result(timeout=15)
    assert status == 200
    assert body.startswith(b"slept ")
    code, _ = wait_exit(server, 15)
    assert code == 0, server.log
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=5,
             what="the workers to exit")


def test_quit_stops_immediately(serve):
    server = serve("apps_wsgi:main", "--workers", "2")
    workers = server.worker_pids()
    with ThreadPoolExecutor(1) as pool:
        future = start_sleeper(pool, server, 30)
        server.proc.send_signal(signal.SIGQUIT)
        code, took = wait_exit(server, 10)
        assert_cut_off(future)
    assert took < 5, f"QUIT took {took:.1f}s"
    assert code == 0, server.log
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=5,
             what="the workers to exit")


def test_second_int_during_graceful_stop_is_immediate(serve):
    server = serve("apps_wsgi:main", "--workers", "1")
    workers = server.worker_pids()
    with ThreadPoolExecutor(1) as pool:
        future = start_sleeper(pool, server, 30)
        server.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT" in server.log, timeout=10, what="the first SIGINT")
        assert server.proc.poll() is None and not future.done(), "first INT was not graceful"
        server.proc.send_signal(signal.SIGINT)
        code, took = wait_exit(server, 10)
        assert_cut_off(future)
    assert took < 5, f"the second INT took {took:.1f}s"
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=5,
             what="the workers to exit")


def test_graceful_timeout_kills_a_stuck_request(serve):
    server = serve("apps_wsgi:main", "--workers", "1", "--graceful-timeout", "1")
    (worker,) = server.worker_pids()
    with ThreadPoolExecutor(1) as pool:
        future = start_sleeper(pool, server, 30)
        server.proc.send_signal(signal.SIGTERM)
        _, took = wait_exit(server, 10)
        assert_cut_off(future)
    assert took < 5, f"stopping took {took:.1f}s with --graceful-timeout 1"
    assert any("SIGKILL" in line for line in error_lines(server.log, f"pid {worker}")), \
        server.log
    assert not alive(worker)


def test_workers_exit_when_the_master_is_killed(serve):
    server = serve("apps_wsgi:main", "--workers", "2")
    workers = server.worker_pids()
    assert len(workers) == 2
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(5)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=8,
             what=f"orphaned workers {workers} to exit")


def test_the_signal_table_splits_the_signals_between_master_and_workers():
    """fastpool.signals is the one table: a worker handles TERM, USR2, QUIT and
    USR1 (the ASGI worker re-registers exactly these on its loop) and ignores
    the master's own; the master handles its own, and never USR2."""
    from fastpool import signals

    assert set(signals.WORKER_SIGNALS) == {signal.SIGTERM, signal.SIGUSR2, signal.SIGQUIT,
                                           signal.SIGUSR1}
    assert set(signals.MASTERS_SIGNALS) == {signal.SIGINT, signal.SIGHUP, signal.SIGTTIN,
                                            signal.SIGTTOU}
    assert set(signals.MASTER_SIGNALS) == {*signals.MASTERS_SIGNALS, signal.SIGTERM,
                                           signal.SIGQUIT, signal.SIGUSR1, signal.SIGCHLD}
    assert signals.SIGNAL_FOR[signals.RETIRE] == signal.SIGUSR2
    assert signals.SIGNAL_FOR[signals.SHUTDOWN] == signal.SIGTERM


# ---------------------------------------------------------------- loading the app


def _syntax_error_module(cwd: Path) -> None:
    (cwd / "apps_wsgi_syntax_error.py").write_text("def app(environ, start_response:\n")


IMPORT_FAILURES = {
    "missing-module": ("apps_wsgi_no_such_module:app", "apps_wsgi_no_such_module"),
    "missing-attribute": ("apps_wsgi:no_such_attribute", "no_such_attribute"),
    "syntax-error": ("apps_wsgi_syntax_error:app", "apps_wsgi_syntax_error.py"),
    "raises-at-import": ("apps_wsgi_raises:app",
                         "RuntimeError: refuses to import: apps_wsgi_raises"),
}


@pytest.mark.parametrize("preload", [False, True], ids=["workers", "preload"])
@pytest.mark.parametrize("case", list(IMPORT_FAILURES))
def test_app_that_cannot_load_stops_the_server_once(serve, tmp_path, case, preload):
    app, needle = IMPORT_FAILURES[case]
    _syntax_error_module(tmp_path)   # the cwd of the server: importable from there
    args = ["--workers", "4"] + (["--preload"] if preload else [])
    server = serve(app, *args, wait=False, cwd=tmp_path)
    code, _ = wait_exit(server, 15)
    log = server.log
    assert code == 4, log     # the app cannot be imported (a worker's APP_LOAD_ERROR notice)
    assert len(error_lines(log, needle)) == 1, log
    # One message for the operator, then (from a worker) one line saying the server stops.
    said = error_lines(log, "[ERROR] App failed to load")
    assert len(said) == 1 and needle in log.split("App failed to load", 1)[1], log
    stops = error_lines(log, "failed to boot; stopping the server")
    assert len(stops) == (0 if preload else 1), log
    if not preload:
        assert re.search(r"\[ERROR\] Worker \d \(pid \d+\) of group main failed to boot; "
                         r"stopping the server$", stops[0]), stops
    assert "Booting worker" not in log, log
    assert not server.worker_pids()


def test_app_factory(serve):
    server = serve("apps_wsgi:create_app()")
    status, _, body = fetch(server, "/")
    assert (status, body) == (200, b"greeting=factory default")


def test_app_factory_with_a_literal_argument(serve):
    server = serve("apps_wsgi:create_app('x')")
    status, _, body = fetch(server, "/")
    assert (status, body) == (200, b"greeting=x")


# ---------------------------------------------------------------- access log

ACCESS_LINE = re.compile(
    r'^127\.0\.0\.1 - - \[[^\]]+\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$', re.M)


def test_access_log_to_stdout(serve):
    server = serve("apps_wsgi:main", "--access-log", "-")
    status, _, body = fetch(server, "/hello?q", headers={"User-Agent": "ua-test/1.0"})
    assert (status, body) == (200, b"Hello, WSGI!\n")
    fetch(server, "/pid?x=1&y=2", headers={"User-Agent": "second agent",
                                           "Referer": "http://example.test/"})
    lines = wait_for(lambda: len(ACCESS_LINE.findall(server.log)) >= 2 and [
        m.groupdict() for m in ACCESS_LINE.finditer(server.log)], what="2 access log lines")
    assert lines[0] == {"request": "GET /hello?q HTTP/1.1", "status": "200", "size": "13",
                        "referer": "-", "agent": "ua-test/1.0"}
    assert lines[1]["request"] == "GET /pid?x=1&y=2 HTTP/1.1"
    assert lines[1]["referer"] == "http://example.test/"
    assert lines[1]["agent"] == "second agent"
    assert server.stop() == 0
    assert len(ACCESS_LINE.findall(server.log)) == 2, server.log


def test_no_access_log_by_default(serve):
    server = serve("apps_wsgi:main")
    for _ in range(3):
        assert fetch(server, "/hello?q", headers={"User-Agent": "ua-test/1.0"}).status == 200
    assert server.stop() == 0
    assert "GET /hello" not in server.log
    assert not ACCESS_LINE.findall(server.log)


@pytest.mark.parametrize("app", ["apps_http:app", "apps_http_asgi:app"], ids=["wsgi", "asgi"])
def test_access_log_to_a_closed_stdout_is_switched_off_and_the_worker_serves_on(serve, app):
    """``fastpool serve --access-log - | head -1`` once head has gone: the
    worker warns once and keeps serving; it neither crashes nor logs a traceback."""
    server = serve(app, "--access-log", "-", stdout_closed=True)
    (worker,) = server.booted_workers()
    for _ in range(3):
        status, _, body = fetch(server, "/pid")
        assert (status, body) == (200, str(worker).encode())
    # The worker's log thread writes within a second (README, Logs).
    warnings = wait_for(lambda: error_lines(server.log, "access log: stdout is closed"),
                        what=f"the warning:\n{server.log}")
    assert len(warnings) == 1 and f"[{worker}] [WARNING]" in warnings[0], server.log
    assert server.stop() == 0
    assert "Traceback" not in server.log and "BrokenPipeError" not in server.log, server.log
    assert "exited with code" not in server.log, server.log


def test_access_log_to_a_file(serve, tmp_path):
    path = tmp_path / "logs" / "access.log"
    path.parent.mkdir()
    server = serve("apps_wsgi:main", "--access-log", str(path))
    fetch(server, "/hello?from=file", headers={"User-Agent": "file-agent"})
    line = wait_for(lambda: path.exists() and ACCESS_LINE.search(path.read_text()),
                    what="the access log file")
    assert line["request"] == "GET /hello?from=file HTTP/1.1"
    assert line["agent"] == "file-agent"
    assert "GET /hello" not in server.log


# ---------------------------------------------------------------- binds


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def fetch_unix(path: str, target: str) -> Reply:
    """``fetch`` through the Unix socket at ``path``."""
    conn = UnixHTTPConnection(path)
    try:
        return fetch(conn, target)
    finally:
        conn.close()


def test_unix_socket(serve, tmp_path):
    path = str(tmp_path / "fastpool.sock")
    server = serve("apps_wsgi:main", "--bind", f"unix:{path}", "--workers", "2")
    assert f"unix:{path}" in server.log
    status, _, body = fetch_unix(path, "/hello")
    assert (status, body) == (200, b"Hello, WSGI!\n")
    pids = {int(fetch_unix(path, "/pid").body) for _ in range(5)}
    assert pids <= set(server.worker_pids())


def test_tcp_and_unix_binds_together(serve, tmp_path):
    path = str(tmp_path / "both.sock")
    port = free_port()
    server = serve("apps_wsgi:main", "--bind", f"127.0.0.1:{port}", "--bind", f"unix:{path}")
    status, _, body = fetch(server, "/hello")
    assert (status, body) == (200, b"Hello, WSGI!\n")
    status, _, body = fetch_unix(path, "/hello")
    assert (status, body) == (200, b"Hello, WSGI!\n")
    assert f"127.0.0.1:{port}" in server.log and f"unix:{path}" in server.log


# ---------------------------------------------------------------- settings


def test_chdir(serve, tmp_path):
    app_dir = tmp_path / "appdir"
    app_dir.mkdir()
    (app_dir / "fastpool_chdir_probe.py").write_text(
        "import os\n\n\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [os.getcwd().encode()]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = serve("fastpool_chdir_probe:app", "--chdir", str(app_dir), cwd=elsewhere)
    status, _, body = fetch(server, "/")
    assert (status, body) == (200, str(app_dir).encode())
    # Control: the module is only importable from that directory.
    failed = serve("fastpool_chdir_probe:app", wait=False, cwd=elsewhere)
    code, _ = wait_exit(failed, 15)
    assert code != 0
    assert "fastpool_chdir_probe" in failed.log


def test_web_concurrency_sets_the_worker_count(tmp_path):
    port = free_port()
    server = Server(["apps_wsgi:main", "--port", str(port)], port=port, workers=2,
                    env={"WEB_CONCURRENCY": "2"}, cwd=tmp_path, log_path=tmp_path / "wc.log")
    try:
        server.wait_ready()
        assert len(server.worker_pids()) == 2
        assert len(server.booted_workers()) == 2
        assert fetch(server, "/hello").status == 200
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGQUIT)


def test_workers_flag_overrides_web_concurrency(serve):
    server = serve("apps_wsgi:main", "--workers", "1", env={"WEB_CONCURRENCY": "3"})
    assert len(server.worker_pids()) == 1
    assert len(server.booted_workers()) == 1

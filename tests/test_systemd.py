"""systemd integration, black-box: socket activation, sd_notify, pid_file, env_file.

Activation is emulated as systemd does it: the test binds the sockets, and
``ACTIVATE`` (a tiny launcher) moves them to fds 3, 4, ..., sets
``LISTEN_PID`` to its own pid and ``LISTEN_FDS``, and execs ``fastpool
serve`` (exec keeps the pid, so the variables are the master's).  systemd's
side of sd_notify is a datagram socket bound by the test (``Notifications``),
given to the server as ``NOTIFY_SOCKET``.  Apps: tests/apps_systemd.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from client import fetch, fetch_json
from clusters import fastpool, render
from conftest import DEADLINE, Server, alive, child_env, free_port, stop_server, wait_exit, wait_for

# The launcher: ``python -c ACTIVATE FD... -- COMMAND...``.  The fds are first
# copied above the range they move to, so that none is overwritten before it moved.
ACTIVATE = """\
import fcntl, os, sys
end = sys.argv.index("--")
fds = [int(fd) for fd in sys.argv[1:end]]
copies = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(copies):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execvp(sys.argv[end + 1], sys.argv[end + 1:])
"""
SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID")


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds."""
    found = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


class Activated(Server):
    """``fastpool serve ARGS`` started through ACTIVATE with ``sockets`` as fds 3...."""

    def __init__(self, tmp_path: Path, args: list[str], sockets: list[socket.socket], *,
                 workers: int = 1, env: dict[str, str] | None = None,
                 names: str | None = None) -> None:
        env = dict(env or {})
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        fds = tuple(sock.fileno() for sock in sockets)
        super().__init__(args, port=None, workers=workers, env=env, cwd=tmp_path,
                         log_path=tmp_path / f"server-{time.monotonic_ns()}.log",
                         launcher=(sys.executable, "-c", ACTIVATE, *map(str, fds), "--"),
                         pass_fds=fds)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers to stop at the end of the test, however it ends."""
    started: list[Server] = []
    yield started
    for server in started:
        stop_server(server, signal.SIGQUIT)


def exited(server: Server) -> tuple[int, str]:
    code, _ = wait_exit(server)
    server._log.close()
    return code, server.log


# ---------------------------------------------------------------- socket activation


def test_activated_socket_replaces_the_default_address_and_is_not_rebound(
        tmp_path: Path, servers: list[Server]) -> None:
    sock = listening_socket()
    port = port_of(sock)
    server = Activated(tmp_path, ["apps_systemd:app", "--workers", "2"], [sock], workers=2)
    servers.append(server)
    server.wait_ready()
    shown = fetch_json(port, "/")
    assert f"Listening at: systemd (fd 3) http://127.0.0.1:{port} (group main, 2 worker(s))" \
        in server.log, server.log
    assert "127.0.0.1:8000" not in server.log, server.log
    # The socket is the test's own (the same inode in every worker), never a new one.
    for pid in server.worker_pids():
        assert inode(sock) in socket_inodes(pid), pid
    assert inode(sock) in socket_inodes(server.pid)
    # Nobody below the master sees systemd's variables.
    assert not set(SYSTEMD_VARIABLES) & set(shown), shown
    assert int(shown["_pid"]) in server.worker_pids()


def test_activated_sockets_replace_the_only_groups_listen_addresses(
        tmp_path: Path, servers: list[Server]) -> None:
    sock = listening_socket()
    port = port_of(sock)
    # The group's own address is systemd's port: as gunicorn, the socket replaces it.
    server = Activated(tmp_path, ["apps_systemd:web", "--bind", f"127.0.0.1:{port}"], [sock],
                       names="fastpool.socket")
    servers.append(server)
    server.wait_ready()
    assert fetch(port, "/").body == b"web"
    assert f"Listening at: systemd:fastpool.socket (fd 3) http://127.0.0.1:{port} (group main" \
        in server.log, server.log
    assert "Listening at: http://" not in server.log, server.log


def test_bind_systemd_name_and_check_shows_it(tmp_path: Path, servers: list[Server]) -> None:
    sock = listening_socket()
    port = port_of(sock)
    server = Activated(tmp_path, ["apps_systemd:web", "--bind", "systemd:web", "--bind",
                                  "unix:" + str(tmp_path / "also.sock")], [sock], names="web")
    servers.append(server)
    server.wait_ready()
    assert fetch(port, "/").body == b"web"
    assert f"Listening at: systemd:web (fd 3) http://127.0.0.1:{port} (group main" \
        in server.log, server.log
    assert f"Listening at: unix:{tmp_path / 'also.sock'}" in server.log, server.log

    # fastpool check under the same launcher shows what each address is.
    check = subprocess.run(
        [sys.executable, "-c", ACTIVATE, str(sock.fileno()), "--", sys.executable, "-m",
         "fastpool", "check", "apps_systemd:web", "--bind", "systemd:web"],
        pass_fds=(sock.fileno(),), cwd=tmp_path, capture_output=True, text=True,
        env=child_env({"LISTEN_FDNAMES": "web"}), timeout=DEADLINE)
    assert check.returncode == 0, check.stderr
    assert f"listen systemd:web (fd 3) http://127.0.0.1:{port}," in check.stdout, check.stdout
    # Without systemd's sockets, check still describes the plan.
    plain = fastpool("check", "apps_systemd:web", "--bind", "systemd:web", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "listen systemd:web (a socket systemd passes at start)" in plain.stdout, plain.stdout


def two_groups(tmp_path: Path, web: list[str], tast: list[str]) -> Path:
    path = tmp_path / "fastpool.toml"
    path.write_text(render(groups={"web": {"app": "apps_systemd:web", "listen": web},
                                   "tast": {"app": "apps_systemd:tast", "listen": tast}}))
    return path


def test_two_groups_take_their_sockets_by_name_and_keep_them_on_reload(
        tmp_path: Path, servers: list[Server]) -> None:
    web, tast = listening_socket(), listening_socket()
    config = two_groups(tmp_path, ["systemd:web"], ["systemd:tast"])
    server = Activated(tmp_path, ["--config", str(config)], [web, tast], workers=2,
                       names="web:tast")
    servers.append(server)
    server.wait_ready()
    wait_for(lambda: fetch(port_of(web), "/").body == b"web", what="group web")
    assert fetch(port_of(tast), "/").body == b"tast"
    assert f"systemd:web (fd 3) http://127.0.0.1:{port_of(web)} (group web" in server.log
    assert f"systemd:tast (fd 4) http://127.0.0.1:{port_of(tast)} (group tast" in server.log
    before = server.worker_pids()

    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: len(server.booted_workers()) >= 4 and not set(before)
             & set(server.worker_pids()) and len(server.worker_pids()) == 2,
             what=f"the reload's new workers:\n{server.log}")
    # The new workers serve on the same sockets.
    assert fetch(port_of(web), "/").body == b"web"
    assert fetch(port_of(tast), "/").body == b"tast"
    assert "changed its listen addresses" not in server.log


def test_sockets_without_systemd_addresses_and_two_groups_is_an_error(
        tmp_path: Path, servers: list[Server]) -> None:
    config = two_groups(tmp_path, [f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"])
    server = Activated(tmp_path, ["--config", str(config)],
                       [listening_socket(), listening_socket()], names="web:tast")
    servers.append(server)
    code, log = exited(server)
    assert code == 2, log
    assert log.strip() == (
        "Error: fastpool.toml: systemd passed 2 sockets (web, tast) and the config has 2 "
        "groups: say which group listens on which with listen = [\"systemd:NAME\"]"), log


def test_an_unknown_name_is_an_error_listing_the_names(tmp_path: Path,
                                                        servers: list[Server]) -> None:
    config = two_groups(tmp_path, ["systemd:web"], ["systemd:api"])
    server = Activated(tmp_path, ["--config", str(config)],
                       [listening_socket(), listening_socket()], names="web:tast")
    servers.append(server)
    code, log = exited(server)
    assert code == 2, log
    assert log.startswith("Error: fastpool.toml: [group.tast] listen: 'systemd:api': systemd "
                          "passed no socket named 'api' (it passed 'tast', 'web';"), log
    assert len(log.strip().splitlines()) == 1, log


def test_systemd_address_without_activation_is_an_error(tmp_path: Path) -> None:
    result = fastpool("serve", "apps_systemd:app", "--bind", "systemd", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: --bind: 'systemd': systemd passed no sockets to "
                                    "this process"), result.stderr


# ---------------------------------------------------------------- sd_notify


class Notifications:
    """systemd's end of NOTIFY_SOCKET: every datagram, with when it arrived."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.address = address
        self.received: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            at = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.received.append((at, fields))

    def messages(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.received)

    def states(self) -> list[str]:
        """The state changes in order: READY, RELOADING, STOPPING."""
        return [key for _, fields in self.messages() for key in fields
                if key in ("READY", "RELOADING", "STOPPING")]

    def wait(self, key: str, count: int = 1) -> tuple[float, dict[str, str]]:
        """The ``count``-th message with ``key``, once it has come."""
        def found() -> tuple[float, dict[str, str]] | None:
            matching = [m for m in self.messages() if key in m[1]]
            return matching[count - 1] if len(matching) >= count else None
        return wait_for(found, what=f"{key}=1 (#{count}); got {self.messages()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    listener = Notifications(str(tmp_path / "notify"))
    yield listener
    listener.close()


def imports_ended(records: Path) -> dict[int, float]:
    return {int(p.name.split("-")[1]): float(p.read_text()) for p in records.glob("imported-*")}


def test_ready_reloading_stopping_in_order(tmp_path: Path, notifications: Notifications,
                                           servers: list[Server]) -> None:
    records = tmp_path / "records"
    records.mkdir()
    sock = listening_socket()
    port = port_of(sock)
    server = Activated(tmp_path, ["apps_systemd:app", "--workers", "2"], [sock], workers=2,
                       env={"NOTIFY_SOCKET": notifications.address,
                            "APPS_SYSTEMD_IMPORT_DELAY": "0.7",
                            "APPS_SYSTEMD_RECORDS": str(records)})
    servers.append(server)

    ready_at, ready = notifications.wait("READY")
    # READY=1 came once a worker had imported the app (the group serves: the
    # master's "booted"), and the app answers at once.
    ended = imports_ended(records)
    assert ended and min(ended.values()) < ready_at, (ended, ready_at)
    shown = fetch_json(port, "/", timeout=2)
    assert ready["MAINPID"] == str(server.pid), ready
    assert ready["STATUS"] in ("serving: group main 1/2 workers",
                               "serving: group main 2/2 workers"), ready
    assert not set(SYSTEMD_VARIABLES) & set(shown), shown
    # STATUS= follows the workers: 2/2 once both serve.
    wait_for(lambda: any(fields.get("STATUS") == "serving: group main 2/2 workers"
                         for _, fields in notifications.messages()),
             what=f"STATUS 2/2: {notifications.messages()}")
    ended = imports_ended(records)
    assert len(ended) == 2, ended

    # A reload: RELOADING=1 with the monotonic clock, READY=1 once the new workers serve.
    first = set(ended)
    result = fastpool("reload", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reloading_at, reloading = notifications.wait("RELOADING")
    assert abs(int(reloading["MONOTONIC_USEC"]) / 1e6 - reloading_at) < 2.0, reloading
    again_at, again = notifications.wait("READY", 2)
    new = {pid: at for pid, at in imports_ended(records).items() if pid not in first}
    assert len(new) == 2 and max(new.values()) < again_at, (new, again_at)
    assert again["STATUS"] == "serving: group main 2/2 workers", again
    assert int(fetch_json(port, "/", timeout=2)["_pid"]) in new

    server.proc.send_signal(signal.SIGTERM)
    notifications.wait("STOPPING")
    assert wait_exit(server)[0] == 0, server.log
    assert notifications.states() == ["READY", "RELOADING", "READY", "STOPPING"], \
        notifications.messages()


def test_refused_and_failed_reloads_say_ready_with_the_reason(tmp_path: Path,
                                                   notifications: Notifications,
                                                   servers: list[Server]) -> None:
    port = free_port()
    config = tmp_path / "fastpool.toml"
    config.write_text(render(groups={"web": {"app": "apps_systemd:web",
                                             "listen": [f"127.0.0.1:{port}"]}}))
    server = Server(["--config", str(config)], port=port, workers=1, cwd=tmp_path,
                    env={"NOTIFY_SOCKET": notifications.address},
                    log_path=tmp_path / "server.log")
    servers.append(server)
    notifications.wait("READY")
    config.write_text("[group.web]\nworkers = \"many\"\n")
    os.kill(server.pid, signal.SIGHUP)
    notifications.wait("RELOADING")
    _, ready = notifications.wait("READY", 2)
    assert ready["STATUS"].startswith("reload refused: fastpool.toml: [group.web] workers: "
                                      "expected an integer"), ready

    # New workers that cannot boot: READY=1 again once the master gives up on them.
    config.write_text(render(groups={"web": {"app": "apps_systemd:missing",
                                             "listen": [f"127.0.0.1:{port}"]}}))
    os.kill(server.pid, signal.SIGHUP)
    notifications.wait("RELOADING", 2)
    _, ready = notifications.wait("READY", 3)
    assert ready["STATUS"] == ("reload failed: the new workers of group web cannot boot; the "
                               "old ones keep serving"), ready
    assert fetch(port, "/").body == b"web"
    assert notifications.states() == ["READY", "RELOADING", "READY", "RELOADING", "READY"]


def test_watchdog_pings_from_the_master_loop(tmp_path: Path, servers: list[Server]) -> None:
    listener = Notifications(f"@fastpool-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        port = free_port()
        server = Server(["apps_systemd:app", "--port", str(port)], port=port, workers=1,
                        cwd=tmp_path, log_path=tmp_path / "server.log",
                        env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"})
        servers.append(server)
        ready_at, _ = listener.wait("READY")
        listener.wait("WATCHDOG", 8)
        pings = [at for at, fields in listener.messages() if "WATCHDOG" in fields]
        # Every 0.1 s (half of WATCHDOG_USEC): never 0.2 s without one, the
        # first well before READY's neighbourhood ends, and not a flood either.
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 0.2, gaps
        assert pings[-1] - pings[0] > 0.08 * (len(pings) - 1), gaps
        assert pings[0] < ready_at + 0.2, (pings[0], ready_at)
        shown = fetch_json(port, "/")
        assert "WATCHDOG_USEC" not in shown and "NOTIFY_SOCKET" not in shown, shown
        server.proc.send_signal(signal.SIGTERM)
        listener.wait("STOPPING")
        assert wait_exit(server)[0] == 0
    finally:
        listener.close()


# ---------------------------------------------------------------- pid_file


def test_pid_file_written_refused_while_live_and_removed(tmp_path: Path,
                                                         servers: list[Server]) -> None:
    pid_file = tmp_path / "run" / "fastpool.pid"
    pid_file.parent.mkdir()
    port = free_port()
    first = Server(["apps_systemd:app", "--port", str(port), "--pid", str(pid_file)],
                   port=port, workers=1, env=None, cwd=tmp_path,
                   log_path=tmp_path / "first.log")
    servers.append(first)
    first.wait_ready()
    assert pid_file.read_text() == f"{first.pid}\n"

    # A second server (its own port and control socket) refuses, with one line.
    second = fastpool("serve", "apps_systemd:app", "--port", str(free_port()), "--pid",
                      str(pid_file), "--control-socket", str(tmp_path / "second.sock"),
                      cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    assert second.stderr == (f"Error: pid file {pid_file} names fastpool master {first.pid}, "
                             "which is running: stop it first, or use another --pid\n")
    assert pid_file.read_text() == f"{first.pid}\n"
    assert alive(first.pid)

    assert first.stop() == 0
    assert not pid_file.exists(), "the pid file outlived its master"


def test_stale_pid_file_is_overwritten(tmp_path: Path, servers: list[Server]) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid_file = tmp_path / "fastpool.pid"
    pid_file.write_text(gone.stdout)
    port = free_port()
    server = Server(["apps_systemd:app", "--port", str(port)], port=port, workers=1,
                    env={"FASTPOOL_PID_FILE": "fastpool.pid"}, cwd=tmp_path,
                    log_path=tmp_path / "server.log")
    servers.append(server)
    server.wait_ready()
    assert pid_file.read_text() == f"{server.pid}\n"


# ---------------------------------------------------------------- env_file


def test_env_file_reaches_the_app_not_the_settings_and_reloads(
        tmp_path: Path, servers: list[Server]) -> None:
    (tmp_path / "conf").mkdir()
    env_file = tmp_path / "conf" / "app.env"     # relative to the config file
    env_file.write_text("GREETING='hello from the file'\nKEPT=from the file\n"
                        "FASTPOOL_WORKERS=3\nWEB_CONCURRENCY=3\nDROPPED=soon\n")
    port = free_port()
    config = tmp_path / "conf" / "fastpool.toml"
    config.write_text(render(server={"env_file": "app.env", "preload": True},
                             groups={"main": {"app": "apps_systemd:app",
                                              "listen": [f"127.0.0.1:{port}"]}}))
    server = Server(["--config", str(config)], port=port, workers=1, cwd=tmp_path,
                    env={"KEPT": "from the environment"}, log_path=tmp_path / "server.log")
    servers.append(server)
    server.wait_ready()
    shown = fetch_json(port, "/")
    assert shown["GREETING"] == "hello from the file"
    assert shown["KEPT"] == "from the environment"        # the environment wins
    assert shown["FASTPOOL_WORKERS"] == "3"                # the app sees it...
    assert "(group main, 1 worker(s))" in server.log       # ...fastpool does not use it

    env_file.write_text("GREETING=changed\nWEB_CONCURRENCY=3\n")
    old = server.worker_pids()
    os.kill(server.pid, signal.SIGHUP)

    def reloaded() -> dict | None:
        answer = fetch_json(port, "/")
        return answer if int(answer["_pid"]) not in old else None
    shown = wait_for(reloaded, what=f"a new worker:\n{server.log}")
    assert shown["GREETING"] == "changed"
    assert "DROPPED" not in shown and "FASTPOOL_WORKERS" not in shown, shown
    assert shown["KEPT"] == "from the environment"
    # The reload read the settings again, not from the file: still one worker.
    status = fastpool("status", "--json", "--config", str(config), cwd=tmp_path)
    assert json.loads(status.stdout)["groups"][0]["workers_wanted"] == 1, status.stdout


def test_env_file_errors(tmp_path: Path) -> None:
    missing = fastpool("serve", "apps_systemd:app", "--env-file", "nope.env", cwd=tmp_path)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr == f"Error: env_file {tmp_path / 'nope.env'}: no such file\n"

    # Without python-dotenv (a stand-in that cannot be imported comes first on the path).
    blocked = tmp_path / "blocked"
    (blocked / "dotenv").mkdir(parents=True)
    (blocked / "dotenv" / "__init__.py").write_text("raise ImportError('not installed')\n")
    (tmp_path / "app.env").write_text("A=1\n")
    result = fastpool("check", "apps_systemd:app", "--env-file", "app.env", cwd=tmp_path,
                      env={"PYTHONPATH": os.pathsep.join([str(blocked),
                                                          str(Path(__file__).parent)])})
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("Error: env_file needs python-dotenv: pip install "
                             "'fastpool[dotenv]'\n")
    ok = fastpool("check", "apps_systemd:app", "--env-file", "app.env", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert f"env file: {tmp_path / 'app.env'}" in ok.stdout

"""Config-file servers (worker groups, routes), for the tests that need them.

What it holds: config files (``render``, ``group``, ``routed_group``), free
ports per group (``ports``), the ``fastpool`` command run to completion,
servers started with ``--config`` (``Cluster``, and ``Clusters``, which starts
them for one test and stops them all at its end; ``new_clusters`` for a
module-scoped fixture), the bounded load generator ``Load``, and ``served``
(the JSON that apps_routes.py answers with).

conftest's ``serve`` fixture adds ``--port`` and ``--workers`` (which would
override every group of a config file), so config-file servers are started
here, on top of conftest's ``Server``.  Rules: every wait is a deadline
(``conftest.wait_for``), never a fixed sleep; every ``Load`` stops within its
``limit``; every server is stopped (killed if need be) by ``Clusters.close``.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import Reply, Response, fetch
from conftest import DEADLINE, Server, alive, child_env, free_port, stop_server, wait_for

from fastpool.control import request as control_request

# ---------------------------------------------------------------- config files


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    return repr(value)


def render(server: dict[str, Any] | None = None, groups: dict[str, dict[str, Any]] | None = None,
           processes: dict[str, dict[str, Any]] | None = None) -> str:
    """A fastpool.toml with these tables."""
    lines: list[str] = []
    if server:
        lines.append("[server]")
        lines += [f"{key} = {toml_value(value)}" for key, value in server.items()]
    for kind, tables in (("group", groups or {}), ("process", processes or {})):
        for name, table in tables.items():
            lines.append(f"[{kind}.{name}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def group(port: int, workers: int = 1, app: str = "apps_groups:app", **more: Any) -> dict:
    """A group table that listens on ``port``."""
    return {"app": app, "listen": [f"127.0.0.1:{port}"], "workers": workers, **more}


def routed_group(app: str, routes: list[str], workers: int = 1, **more: Any) -> dict:
    """A group table without a listener, reached through its ``routes``."""
    return {"app": app, "routes": routes, "workers": workers, **more}


def ports(*names: str) -> dict[str, int]:
    """A free port per group name (distinct)."""
    chosen: dict[str, int] = {}
    while len(chosen) < len(names):
        port = free_port()
        if port not in chosen.values():
            chosen[names[len(chosen)]] = port
    return chosen


# ---------------------------------------------------------------- the fastpool command


def fastpool(*args: str, cwd: Path, timeout: float = 30.0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fastpool ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "fastpool", *args], cwd=cwd,
                          env=child_env(env), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- load


@dataclass
class Outcome:
    ok: bool
    pid: int
    started: float       # when the request was sent
    at: float            # when it ended
    detail: str = ""


@dataclass
class Load:
    """Client threads sending requests until ``stop`` (and never for more than
    ``limit`` seconds): ``fresh`` threads open a new connection per request,
    ``keep_alive`` threads reuse one (http.client reconnects by itself after a
    ``Connection: close``)."""

    port: int
    fresh: int = 3
    keep_alive: int = 0
    path: str = "/pid"
    limit: float = 30.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._fresh_client, daemon=True)
                         for _ in range(self.fresh)]
        self._threads += [threading.Thread(target=self._keep_alive_client, daemon=True)
                          for _ in range(self.keep_alive)]

    def __enter__(self) -> Load:
        self._deadline = time.monotonic() + self.limit
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _record(self, started: float, ok: bool, pid: int, detail: str = "") -> None:
        with self._lock:
            self.outcomes.append(Outcome(ok, pid, started, time.monotonic(), detail))

    def _check(self, started: float, reply: Reply) -> None:
        if reply.status == 200 and reply.pid:
            self._record(started, True, reply.pid)
        else:
            self._record(started, False, reply.pid,
                         f"status {reply.status}: {reply.body[:200]!r}")

    def _fresh_client(self) -> None:
        while self._running():
            started = time.monotonic()
            try:
                reply = fetch(self.port, self.path)
            except (OSError, http.client.HTTPException) as exc:
                self._record(started, False, 0, f"new connection: {exc!r}")
                continue
            self._check(started, reply)

    def _keep_alive_client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while self._running():
                started = time.monotonic()
                try:
                    reply = fetch(conn, self.path)
                except (OSError, http.client.HTTPException) as exc:
                    self._record(started, False, 0, f"keep-alive: {exc!r}")
                    conn.close()
                    continue
                self._check(started, reply)
        finally:
            conn.close()

    # ---- results

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok]

    def pids_since(self, moment: float) -> set[int]:
        return {o.pid for o in self.snapshot() if o.ok and o.at >= moment}

    def count_since(self, moment: float) -> int:
        return sum(1 for o in self.snapshot() if o.ok and o.at >= moment)


# ---------------------------------------------------------------- config-file servers


class Cluster(Server):
    """``fastpool serve --config FILE``: every group's port, the control socket."""

    def __init__(self, args: list[str], *, config: Path | None, ports: dict[str, int],
                 control: Path, workers: int, env: dict[str, str] | None, cwd: Path,
                 log_path: Path) -> None:
        super().__init__(args, port=None, workers=workers, env=env, cwd=cwd,
                         log_path=log_path)
        self.config = config
        self.ports = ports
        self.control = control
        self.cwd = cwd

    def wait_ready(self, timeout: float = DEADLINE) -> Cluster:
        super().wait_ready(timeout)
        for name, port in self.ports.items():
            self.port = port
            wait_for(self.can_connect, timeout, what=f"group {name} on port {port}")
        self.port = None
        return self

    def status(self) -> dict[str, Any]:
        """The master's status, straight from its control socket."""
        return control_request(self.control, {"command": "status"})

    def group_status(self, name: str) -> dict[str, Any]:
        for entry in self.status()["groups"]:
            if entry["name"] == name:
                return entry
        raise AssertionError(f"no group {name} in the status")

    def group_pids(self, name: str) -> list[int]:
        return sorted(w["pid"] for w in self.group_status(name)["workers"])

    def wait_group(self, name: str, count: int, exclude: set[int] = frozenset(),
                   timeout: float = DEADLINE) -> list[int]:
        """Wait until group ``name`` has exactly ``count`` workers, none in
        ``exclude``, all serving and alive; return their pids."""
        def settled() -> list[int] | None:
            workers = self.group_status(name)["workers"]
            pids = sorted(w["pid"] for w in workers)
            if len(pids) == count and not set(pids) & set(exclude) and all(
                    w["state"] == "serving" for w in workers) and all(map(alive, pids)):
                return pids
            return None
        return wait_for(settled, timeout, interval=0.05,
                        what=f"group {name} to have {count} new worker(s):\n{self.log}")

    def booted(self, group_name: str) -> list[int]:
        return [int(pid) for pid in re.findall(
            rf"Booting worker \d+ with pid: (\d+) \(group {re.escape(group_name)}\)", self.log)]

    def fastpool(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        extra = ("--config", str(self.config)) if self.config is not None else ()
        return fastpool(*args, *extra, cwd=self.cwd, timeout=timeout)


class Clusters:
    """Starts config-file servers for one test and stops them all at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Cluster] = []

    def start(self, text: str | None = None, *, workers: int, ports: dict[str, int],
              args: tuple[str, ...] = (), wait: bool = True, filename: str = "fastpool.toml",
              cwd: Path | None = None, env: dict[str, str] | None = None) -> Cluster:
        """Write ``text`` to ``filename`` and serve it (``text=None``: no
        --config, e.g. for pyproject.toml).  ``workers``: of all groups together."""
        cwd = cwd or self.tmp_path
        config = None
        argv = list(args)
        if text is not None:
            config = self.tmp_path / filename
            config.write_text(text)
            argv = ["--config", str(config), *argv]
        base = config.parent if config is not None else cwd
        server = Cluster(argv, config=config, ports=ports, control=base / ".fastpool.sock",
                         workers=workers, env=env, cwd=cwd,
                         log_path=self.tmp_path / f"server-{len(self.servers)}.log")
        self.servers.append(server)
        if wait:
            server.wait_ready()
        return server

    def close(self) -> None:
        for server in self.servers:
            stop_server(server, signal.SIGQUIT)
            server._log.close()


def new_clusters(tmp_path_factory: Any, name: str) -> tuple[Clusters, Path]:
    """``Clusters`` in a new directory, for a module-scoped fixture."""
    directory = tmp_path_factory.mktemp(name)
    return Clusters(directory), directory


def served(response: Response | Reply) -> dict:
    """The JSON description (apps_routes.py) of a 200 response."""
    assert response.status == 200, (response.status, response.body[:300])
    return json.loads(response.body)


"""The master's control socket, both sides: the server the master runs
(``ControlServer``) and the client of ``fastpool status``, ``fastpool
reload``, ``fastpool scale`` and ``fastpool restart`` (``request``,
``format_status``, ``format_watch``).

Rules of this module:

* One JSON request line per connection, one JSON reply line back; every reply
  has ``ok``, and ``error`` when it is false.
* The server answers from the master's loop, never from a thread or a signal
  handler: the loop calls ``ControlServer.serve`` when the socket is
  readable, and each command calls back into the master (``reload``,
  ``scale``, ``restart``) or reads its state (``status``, whose ``metrics``
  are fastpool.metrics' snapshot: the numbers /metrics serves).  ``scale``
  takes a group's or a process set's name; ``restart`` a process set's.
* One master per control socket: ``ControlServer.open`` refuses a socket
  another master (or any process) listens on (``ControlSocketInUse``) and
  replaces a stale file nobody listens on; the socket is created 0600.  A
  socket that cannot be bound costs only the commands (a warning), never the
  server.  Only the master removes the file; a forked child closes its copy.
* The client's errors are one line for the operator: no socket, nobody
  listening, or the master's own error text.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastpool import __version__, metrics

if TYPE_CHECKING:
    from fastpool.master import Master

log = logging.getLogger("fastpool.error")


class ControlError(Exception):
    """The master cannot be reached, or refused the command."""


# ---------------------------------------------------------------- the client

def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the master listening on ``path``; its reply, or
    ``ControlError`` with the one line to show."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is fastpool running "
                               "(with this --config / --control-socket)?") from None
        except ConnectionRefusedError:
            raise ControlError(f"nobody listens on {path}: the master is gone") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the master at {path}: {exc}") from None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the master at {path} sent an unreadable reply") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error") or "the master refused the command"))
    return reply


def _tls_status(context: Any) -> str | None:
    """A group's TLS in one line: its certificate's subject and expiry, and
    whether the kernel takes the records after the handshake."""
    if context is None:
        return None
    from fastpool import tls

    available, why = tls.kernel_tls()
    kernel = "on" if context.options & getattr(ssl, "OP_ENABLE_KTLS", 0) else (
        "off" if available else f"not available: {why}")
    return f"{tls.certificate_summary(context)}; kernel TLS {kernel}"


def format_status(status: dict[str, Any]) -> str:
    """The human-readable ``fastpool status``."""
    lines = [f"fastpool {status['version']}, master pid {status['master']}"]
    for group in status["groups"]:
        lines.append("")
        lines.append(
            f"group {group['name']} ({group['state']}): {group['app']}, "
            f"{len(group['workers'])}/{group['workers_wanted']} worker(s) x "
            f"{group['threads']} thread(s), {group['restarts']} restart(s)")
        lines.append(f"  listen: {', '.join(group['listen']) or '-'}")
        if group.get("tls"):
            lines.append(f"  tls: {group['tls']}")
        if group.get("routes") or group.get("handed_in") or group.get("handed_out"):
            lines.append(
                f"  routes: {', '.join(group.get('routes') or []) or '-'}; handed in "
                f"{group.get('handed_in', 0)}, handed out {group.get('handed_out', 0)}, "
                f"shed (503) {group.get('shed', 0)}, pending now {group.get('pending', 0)}")
        lines.append("  slot  pid      requests  current request  rss        age       state")
        for w in group["workers"]:
            current = f"{w['current_request_s']:.1f}s" if w["current_request_s"] is not None \
                else "-"
            rss = f"{w['rss_kib'] / 1024:.1f} MiB" if w["rss_kib"] is not None else "-"
            lines.append(f"  {w['slot']:<5} {w['pid']:<8} {w['requests']:<9} {current:<16} "
                         f"{rss:<10} {w['age_s']:<9.0f} {w['state']}")
    for process in status["processes"]:
        lines.append("")
        pids = ", ".join(str(p) for p in process["pids"]) or "-"
        what = process["target"] if process.get("command") is None else \
            shlex.join(process["command"])
        lines.append(f"process {process['name']} ({process['state']}): {what}, "
                     f"{len(process['pids'])}/{process['count']} running (pids {pids}), "
                     f"{process['restarts']} restart(s), last exit: "
                     f"{process.get('last_exit') or '-'}")
        if process.get("copies"):
            lines.append("  index pid      uptime    state")
            for copy in process["copies"]:
                lines.append(f"  {copy['index']:<5} {copy['pid']:<8} "
                             f"{copy['uptime_s']:<8.0f}s {copy['state']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the server (in the master)

class ControlSocketInUse(Exception):
    """Another process listens on this server's control socket."""


def control_socket_user(path: Path) -> str | None:
    """Who listens on the control socket ``path`` ("another fastpool master
    (pid N)"), or None when nobody does: no file, or a stale one."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except PermissionError:
        return "a process this user may not reach (another user's fastpool master?)"
    except OSError:
        return None     # not a usable socket path: binding it says why
    finally:
        probe.close()
    try:
        reply = request(path, {"command": "status"}, timeout=2)
        return f"another fastpool master (pid {int(reply['master'])})"
    except (ControlError, OSError, KeyError, TypeError, ValueError):
        return "another process (it does not answer as a fastpool master)"


class ControlServer:
    """The master's control socket: listens at ``path`` (fixed when the
    master starts: a reload cannot move it) and answers each command by
    calling back into ``master``."""

    def __init__(self, path: Path, master: Master) -> None:
        self.path = path
        self.master = master
        self.sock: socket.socket | None = None     # None: not listening

    def open(self) -> None:
        """Listen on the control socket; raise ``ControlSocketInUse`` when a
        master already listens there (a stale file with nobody behind it is
        replaced)."""
        path = self.path
        in_use = control_socket_user(path)
        if in_use is not None:
            raise ControlSocketInUse(
                f"control socket {path} is in use by {in_use}; stop that one, or give this "
                "server its own socket with --control-socket PATH (control_socket in "
                "[server] of the config file)")
        try:
            if path.exists() or path.is_symlink():
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)     # created 0600: only this user may steer it
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
            sock.listen(16)
            sock.setblocking(False)
            sock.set_inheritable(False)
        except OSError as exc:
            log.warning("no control socket at %s (%s): fastpool status/reload/scale "
                        "are unavailable", path, exc.strerror or exc)
            return
        self.sock = sock

    def close(self) -> None:
        """Stop listening and remove the socket file (the master, when it stops)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                self.path.unlink()
            except OSError:
                pass

    def close_in_child(self) -> None:
        """A forked child's copy of the socket: closed, the file left to the master."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def serve(self) -> None:
        """Answer every connection waiting on the socket."""
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    data = b""
                    while not data.endswith(b"\n") and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    reply = self.command(json.loads(data or b"{}"))
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "error": f"bad control request: {exc}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def command(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The reply to one request: status, reload, scale or restart."""
        master = self.master
        command = request.get("command")
        if command == "status":
            return {"ok": True, **status(master)}
        if command == "reload":
            group = request.get("group")
            if group is not None and group not in master.groups:
                return {"ok": False, "error": f"no group named {group!r}"}
            error = master.reload(only=group)
            return {"ok": error is None, "error": error}
        if command == "scale":
            name = request.get("group")
            is_process = name in master.processes.groups
            if name not in master.groups and not is_process:
                return {"ok": False, "error": f"no group or process named {name!r}"}
            try:
                delta = int(request.get("delta", 0))
            except (TypeError, ValueError):
                return {"ok": False, "error": "delta must be an integer"}
            count = master.scale(name, delta)
            return {"ok": True, "copies": count} if is_process else {"ok": True, "workers": count}
        if command == "restart":
            name = request.get("process")
            if name not in master.processes.groups:
                hint = (f" ({name} is a group: fastpool reload --group {name})"
                        if name in master.groups else "")
                return {"ok": False, "error": f"no process named {name!r}{hint}"}
            master.restart(name)
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {command!r}"}


def status(master: Master) -> dict[str, Any]:
    """The ``status`` reply: every group with its workers, every process."""
    now = time.monotonic()
    numbers = metrics.snapshot(master)
    groups = []
    for name, group in master.groups.items():
        workers = []
        counts = numbers["groups"][name]
        for child in sorted(master.children.values(), key=lambda c: (c.slot, c.pid)):
            if child.kind != "worker" or child.name != name:
                continue
            record = master.scoreboard.read(child.board_slot)
            rss = metrics.rss_bytes(child.pid)
            workers.append({
                "pid": child.pid, "slot": child.slot, "requests": record.requests,
                "current_request_s": round(now - record.busy_since, 3)
                if record.busy_since else None,
                "rss_kib": None if rss is None else rss // 1024,
                "age_s": round(now - child.started, 1),
                "state": "retiring" if child.retiring else record.state,
                "generation": child.generation, "shed": record.shed,
            })
        queues = master.queues
        groups.append({
            "name": name, "app": group.config.app, "state": group.state,
            "listen": group.listeners.describe(), "workers_wanted": group.wanted,
            "threads": group.config.threads, "restarts": group.restarts,
            "interface": group.config.interface, "routes": group.config.routes,
            "handed_in": counts["handed_in"], "handed_out": counts["handed_out"],
            "pending": queues.pending(name) if queues is not None else 0,
            "shed": queues.shed(name) if queues is not None else 0,
            "tls": _tls_status(group.tls),
            "workers": workers,
            "metrics": counts,
        })
    processes = []
    for name, process in master.processes.groups.items():
        copies = sorted(master.processes.instances(name), key=lambda c: (c.slot, c.pid))
        processes.append({
            "name": name, "target": process.config.target,
            "command": list(process.config.command) if process.config.command else None,
            "count": process.wanted, "restarts": process.restarts, "state": process.state,
            "last_exit": process.last_exit, "pids": sorted(c.pid for c in copies),
            "copies": [{"index": c.slot, "pid": c.pid, "uptime_s": round(now - c.started, 1),
                        "state": "stopping" if c.retiring else "running"} for c in copies],
        })
    return {"master": master.pid, "version": __version__, "groups": groups,
            "processes": processes, "bounds": numbers["bounds"], "time": numbers["time"]}


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def format_watch(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """One frame of ``fastpool status --watch``: per group the workers by
    state, requests per second and p50/p99 over the time since ``previous``
    (the same counts as /metrics), in flight, shed, pending handoffs and the
    listen queue."""
    stamp = time.strftime("%H:%M:%S", time.localtime(current["time"]))
    lines = [f"fastpool {current['version']}, master pid {current['master']}, {stamp}"]
    bounds = current.get("bounds") or []
    before = {g["name"]: g.get("metrics") for g in (previous or {}).get("groups", [])}
    elapsed = current["time"] - previous["time"] if previous else 0.0
    for group in current["groups"]:
        numbers = group.get("metrics")
        lines.append("")
        if not numbers:
            lines.append(f"group {group['name']} ({group['state']}): no numbers yet")
            continue
        states = ", ".join(f"{state} {count}" for state, count in numbers["workers"].items())
        lines.append(f"group {group['name']} ({group['state']}): "
                     f"{len(group['workers'])}/{group['workers_wanted']} worker(s): {states}")
        durations = numbers["durations"]
        requests = sum(durations)
        old = before.get(group["name"])
        if old and elapsed > 0:
            durations = [a - b for a, b in zip(durations, old["durations"], strict=True)]
            rate = f"{(requests - sum(old['durations'])) / elapsed:.1f}"
        else:
            rate = "-"
        queue = ", ".join(f"{q['queue']}/{q['backlog']}" for q in numbers["listen"]) or "-"
        lines.append(
            f"  req/s {rate}  p50 {_milliseconds(metrics.quantile(bounds, durations, 0.5))}  "
            f"p99 {_milliseconds(metrics.quantile(bounds, durations, 0.99))}  "
            f"in flight {numbers['in_flight']}  connections {numbers['connections']}  "
            f"shed {numbers['shed']}  pending {numbers['pending']}  listen queue {queue}  "
            f"restarts {sum(numbers['restarts'].values())}")
    return "\n".join(lines)

"""The client side of the master's control socket: ``fastpool status``,
``fastpool reload``, ``fastpool scale``.

Rules: one JSON request line per connection, one JSON reply line back (the
master's side is ``Master.serve_control``).  Errors are one line for the
operator: no socket, nobody listening, or the master's own error text.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class ControlError(Exception):
    """The master cannot be reached, or refused the command."""


def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
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
        lines.append(f"process {process['name']} ({process['state']}): {process['target']}, "
                     f"{len(process['pids'])}/{process['count']} running (pids {pids}), "
                     f"{process['restarts']} restart(s)")
    return "\n".join(lines)

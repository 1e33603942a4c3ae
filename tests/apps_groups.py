"""The app and process targets of the worker-group tests (test_groups.py,
test_supervision.py, test_config.py), importable as ``apps_groups:NAME``.

``app`` routes on PATH_INFO; every response carries the worker's pid in an
``X-Pid`` header.  Routes:

* ``/pid``: the pid as the body.
* ``/sleep?s=N&tag=T``: writes ``sleeping T PID`` to wsgi.errors (the server
  log), sleeps N seconds in ``time.sleep``, answers ``slept N PID``.
* ``/csleep?s=N&tag=T``: the same, but stuck in C: libc ``sleep`` via ctypes.
* ``/select?tag=T``: the same, blocked in ``select`` on a pipe nobody writes to.
* ``/environ``: a few environ keys as JSON.
* anything else: ``hello PID``.

``consume`` runs forever (a custom process); ``brief_job`` returns after a
moment (so its process is respawned).  Both print to stdout and stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import sys
import time
from urllib.parse import parse_qs


def _query(environ) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _announce(environ, tag: str) -> None:
    errors = environ["wsgi.errors"]
    errors.write(f"sleeping {tag} {os.getpid()}\n")
    errors.flush()


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    query = _query(environ)
    pid = os.getpid()
    content_type = "text/plain"
    if path == "/pid":
        body = str(pid)
    elif path == "/sleep":
        seconds = float(query.get("s", "1"))
        _announce(environ, query.get("tag", "-"))
        time.sleep(seconds)
        body = f"slept {seconds} {pid}"
    elif path == "/csleep":
        seconds = int(float(query.get("s", "1")))
        _announce(environ, query.get("tag", "-"))
        ctypes.CDLL(None).sleep(seconds)
        body = f"slept {seconds} {pid}"
    elif path == "/select":
        read_end, write_end = os.pipe()
        _announce(environ, query.get("tag", "-"))
        select.select([read_end], [], [])
        body = f"woke {pid}"
    elif path == "/environ":
        content_type = "application/json"
        body = json.dumps({
            "pid": pid,
            "SCRIPT_NAME": environ.get("SCRIPT_NAME"),
            "PATH_INFO": path,
            "wsgi.multithread": environ.get("wsgi.multithread"),
            "wsgi.multiprocess": environ.get("wsgi.multiprocess"),
        })
    else:
        body = f"hello {pid}"
    data = body.encode()
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(data))), ("X-Pid", str(pid))])
    return [data]


def consume() -> None:
    """A long-running custom process (``[process.mailer]``)."""
    pid = os.getpid()
    print(f"mailer stdout {pid}", flush=True)
    print(f"mailer stderr {pid}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 600   # bounded even if nobody stops it
    while time.monotonic() < deadline:
        time.sleep(0.2)


def brief_job() -> None:
    """A custom process that returns soon after it starts, to be respawned."""
    pid = os.getpid()
    print(f"job stdout {pid}", flush=True)
    print(f"job stderr {pid}", file=sys.stderr, flush=True)
    time.sleep(0.2)


def announce() -> None:
    """A custom process that says who it is (``[process.NAME]``'s name and
    index, its env table, its working directory), then waits."""
    print(f"target {os.environ['FASTPOOL_PROCESS_NAME']} {os.environ['FASTPOOL_PROCESS_INDEX']} "
          f"{os.environ.get('GREETING')} {os.getcwd()}", flush=True)
    deadline = time.monotonic() + 600   # bounded even if nobody stops it
    while time.monotonic() < deadline:
        time.sleep(0.2)

"""The apps of the systemd, pid_file and env_file tests (test_systemd.py),
importable as ``apps_systemd:NAME``.

* ``app``: the worker's ``os.environ`` as JSON (what an app sees of the
  server's environment), with its pid as ``_pid``.
* ``web`` and ``tast``: their own name as the body (which group answered).

With ``APPS_SYSTEMD_IMPORT_DELAY=S`` the import takes S seconds; with
``APPS_SYSTEMD_RECORDS=DIR`` each import writes ``DIR/imported-PID`` holding
the CLOCK_MONOTONIC time (``time.monotonic``, the same clock in every
process) at which it ended, so a test can tell whether systemd heard READY=1
before the app could answer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

_delay = float(os.environ.get("APPS_SYSTEMD_IMPORT_DELAY") or 0)
if _delay:
    time.sleep(_delay)
_records = os.environ.get("APPS_SYSTEMD_RECORDS")
if _records:
    Path(_records, f"imported-{os.getpid()}").write_text(repr(time.monotonic()))


def _answer(start_response, body: bytes, content_type: str = "text/plain") -> list[bytes]:
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    shown = dict(os.environ, _pid=str(os.getpid()))
    return _answer(start_response, json.dumps(shown).encode(), "application/json")


def web(environ, start_response):
    return _answer(start_response, b"web")


def tast(environ, start_response):
    return _answer(start_response, b"tast")

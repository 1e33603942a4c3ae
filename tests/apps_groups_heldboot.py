"""``apps_groups:app`` behind an import that waits while the file named by
$TEST_BOOT_HOLD exists (30 s at most): a test keeps workers booting for as
long as it needs, then lets them finish (test_supervision.py).  Each worker
writes ``boot held PID`` to stderr when its import starts waiting."""

from __future__ import annotations

import os
import sys
import time

from apps_groups import app

__all__ = ["app"]

_hold = os.environ.get("TEST_BOOT_HOLD")
if _hold and os.path.exists(_hold):
    print(f"boot held {os.getpid()}", file=sys.stderr, flush=True)
    _deadline = time.monotonic() + 30
    while os.path.exists(_hold) and time.monotonic() < _deadline:
        time.sleep(0.02)

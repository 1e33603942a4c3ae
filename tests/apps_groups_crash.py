"""A group app that crash-loops on demand (test_supervision.py).

While a file named ``crash-after-boot`` exists in the server's working
directory, every worker that imports this module dies (``os._exit(1)``) 0.2 s
later, right after it has booted.  Without the file it is ``apps_groups:app``.
"""

from __future__ import annotations

import os
import threading

from apps_groups import app

__all__ = ["app"]

if os.path.exists("crash-after-boot"):
    _timer = threading.Timer(0.2, os._exit, (1,))
    _timer.daemon = True
    _timer.start()

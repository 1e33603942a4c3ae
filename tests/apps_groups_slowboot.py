"""``apps_groups:app`` behind an import that takes a second: a group whose
workers are still booting while another group's workers already run
(test_supervision.py)."""

from __future__ import annotations

import time

from apps_groups import app

__all__ = ["app"]

time.sleep(1.0)

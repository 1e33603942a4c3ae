"""Error log and access log.

Rules: the error log goes to stderr, one line per event, with a timestamp and
the pid (``[2026-11-28 18:14:39 +0000] [1234] [INFO] message``).  The access
log is off unless asked for; when on, the worker calls ``AccessLog.__call__``
once per response with a gunicorn-style line (common log format plus referer
and user agent).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"

logger = logging.getLogger("fastpool.error")


def setup_error_log(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root = logging.getLogger("fastpool")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class AccessLog:
    """Writes ``h - - [t] "r" s b "f" "a"`` lines (gunicorn's default format)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.stream: TextIO = self._open()

    def _open(self) -> TextIO:
        if self.target == "-":
            return sys.stdout
        return open(self.target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def reopen(self) -> None:
        if self.target != "-":
            self.stream.close()
            self.stream = self._open()

    def __call__(self, environ: dict[str, Any], status: int, size: int, duration: float) -> None:
        request_line = (
            f"{environ.get('REQUEST_METHOD', '-')} {environ.get('RAW_URI', '-')} "
            f"{environ.get('SERVER_PROTOCOL', '-')}"
        )
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        self.stream.write(
            f'{environ.get("REMOTE_ADDR") or "-"} - - [{stamp}] "{request_line}" {status} '
            f'{size or "-"} "{environ.get("HTTP_REFERER", "-")}" '
            f'"{environ.get("HTTP_USER_AGENT", "-")}"\n'
        )
        self.stream.flush()

"""Error log and access log.

Rules: the error log goes to stderr, one line per event, with a timestamp and
the pid (``[2026-11-28 18:14:39 +0000] [1234] [INFO] message``).  The lines
a command process writes are events of the master's log too (logger
``fastpool.output``, ``[NAME INDEX] line``), logged whatever ``log_level`` is.  The access
log is off unless asked for; when on, the worker calls ``AccessLog.__call__``
once per response with a gunicorn-style line (common log format plus referer
and user agent).  An access log on stdout whose reader has gone (``fastpool
serve --access-log - | head``) is switched off with one warning per worker:
the worker keeps serving.
"""

from __future__ import annotations

import logging
import os
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
    # The lines of supervised programs (fastpool.process) are their own log,
    # not fastpool's chatter: log_level does not hide them.
    logging.getLogger("fastpool.output").setLevel(logging.INFO)


class AccessLog:
    """Writes ``h - - [t] "r" s b "f" "a"`` lines (gunicorn's default format)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.stream: TextIO | None = self._open()

    def _open(self) -> TextIO:
        if self.target == "-":
            return sys.stdout
        return open(self.target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def reopen(self) -> None:
        if self.target != "-" and self.stream is not None:
            self.stream.close()
            self.stream = self._open()

    def __call__(self, environ: dict[str, Any], status: int, size: int, duration: float) -> None:
        if self.stream is None:
            return
        request_line = (
            f"{environ.get('REQUEST_METHOD', '-')} {environ.get('RAW_URI', '-')} "
            f"{environ.get('SERVER_PROTOCOL', '-')}"
        )
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        try:
            self.stream.write(
                f'{environ.get("REMOTE_ADDR") or "-"} - - [{stamp}] "{request_line}" {status} '
                f'{size or "-"} "{environ.get("HTTP_REFERER", "-")}" '
                f'"{environ.get("HTTP_USER_AGENT", "-")}"\n'
            )
            self.stream.flush()
        except BrokenPipeError:
            if self.target != "-":
                raise
            self._stdout_gone()

    def _stdout_gone(self) -> None:
        """Nobody reads stdout any more: stop writing there, keep serving."""
        self.stream = None
        # What is still buffered must not fail again at the worker's exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        logger.warning("access log: stdout is closed (its reader went away); this worker "
                       "writes no more access log lines")

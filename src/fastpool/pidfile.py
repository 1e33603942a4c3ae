"""``pid_file``: the master's pid in a file, as gunicorn's ``--pid`` writes it.

Rules of this module:

* The master writes its pid (a line) at start, after the control socket is
  its own and before it binds or forks anything, through a temporary file
  renamed into place (a reader never sees half a file); it removes the file
  at exit, only while the file still names it.
* A file that names a running fastpool master (a live process, not this one,
  whose command line is fastpool's) refuses the start: ``PidFileInUse``, one
  line, exit 2.  Any other file (a dead pid, a pid reused by another
  program, garbage) is stale and overwritten.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fastpool.settings import ConfigError


class PidFileInUse(Exception):
    """The pid file names another running fastpool master."""


def _is_fastpool_master(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass     # alive, someone else's: its command line still tells
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # The master's title (setproctitle) or its command line: fastpool ... serve.
    text = b" ".join(words)
    return text.startswith(b"fastpool: master") or (
        b"fastpool" in text and b"serve" in words)


class PidFile:
    """The pid file of one master (``path`` None: none)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pid = 0

    def create(self, pid: int) -> None:
        if self.path is None:
            return
        try:
            other = int(self.path.read_text().strip() or "0")
        except (OSError, ValueError):
            other = 0
        if other and other != pid and _is_fastpool_master(other):
            raise PidFileInUse(f"pid file {self.path} names fastpool master {other}, which is "
                               "running: stop it first, or use another --pid")
        temporary = ""
        try:
            handle, temporary = tempfile.mkstemp(dir=self.path.parent,
                                                 prefix=f".{self.path.name}.")
            with os.fdopen(handle, "w") as out:
                out.write(f"{pid}\n")
                os.fchmod(out.fileno(), 0o644)
            os.replace(temporary, self.path)
        except OSError as exc:
            if temporary:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            raise ConfigError(f"pid file {self.path}: {exc.strerror or exc}") from None
        self.pid = pid

    def remove(self) -> None:
        if self.path is None or not self.pid:
            return
        try:
            if int(self.path.read_text().strip() or "0") == self.pid:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.pid = 0

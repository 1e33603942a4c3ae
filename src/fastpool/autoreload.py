"""Reload on code change (``--reload``, ``reload = true``): for development.

Rules of this module:

* Off unless asked for (``reload``); ``fastpool check`` says whether it is on.
* The master runs no watcher thread: a thread that holds a lock (logging's)
  while the master forks would leave that lock held forever in the child.
  The watcher is a child process that the master forks (``Watcher.start``)
  and supervises (a watcher that dies is started again after
  ``RESTART_DELAY``; it dies with the master, PR_SET_PDEATHSIG).  It writes
  one line per batch of changes to a pipe that the master's loop selects on
  (``Watcher.read``); the master logs the changed files and runs its
  ordinary rolling reload (``Master.reload``), so a new worker that cannot
  boot leaves the old ones serving, and the next change tries again.
* What is watched is a ``Plan`` (``plan``): the ``reload_dirs`` (default:
  the current directory, after ``--chdir``), recursively, and the config
  file.  A file counts when its name matches an include glob and no
  directory between it and the watched directory matches an exclude glob;
  the operator's own globs win over the defaults for a file's name
  (``--reload-include .env`` watches ``.env`` although ``.*`` is a default
  exclude; ``--reload-exclude`` beats any include).
* watchfiles when it can be imported (and ``reload_watcher`` is not
  ``poll``), else the watcher compares modification times and sizes every
  ``POLL_INTERVAL``.  Either way a burst of changes (an editor that writes
  several files, a ``git checkout``) is one batch: it is sent once
  ``QUIET`` seconds pass without another change.
* With ``preload``, a reload first drops every module loaded from a watched
  file from the master's ``sys.modules`` (``forget_modules``; not fastpool's,
  nor installed packages') and imports the app again, so the new workers
  fork from new code.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpool.settings import ConfigError, ServerConfig
from fastpool.worker import child_setup, set_title

log = logging.getLogger("fastpool.error")

DEFAULT_INCLUDES = ("*.py",)
# Dot-files and dot-directories (.git, .venv, .#emacs-locks), byte code, and
# what editors write beside the file they save (vim's swap files and its
# "4913" write test, backups ending in ~, temporary files).
DEFAULT_EXCLUDES = (".*", "__pycache__", "*.swp", "*.swo", "*~", ".#*", "4913", "*.tmp")
POLL_INTERVAL = 1.0      # seconds between two looks of the poller
QUIET = 0.4              # seconds without a change that end a burst (both watchers)
DEBOUNCE_MAX = 1.6       # seconds a never-ending burst is held at most (watchfiles)
WATCHFILES_TIMEOUT = 0.3  # seconds: watchfiles' idle turns (the first says it watches)
RESTART_DELAY = 1.0      # seconds before a watcher that died is started again
NAMES_SENT = 10          # changed files named in one batch (the rest are counted)
INSTALL_HINT = "pip install 'fastpool[reload]' for watchfiles"


def watchfiles_available() -> bool:
    return importlib.util.find_spec("watchfiles") is not None


@dataclass(frozen=True)
class Plan:
    """What the watcher watches, and with what."""

    dirs: tuple[Path, ...]
    includes: tuple[str, ...]          # the operator's own
    excludes: tuple[str, ...]          # the operator's own
    config_file: Path | None
    backend: str                       # "watchfiles" or "poll"

    def roots(self) -> tuple[Path, ...]:
        """The directories given to the watcher: the dirs, and the config
        file's directory when it is outside them."""
        roots = list(self.dirs)
        if self.config_file is not None and self._root_of(self.config_file) is None:
            roots.append(self.config_file.parent)
        return tuple(roots)

    def _root_of(self, path: Path) -> Path | None:
        for root in self.dirs:
            if path == root or root in path.parents:
                return root
        return None

    def dir_excluded(self, name: str) -> bool:
        return _matches(name, DEFAULT_EXCLUDES) or _matches(name, self.excludes)

    def file_wanted(self, name: str) -> bool:
        if _matches(name, self.excludes):
            return False
        if _matches(name, self.includes):
            return True
        return not _matches(name, DEFAULT_EXCLUDES) and _matches(name, DEFAULT_INCLUDES)

    def wanted(self, path: str | Path) -> bool:
        """Whether a change of ``path`` (absolute) asks for a reload."""
        path = Path(path)
        if path == self.config_file:
            return True
        root = self._root_of(path)
        if root is None or path == root:
            return False
        parts = path.relative_to(root).parts
        return not any(self.dir_excluded(part) for part in parts[:-1]) and \
            self.file_wanted(parts[-1])

    def describe(self) -> str:
        return ", ".join(str(d) for d in self.dirs)

    def summary(self) -> str:
        """One line for ``fastpool check``."""
        backend = "watchfiles" if self.backend == "watchfiles" else f"polling ({INSTALL_HINT})"
        return (f"reload on code change: ON (development only): {self.describe()} with "
                f"{backend}; include {', '.join(DEFAULT_INCLUDES + self.includes)}; exclude "
                f"{', '.join(DEFAULT_EXCLUDES + self.excludes)}"
                + (f"; and {self.config_file}" if self.config_file is not None else ""))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def plan(config: ServerConfig, cwd: Path, source: str = "reload_dirs") -> Plan | None:
    """The watch plan of ``config`` (None: reload is off).  ``cwd`` is the
    server's current directory (after ``--chdir``): the default directory,
    and the base of relative ones when there is no config file; ``source``
    names where reload_dirs came from (``settings.source_of``)."""
    if not config.reload:
        return None
    base = config.path.parent if config.path is not None else cwd
    dirs = []
    for text in config.reload_dirs or (str(cwd),):
        directory = (base / text).resolve()
        if not directory.is_dir():
            what = "not a directory" if directory.exists() else "no such directory"
            raise ConfigError(f"{source}: {text}: {what} ({directory})")
        if directory not in dirs:
            dirs.append(directory)
    if config.reload_watcher == "watchfiles" and not watchfiles_available():
        raise ConfigError(f"reload_watcher is watchfiles, but watchfiles is not installed "
                          f"({INSTALL_HINT})")
    backend = "poll" if config.reload_watcher == "poll" or not watchfiles_available() \
        else "watchfiles"
    return Plan(dirs=tuple(dirs), includes=tuple(config.reload_includes),
                excludes=tuple(config.reload_excludes), config_file=config.path,
                backend=backend)


# ---------------------------------------------------------------- the child


def _changes_watchfiles(plan: Plan) -> Iterator[set[str]]:
    """Batches of changed files; the first (maybe empty) once the watches are set."""
    import watchfiles

    def wanted(change: Any, path: str) -> bool:
        return plan.wanted(path)

    # yield_on_timeout: an empty batch every WATCHFILES_TIMEOUT, the first of
    # which says that watching has begun.
    for changes in watchfiles.watch(*plan.roots(), watch_filter=wanted,
                                    debounce=int(DEBOUNCE_MAX * 1000),
                                    step=int(QUIET * 1000),
                                    rust_timeout=int(WATCHFILES_TIMEOUT * 1000),
                                    yield_on_timeout=True):
        yield {path for _, path in changes}


def snapshot(plan: Plan) -> dict[str, tuple[int, int]]:
    """Every watched file's (modification time in ns, size)."""
    seen: dict[str, tuple[int, int]] = {}

    def look(path: str) -> None:
        try:
            stat = os.stat(path)
        except OSError:
            return
        seen[path] = (stat.st_mtime_ns, stat.st_size)

    for root in plan.dirs:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not plan.dir_excluded(d)]
            for name in files:
                if plan.file_wanted(name):
                    look(os.path.join(directory, name))
    if plan.config_file is not None:
        look(str(plan.config_file))
    return seen


def _difference(before: dict[str, tuple[int, int]],
                after: dict[str, tuple[int, int]]) -> set[str]:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def _changes_polling(plan: Plan) -> Iterator[set[str]]:
    """Batches of changed files; the first (empty) once the first look is done."""
    before = snapshot(plan)
    yield set()
    while True:
        time.sleep(POLL_INTERVAL)
        now = snapshot(plan)
        changed = _difference(before, now)
        if not changed:
            continue
        while True:   # the rest of the burst
            time.sleep(QUIET)
            later = snapshot(plan)
            more = _difference(now, later)
            now = later
            if not more:
                break
            changed |= more
        before = now
        yield changed


def _shown(path: str) -> str:
    """A changed file as the log names it: relative to the current directory
    when it is below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def run_watcher(plan: Plan, write_fd: int, master_pid: int) -> int:
    """The watcher child: one JSON line per batch of changes to ``write_fd``."""
    set_title("fastpool: reload watcher")
    child_setup(master_pid, 0, ())
    # The master's stop signals end the watcher at once: it has nothing to finish.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if plan.backend == "watchfiles":
        try:
            import watchfiles  # noqa: F401 - here, for a broken install's one clear line
        except ImportError as exc:
            log.warning("Reload: watchfiles cannot be imported (%s); polling instead", exc)
            plan = dataclasses.replace(plan, backend="poll")
    if plan.backend == "watchfiles":
        how = "with watchfiles"
        batches = _changes_watchfiles(plan)
    else:
        how = f"by polling ({INSTALL_HINT})"
        batches = _changes_polling(plan)
    watching = False
    with os.fdopen(write_fd, "w", buffering=1) as pipe:
        for changed in batches:
            if not watching:
                # Said once the watches are set: a change from now on is seen.
                log.info("Reload: watching %s %s", plan.describe(), how)
                watching = True
            if not changed:
                continue
            names = sorted(_shown(path) for path in changed)
            pipe.write(json.dumps({"changed": names[:NAMES_SENT],
                                   "count": len(names)}) + "\n")
    return 0


# ---------------------------------------------------------------- the master's side


@dataclass
class Batch:
    """One burst of changes: some of the files' names, and how many there were."""

    names: list[str]
    count: int

    def describe(self) -> str:
        more = self.count - len(self.names)
        return ", ".join(self.names) + (f" and {more} more" if more > 0 else "")


class Watcher:
    """The master's handle on its watcher child."""

    def __init__(self, plan: Plan, fork: Callable[[Callable[[], int], list[Any]], int],
                 master_pid: int) -> None:
        self.plan = plan
        self._fork = fork
        self._master_pid = master_pid
        self.pid = 0
        self.fd = -1
        self._buffer = b""
        self._restart_at = 0.0
        self.stopped = False

    def start(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self.fd = read_fd

        def child() -> int:
            self.close_in_child()   # (the master's fork has closed it already when it knows us)
            return run_watcher(self.plan, write_fd, self._master_pid)

        try:
            self.pid = self._fork(child, [])
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)

    def maintain(self) -> None:
        """Start the watcher (again) when it should run and does not."""
        if not self.pid and not self.stopped and time.monotonic() >= self._restart_at:
            self._close()
            self.start()

    def read(self) -> list[Batch]:
        """The batches the watcher has sent since the last look."""
        if self.fd < 0:
            return []
        ended = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                ended = True    # the watcher is gone; reaping says how
                break
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if ended:
            self._close()
        batches = []
        for line in lines:
            try:
                record = json.loads(line)
                batches.append(Batch(list(record["changed"]), int(record["count"])))
            except (ValueError, KeyError, TypeError):
                continue
        return batches

    def exited(self, pid: int, how: str) -> bool:
        """True when ``pid`` was the watcher (reaped, ``how`` it ended)."""
        if not pid or pid != self.pid:
            return False
        self.pid = 0
        if not self.stopped:
            log.warning("Reload: the watcher (pid %d) ended (%s); starting it again", pid, how)
            self._restart_at = time.monotonic() + RESTART_DELAY
        return True

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self.stopped = True
        if self.pid:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def close_in_child(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self._buffer = b""


def forget_modules(plan: Plan) -> None:
    """Drop from ``sys.modules`` every module loaded from a file the watcher
    watches, so that the next import reads it afresh.  Kept: fastpool's own
    modules and installed packages (a virtualenv inside a watched directory),
    whose second import could break them (extension modules, registries)."""
    installed = tuple(str(Path(sysconfig.get_paths()[key]).resolve()) + os.sep
                      for key in ("purelib", "platlib"))
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name == "fastpool" or name.startswith("fastpool."):
            continue
        path = os.path.realpath(path)
        if plan.wanted(path) and not path.startswith(installed):
            del sys.modules[name]
    importlib.invalidate_caches()

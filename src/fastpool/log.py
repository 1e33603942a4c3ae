"""Error log and access log.

Rules of this module:

* The error log (logger ``fastpool.error``, handler on ``fastpool``) goes to
  stderr or to the ``error_log`` file, one line per event, with a timestamp and
  the pid (``[2026-11-28 18:14:39 +0000] [1234] [INFO] message``).  The lines a
  command process writes are events of the master's log too (logger
  ``fastpool.output``, ``[NAME INDEX] line``), logged whatever ``log_level`` is.
  ``log_config`` (a ``logging.config.dictConfig`` file, JSON or TOML) is applied
  after these defaults; it is read and applied before the master starts, so a
  bad one stops ``fastpool serve`` with one line (exit 2).  SIGUSR1 reopens every
  plain ``logging.FileHandler`` of fastpool's loggers and of the root logger,
  the error log's included (``reopen_files``), in the master and in every worker.
* The access log is off unless asked for (``access_log``, or a ``log_config``
  that configures ``fastpool.access``: then each line is the message of a
  record of that logger).  When on, the worker calls ``AccessLog.__call__`` once
  per response; it renders the line (``access_log_format``: gunicorn's atoms,
  or ``json``) and queues it.  Every string from the request is escaped so that
  a line is one line and its quoting holds (``text_escape``, ``json_escape``).
* Design of the writes: a worker never writes an access line itself.  A
  writer thread (started in the worker, after the fork) takes the queued lines
  at least once a second (``FLUSH_SECONDS``) and writes them in one ``write``.
  A thread, not the loop's once-a-second sweep, because a write to a slow disk
  (or a full pipe) then blocks only the thread, which waits without the GIL,
  never the loop that serves.  The queue is a ``collections.deque``: its append
  and popleft are atomic, so the hot path takes no lock.  ``AccessLog.close``
  (run_worker's ``finally``, which every way out of a worker passes: a graceful
  stop, QUIT, max_requests, a crash) stops the thread and writes what is still
  queued; the lines of a worker killed by SIGKILL or SIGABRT (``timeout``) are
  lost, at most a second's worth.
* An access log on stdout whose reader has gone (``fastpool serve --access-log
  - | head``) is switched off with one warning per worker: the worker keeps
  serving.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"

# gunicorn's default access_log_format: the common log format plus referer and user agent.
GUNICORN_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
JSON_FORMAT = "json"
# The longest a logged line waits in a worker's queue before it is written.
FLUSH_SECONDS = 1.0
# The logger that carries access lines when log_config configures it.
ACCESS_LOGGER = "fastpool.access"

logger = logging.getLogger("fastpool.error")

# Set by setup_logs when log_config configures fastpool.access (workers
# inherit it across the fork): access lines then go through that logger.
_access_via_logger = False
# setup_logs has run (the CLI does it before the master starts).
_setup_done = False


class LogConfigError(Exception):
    """log_config or error_log cannot be used; the message says which and why (one line)."""


# ---------------------------------------------------------------- error log

def setup_error_log(level: str = "info", error_log: str = "-") -> None:
    """fastpool's default error log: stderr (``-``) or the file ``error_log``."""
    if error_log == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(error_log, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root = logging.getLogger("fastpool")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # The lines of supervised programs (fastpool.process) are their own log,
    # not fastpool's chatter: log_level does not hide them.
    logging.getLogger("fastpool.output").setLevel(logging.INFO)


def read_log_config(path: str) -> dict[str, Any]:
    """The dictConfig mapping of a ``.json`` or ``.toml`` file."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".toml"):
        raise LogConfigError(f"log_config: {path}: expected a .json or .toml file")
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise LogConfigError(f"log_config: {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw) if suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if suffix == ".json" else "TOML"
        raise LogConfigError(f"log_config: {path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise LogConfigError(f"log_config: {path}: expected a mapping (dictConfig schema)")
    return data


def setup_logs(level: str = "info", error_log: str = "-", log_config: str | None = None
               ) -> None:
    """The master's logging, inherited by every worker: the defaults, then
    ``log_config`` on top of them."""
    global _access_via_logger, _setup_done
    try:
        setup_error_log(level, error_log)
    except OSError as exc:
        raise LogConfigError(f"error_log: {error_log}: {exc.strerror}") from None
    _setup_done = True
    if log_config is None:
        return
    data = read_log_config(log_config)
    data.setdefault("version", 1)
    # Loggers it does not name keep working (fastpool's own, the app's).
    data.setdefault("disable_existing_loggers", False)
    import logging.config  # only here: most servers have no log_config

    try:
        logging.config.dictConfig(data)
    except (ValueError, TypeError, AttributeError, ImportError, OSError) as exc:
        message = " ".join(str(exc).split())
        cause = exc.__cause__
        if cause is not None and str(cause) not in message:
            message += f": {' '.join(str(cause).split())}"
        raise LogConfigError(f"log_config: {log_config}: {message}") from None
    _access_via_logger = ACCESS_LOGGER in (data.get("loggers") or {})


def log_setup_done() -> bool:
    """Whether setup_logs has configured this process's logging."""
    return _setup_done


def access_via_logger() -> bool:
    """Whether log_config configured ``fastpool.access`` (the access log is on, through it)."""
    return _access_via_logger


def reopen_files() -> None:
    """Reopen the plain FileHandlers of fastpool's loggers and the root logger
    (logrotate's create/move: the file was renamed, the next line starts a new one)."""
    names = [None, "fastpool", "fastpool.error", "fastpool.output", ACCESS_LOGGER]
    names += [n for n in logging.root.manager.loggerDict if n.startswith("fastpool.")]
    seen: set[int] = set()
    for name in names:
        for handler in logging.getLogger(name).handlers:
            # Subclasses (rotating, watched) manage their files themselves.
            if type(handler) is not logging.FileHandler or id(handler) in seen:
                continue
            seen.add(id(handler))
            with handler.lock:    # type: ignore[union-attr]
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()


def reopen_files_soon() -> None:
    """``reopen_files`` from a signal handler: in a thread of its own, which
    waits for a handler's lock like any writer (the interrupted code may hold it)."""
    threading.Thread(target=reopen_files, name="fastpool-reopen", daemon=True).start()


# ---------------------------------------------------------------- escaping

# What a string from the request may hold that a line must not show as is:
# control characters, quote, backslash, and anything not ASCII.
_NEEDS_ESCAPE = re.compile(r'[^\x20-\x21\x23-\x5b\x5d-\x7e]').search


def _raw(value: str) -> bytes:
    """The bytes a request string stands for (the environ decodes them as latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:    # an app put other text in its environ
        return value.encode("utf-8", "surrogateescape")


def _byte_escapes(controls: bool, quote: bool) -> dict[int, str]:
    """The str.translate table: a byte that is not UTF-8 (a surrogateescape
    code point) as ``\\xNN``, a backslash as ``\\\\``; controls and ``"`` when asked."""
    table = {0xDC80 + i: f"\\x{0x80 + i:02x}" for i in range(128)}
    table[ord("\\")] = "\\\\"
    if controls:
        table.update({c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]})
    if quote:
        table[ord('"')] = '\\"'
    return table


_TEXT_ESCAPES = _byte_escapes(controls=True, quote=True)
_JSON_ESCAPES = _byte_escapes(controls=False, quote=False)


def text_escape(value: str) -> str:
    """A request string for a text line (as nginx and gunicorn do): UTF-8 text
    kept, ``\\xNN`` for a control character or a byte that is not UTF-8, ``\\"``
    and ``\\\\`` for a quote and a backslash."""
    if not _NEEDS_ESCAPE(value):
        return value
    return _raw(value).decode("utf-8", "surrogateescape").translate(_TEXT_ESCAPES)


def json_escape(value: str) -> str:
    """A request string as a JSON value: its bytes decoded as UTF-8, a byte
    that is not UTF-8 as the four characters ``\\xNN`` and a backslash as two
    (so that the value says which was which); json.dumps escapes the rest."""
    if not _NEEDS_ESCAPE(value):
        return value
    return _raw(value).decode("utf-8", "surrogateescape").translate(_JSON_ESCAPES)


# ---------------------------------------------------------------- formats

def header_key(name: str) -> str:
    """The environ key of request header ``name`` (CGI: Content-Type has no HTTP_)."""
    key = name.strip().upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def request_path(environ: dict[str, Any]) -> str:
    """The request target's path, percent-decoded (as latin-1 text of its bytes)."""
    path = environ.get("RAW_URI", "").partition("?")[0]
    if "%" not in path:
        return path
    return unquote_to_bytes(path).decode("latin-1")


# Each gunicorn atom: its value from (environ, status, size, duration, log),
# already escaped where it comes from the request.
Atom = Callable[[dict[str, Any], int, int, float, "AccessLog"], str]
ATOMS: dict[str, Atom] = {
    "h": lambda e, s, b, d, log: text_escape(e.get("REMOTE_ADDR") or "-"),
    "l": lambda e, s, b, d, log: "-",
    "u": lambda e, s, b, d, log: "-",
    "t": lambda e, s, b, d, log: time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
    "r": lambda e, s, b, d, log: text_escape(
        f"{e.get('REQUEST_METHOD', '-')} {e.get('RAW_URI', '-')} "
        f"{e.get('SERVER_PROTOCOL', '-')}"),
    "m": lambda e, s, b, d, log: text_escape(e.get("REQUEST_METHOD", "-")),
    "U": lambda e, s, b, d, log: text_escape(request_path(e)),
    "q": lambda e, s, b, d, log: text_escape(e.get("QUERY_STRING", "")),
    "H": lambda e, s, b, d, log: text_escape(e.get("SERVER_PROTOCOL", "-")),
    "s": lambda e, s, b, d, log: str(s),
    "B": lambda e, s, b, d, log: str(b),
    "b": lambda e, s, b, d, log: str(b) if b else "-",
    "f": lambda e, s, b, d, log: text_escape(e.get("HTTP_REFERER", "-")),
    "a": lambda e, s, b, d, log: text_escape(e.get("HTTP_USER_AGENT", "-")),
    "T": lambda e, s, b, d, log: str(int(d)),
    "M": lambda e, s, b, d, log: str(int(d * 1000)),
    "D": lambda e, s, b, d, log: str(int(d * 1_000_000)),
    "L": lambda e, s, b, d, log: f"{d:.6f}",
    "p": lambda e, s, b, d, log: f"<{log.pid}>",
}
_ATOM = re.compile(r"%\(([^)]*)\)")
_HEADER_ATOM = re.compile(r"\{([A-Za-z0-9!#$&'*+.^_`|~-]+)\}([io])")


def _header_atom(key: str) -> Atom:
    return lambda e, s, b, d, log: text_escape(e.get(key, "-"))


def compile_format(fmt: str) -> tuple[str, dict[str, Atom], tuple[str, ...]]:
    """A gunicorn access_log_format as (the %-format, its atoms, the request
    headers it logs, lowercased); ValueError names what is wrong."""
    atoms: dict[str, Atom] = {}
    headers: list[str] = []
    for name in _ATOM.findall(fmt):
        if name in ATOMS:
            atoms[name] = ATOMS[name]
            continue
        match = _HEADER_ATOM.fullmatch(name)
        if match is None:
            raise ValueError(f"unknown atom %({name})s (known: "
                             f"{' '.join(ATOMS)}, {{header}}i)")
        if match.group(2) == "o":
            raise ValueError(f"%({name})s: response headers ({{header}}o) are not supported")
        atoms[name] = _header_atom(header_key(match.group(1)))
        headers.append(match.group(1).lower())
    try:
        fmt % dict.fromkeys(atoms, "")
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a %(atom)s format: {exc}") from None
    return fmt, atoms, tuple(headers)


def check_format(value: str) -> str:
    """The access_log_format row's check."""
    if value != JSON_FORMAT:
        compile_format(value)
    return value


def _json_or_null(environ: dict[str, Any], key: str) -> str | None:
    value = environ.get(key)
    return None if value is None else json_escape(value)


def json_line(environ: dict[str, Any], status: int, size: int, duration: float,
              log: AccessLog) -> str:
    """The ``json`` access_log_format: one object per line (README lists the keys)."""
    return json.dumps({
        "timestamp": datetime.now().astimezone().isoformat(timespec="milliseconds"),
        "remote_addr": json_escape(environ.get("REMOTE_ADDR") or "-"),
        "method": json_escape(environ.get("REQUEST_METHOD", "-")),
        "path": json_escape(request_path(environ)),
        "query": json_escape(environ.get("QUERY_STRING", "")),
        "protocol": json_escape(environ.get("SERVER_PROTOCOL", "-")),
        "status": status,
        "bytes": size,
        "duration_us": int(duration * 1_000_000),
        "user_agent": _json_or_null(environ, "HTTP_USER_AGENT"),
        "referer": _json_or_null(environ, "HTTP_REFERER"),
        "group": log.group,
        "pid": log.pid,
        "request_id": _json_or_null(environ, "HTTP_X_REQUEST_ID"),
    }, ensure_ascii=False, separators=(",", ":"))


def asgi_environ(client: Any, method: str, target: bytes, http_version: str,
                 headers: Any, wanted: frozenset[bytes]) -> dict[str, str]:
    """What an access line needs of an ASGI request, as WSGI environ keys
    (latin-1 text of the bytes): the request line and the ``wanted`` headers."""
    raw = target.decode("latin-1")
    environ = {
        "REMOTE_ADDR": client[0] if client else "-",
        "REQUEST_METHOD": method,
        "RAW_URI": raw,
        "QUERY_STRING": raw.partition("?")[2],
        "SERVER_PROTOCOL": f"HTTP/{http_version}",
    }
    for name, value in headers:
        if name in wanted:
            environ[header_key(name.decode("latin-1"))] = value.decode("latin-1")
    return environ


# ---------------------------------------------------------------- access log

class AccessLog:
    """One worker's access log: renders a line per response and queues it for
    the writer thread (module docstring)."""

    def __init__(self, target: str | None, fmt: str = GUNICORN_FORMAT,
                 group: str = "") -> None:
        self.target = target
        self.group = group
        self.pid = os.getpid()
        self.fd = -1
        # The access logger of log_config, when it configures one.
        self.logger = logging.getLogger(ACCESS_LOGGER) if access_via_logger() else None
        self.render: Callable[[dict[str, Any], int, int, float, AccessLog], str]
        headers: tuple[str, ...] = ("referer", "user-agent")
        if fmt == JSON_FORMAT:
            self.render = json_line
            headers += ("x-request-id",)
        else:
            template, atoms, extra = compile_format(fmt)
            headers += extra
            items = tuple(atoms.items())

            def render(environ: dict[str, Any], status: int, size: int, duration: float,
                       log: AccessLog) -> str:
                return template % {name: atom(environ, status, size, duration, log)
                                   for name, atom in items}
            self.render = render
        # The request headers the lines show (the ASGI worker passes only these).
        self.headers = frozenset(h.encode("latin-1") for h in headers)
        self.queue: collections.deque[Any] = collections.deque()
        self.wake = threading.Event()
        self.reopen_asked = False
        self.closing = False
        if self.logger is None:
            self.fd = self._open()
        self.thread = threading.Thread(target=self._write_loop, name="fastpool-access-log",
                                       daemon=True)
        self.thread.start()

    def _open(self) -> int:
        if self.target is None or self.target == "-":
            return sys.stdout.fileno()
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o644)

    def __call__(self, environ: dict[str, Any], status: int, size: int, duration: float
                 ) -> None:
        line = self.render(environ, status, size, duration, self)
        if self.logger is not None:
            # Made here: the record's time is the response's, not the write's.
            self.queue.append(logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0,
                                                line, None, None))
        else:
            self.queue.append(line)

    def reopen(self) -> None:
        """SIGUSR1: the writer writes what is queued, then reopens the file."""
        self.reopen_asked = True
        self.wake.set()

    def close(self) -> None:
        """The worker stops: write everything still queued (in this thread once
        the writer is done), close the file."""
        self.closing = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join()
        self._flush()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1

    def _write_loop(self) -> None:
        while not self.closing:
            self.wake.wait(FLUSH_SECONDS)
            self.wake.clear()
            try:
                self._flush()
                if self.reopen_asked:
                    self.reopen_asked = False
                    if self.logger is None and self.target not in (None, "-"):
                        old, self.fd = self.fd, self._open()
                        os.close(old)
            except Exception:
                logger.exception("access log: writing %s failed", self.target)

    def _flush(self) -> None:
        queue = self.queue
        count = len(queue)
        if not count:
            return
        items = [queue.popleft() for _ in range(count)]
        if self.logger is not None:
            for record in items:
                self.logger.handle(record)
            return
        if self.fd < 0:
            return    # stdout's reader went away
        data = ("\n".join(items) + "\n").encode("utf-8", "surrogateescape")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except BrokenPipeError:
            if self.target not in (None, "-"):
                raise
            self._stdout_gone()

    def _stdout_gone(self) -> None:
        """Nobody reads stdout any more: stop writing there, keep serving."""
        self.fd = -1
        # What is still buffered must not fail again at the worker's exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        logger.warning("access log: stdout is closed (its reader went away); this worker "
                       "writes no more access log lines")

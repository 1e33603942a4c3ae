"""The life of one worker process, after the master forks it.

Rules of this module:

* It runs only in a forked child and always ends in ``os._exit`` (called by
  the master's spawn code), never by returning into the master's stack.
* Boot failures are reported once, through the master's boot pipe, and the
  exit code says which kind: ``APP_LOAD_ERROR`` (the app cannot be imported)
  or ``WORKER_BOOT_ERROR`` (anything else before serving).  The master prints
  the message a single time and stops instead of respawning.
* Signals: TERM = graceful stop, QUIT = immediate exit, INT and HUP are the
  master's business (a Ctrl-C reaches the whole process group; the master then
  stops the workers in order).  The worker also stops when the master dies:
  PR_SET_PDEATHSIG, backed by a getppid check in the loop.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from fastpool import core
from fastpool.loading import AppLoadError, import_app
from fastpool.log import AccessLog
from fastpool.settings import Config
from fastpool.sockets import BoundSocket

WORKER_BOOT_ERROR = 3
APP_LOAD_ERROR = 4

PR_SET_PDEATHSIG = 1

log = logging.getLogger("fastpool.error")


def _die_with_master(master_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the loop's getppid check still catches an orphaned worker
    if os.getppid() != master_pid:
        # The master died between fork and prctl.
        os._exit(0)


def report_boot_failure(boot_fd: int, message: str) -> None:
    """Send the failure to the master in one atomic write (<= PIPE_BUF)."""
    data = (f"{os.getpid()}\0{message}"[:4000] + "\x1e").encode("utf-8", "replace")
    try:
        os.write(boot_fd, data)
    except OSError:
        sys.stderr.write(message + "\n")


def base_environ(bound: BoundSocket, config: Config, errors: Any) -> dict[str, Any]:
    """The environ keys that are the same for every request on one socket."""
    name, port = bound.server_name_port
    return {
        # Set for every request or connection; present here so that copying
        # this dict gives a table large enough that they are updates, not
        # inserts that resize the dict on every request.
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "",
        "QUERY_STRING": "",
        "RAW_URI": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "",
        "REMOTE_PORT": "",
        "wsgi.input": None,
        "SERVER_NAME": name,
        "SERVER_PORT": port,
        "SCRIPT_NAME": config.root_path.rstrip("/"),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": errors,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }


def run(
    *,
    config: Config,
    slot: int,
    sockets: list[BoundSocket],
    app: Callable[..., Any] | None,
    master_pid: int,
    boot_fd: int,
) -> int:
    """Boot and serve until told to stop; return the process exit code."""
    try:
        _die_with_master(master_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        wsgi = core.load()
        if app is None:
            app = import_app(config.app)
        environ_base = []
        for bound in sockets:
            base = base_environ(bound, config, sys.stderr)
            base["wsgi.file_wrapper"] = wsgi.FileWrapper
            environ_base.append((bound.sock.fileno(), bound.is_tcp, base, bound.shared))
        loop = wsgi.WSGIWorker(
            app,
            environ_base,
            limits=wsgi_limits(config),
            keep_alive=config.keep_alive,
            header_timeout=config.header_timeout,
            graceful_timeout=config.graceful_timeout,
            root_path=config.root_path,
            access_log=AccessLog(config.access_log) if config.access_log else None,
            master_pid=master_pid,
        )
    except AppLoadError as exc:
        report_boot_failure(boot_fd, f"App failed to load: {exc}")
        return APP_LOAD_ERROR
    except Exception:
        report_boot_failure(boot_fd, f"Worker failed to boot:\n{traceback.format_exc()}")
        return WORKER_BOOT_ERROR

    def graceful(signum: int, frame: Any) -> None:
        loop.stop(True)

    def immediate(signum: int, frame: Any) -> None:
        # Raised wherever the worker is, even inside the app: QUIT means now.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGQUIT, immediate)
    # Everything imported so far lives as long as the worker: move it out of
    # the cyclic GC's generations so collections only scan per-request garbage.
    gc.collect()
    gc.freeze()
    # Requests free their objects by reference counting; a young-generation
    # collection every 700 allocations costs more than it finds.
    gc.set_threshold(7000, 10, 10)
    log.info("Booting worker %d with pid: %d", slot, os.getpid())
    loop.run()
    return 0


def wsgi_limits(config: Config) -> Any:
    from fastpool._http import Limits

    return Limits(
        config.limit_request_line,
        config.limit_request_fields,
        config.limit_request_field_size,
        config.limit_request_body,
    )

"""The life of a forked worker of a group (a supervised process's is in
``fastpool.process``, which shares ``child_setup`` and ``set_title``).

Rules of this module:

* It runs only in a forked child, and its entry point returns the exit code
  for the master's fork code to pass to ``os._exit``; nothing returns into
  the master's stack.
* A worker tells the master about itself through the notify pipe, one
  atomic record per event, written by ``notify`` and read back by
  ``parse_notices`` (the master's ``read_notices``): ``READY`` once it serves,
  or a boot failure whose kind says which (``APP_LOAD_ERROR``: the app cannot
  be imported; ``BOOT_ERROR``: anything else before serving) with the one
  message the operator sees.  ``EXIT_CODES`` gives each failure its exit code
  (4 and 3): the worker's, and the server's when it stops at start-up.
* Signals in a worker mean what ``fastpool.signals`` says (TERM = graceful
  stop, USR2 = retire, QUIT = immediate exit, USR1 = reopen the log files;
  the master's signals are ignored), and the handlers are installed from
  that table.  From its first instruction (the master blocks these signals
  across the fork, ``catch_boot_signals`` takes them in the child) a worker
  that is still booting keeps a TERM or USR2 as "stop requested" and, once
  its boot is done, exits 0 without serving; a QUIT exits at once, with 0; a
  USR1 reopens the log files once it is booted.  No default action ever
  kills a booting worker.  SIGABRT dumps every thread's Python stack
  (faulthandler) before the process dies: that is how the master's
  ``timeout`` shows where a worker was stuck.
* A child stops when the master dies: PR_SET_PDEATHSIG, backed by a getppid
  check in the loop.
"""

from __future__ import annotations

import ctypes
import enum
import faulthandler
import gc
import logging
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from fastpool import core, signals
from fastpool.lifespan import LifespanFailure
from fastpool.loading import AppLoadError, import_app, resolve_interface
from fastpool.log import AccessLog, access_via_logger, reopen_files_soon
from fastpool.settings import GroupConfig
from fastpool.sockets import BoundSocket

if TYPE_CHECKING:
    import ssl

    from fastpool.handoff import Routing  # imports the compiled core

WORKER_BOOT_ERROR = 3
APP_LOAD_ERROR = 4


class Notice(enum.Enum):
    """The kind of a record in the notify pipe."""

    READY = "READY"                      # the worker serves
    APP_LOAD_ERROR = "APP_LOAD_ERROR"    # boot failed: the app cannot be imported
    BOOT_ERROR = "BOOT_ERROR"            # boot failed: anything else


# A boot failure's exit code: the worker's, and the server's when it stops at start-up.
EXIT_CODES = {Notice.APP_LOAD_ERROR: APP_LOAD_ERROR, Notice.BOOT_ERROR: WORKER_BOOT_ERROR}

PR_SET_PDEATHSIG = 1

# What a booting worker was asked (read once it has booted): the stop signal
# it received (0: none), and whether to reopen its log files.
_stop_requested = 0
_reopen_requested = False

log = logging.getLogger("fastpool.error")


class BootError(Exception):
    """A worker cannot start for a reason its message states in one line."""


def set_title(title: str) -> None:
    """``ps`` shows ``title`` when setproctitle is installed (fastpool[proctitle])."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def catch_boot_signals() -> None:
    """The first thing a forked worker does (while the master still blocks
    its signals): what the master asks during the boot is kept for when the
    worker has booted, never fatal; the master's own signals are ignored."""
    for signum in signals.WORKER_SIGNALS:
        signal.signal(signum, _while_booting)
    for signum in signals.MASTERS_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _while_booting(signum: int, frame: Any) -> None:
    global _stop_requested, _reopen_requested
    action = signals.WORKER_ACTIONS[signal.Signals(signum)]
    if action == signals.REOPEN_LOG:
        _reopen_requested = True
        return
    _stop_requested = signum
    if action == signals.QUIT:
        raise SystemExit(0)    # QUIT means now, booted or not


def notify(fd: int, kind: Notice, message: str = "") -> None:
    """One record to the master: ``PID\\0KIND\\0MESSAGE\\x1e`` in one write (<= PIPE_BUF)."""
    record = f"{os.getpid()}\0{kind.value}\0{message[:3900]}\x1e".encode("utf-8", "replace")
    try:
        os.write(fd, record)
    except OSError:
        if message:
            sys.stderr.write(message + "\n")


def parse_notices(data: bytes) -> Iterator[tuple[int, Notice, str]]:
    """The records in ``data`` (what the master read from the notify pipe) as
    ``(pid, kind, message)``; anything unreadable is skipped."""
    for record in data.decode("utf-8", "replace").split("\x1e"):
        pid_text, _, rest = record.partition("\0")
        kind_text, _, message = rest.partition("\0")
        if not pid_text.strip().isdigit():
            continue
        try:
            kind = Notice(kind_text)
        except ValueError:
            continue
        yield int(pid_text), kind, message


def boot_failed(fd: int, kind: Notice, message: str) -> int:
    """Tell the master why this worker cannot boot; return its exit code."""
    notify(fd, kind, message)
    return EXIT_CODES[kind]


def child_setup(master_pid: int, nice: int, cpus: Sequence[int],
                death_signal: int = signal.SIGTERM) -> None:
    """What every forked child does first: die with the master (it gets
    ``death_signal`` when the master dies), leave the master's signals to it,
    take its niceness and CPUs."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the loop's getppid check still catches an orphaned child
    if os.getppid() != master_pid:
        os._exit(0)   # the master died between fork and prctl
    for signum in signals.MASTERS_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    for signum in signals.DEFAULT_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    if nice:
        os.nice(nice - os.nice(0))
    if cpus:
        os.sched_setaffinity(0, cpus)


def base_environ(bound: BoundSocket | None, group: GroupConfig,
                 errors: Any) -> dict[str, Any]:
    """The environ keys that are the same for every request on one socket."""
    name, port = bound.server_name_port if bound is not None else ("localhost", "0")
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
        "SCRIPT_NAME": group.root_path.rstrip("/"),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": errors,
        "wsgi.multithread": group.threads > 1,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }


def run_worker(
    *,
    group: GroupConfig,
    slot: int,
    sockets: list[BoundSocket],
    app: Callable[..., Any] | None,
    master_pid: int,
    notify_fd: int,
    board: memoryview,
    max_requests: int,
    routing: Routing | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> int:
    """Boot and serve until told to stop; return the process exit code."""
    listening = ", ".join(str(b.address) for b in sockets)
    set_title(f"fastpool: {group.name} worker {slot} [{listening}]")
    opened: list[AccessLog] = []
    try:
        return _run_worker(group, slot, sockets, app, master_pid, notify_fd, board,
                           max_requests, routing, tls_context, opened)
    finally:
        # Every way out of a worker (a stop, QUIT, max_requests, a crash)
        # passes here: the queued access lines are written before the exit.
        for access_log in opened:
            access_log.close()


def _run_worker(group: GroupConfig, slot: int, sockets: list[BoundSocket],
                app: Callable[..., Any] | None, master_pid: int, notify_fd: int,
                board: memoryview, max_requests: int, routing: Routing | None,
                tls_context: ssl.SSLContext | None, opened: list[AccessLog]) -> int:
    """run_worker's body; the access log it opens is appended to ``opened``."""
    try:
        child_setup(master_pid, group.nice, group.cpus)
        # No core files from the master's SIGABRT; the Python stack goes to stderr.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        faulthandler.enable(all_threads=True)
        core.check()
        from fastpool._worker import WorkerOptions

        if app is None:
            app = import_app(group.app)
        interface, app = resolve_interface(app, group.interface, group.app)
        access_log = None
        if group.access_log or access_via_logger():
            access_log = AccessLog(group.access_log, group.access_log_format, group.name)
            opened.append(access_log)
        router = _router(group, routing)
        options = partial(WorkerOptions.from_group, group, access_log=access_log,
                          master_pid=master_pid, max_requests=max_requests, scoreboard=board,
                          routing=router)
        if interface == "asgi":
            loop = _asgi_worker(group, sockets, app, access_log, options, tls_context)
        else:
            loop = _wsgi_worker(group, sockets, app, options, tls_context)
    except AppLoadError as exc:
        return boot_failed(notify_fd, Notice.APP_LOAD_ERROR, f"App failed to load: {exc}")
    except BootError as exc:
        return boot_failed(notify_fd, Notice.BOOT_ERROR, str(exc))
    except Exception:
        return boot_failed(notify_fd, Notice.BOOT_ERROR,
                           f"Worker failed to boot:\n{traceback.format_exc()}")

    def on_shutdown(signum: int, frame: Any) -> None:
        loop.stop(graceful=True, close_idle=True)

    def on_retire(signum: int, frame: Any) -> None:
        loop.stop(graceful=True, close_idle=False)

    def on_quit(signum: int, frame: Any) -> None:
        # Raised wherever the worker is, even inside the app: QUIT means now.
        raise SystemExit(0)

    def on_reopen(signum: int, frame: Any) -> None:
        reopen_files_soon()
        if access_log is not None:
            access_log.reopen()

    handlers = {signals.SHUTDOWN: on_shutdown, signals.RETIRE: on_retire,
                signals.QUIT: on_quit, signals.REOPEN_LOG: on_reopen}
    for signum, action in signals.WORKER_ACTIONS.items():
        signal.signal(signum, handlers[action])
    if _reopen_requested:
        on_reopen(signal.SIGUSR1, None)
    if _stop_requested:
        # Asked to stop while booting (a scale-down, a stop): never serve.
        # A stop from here on reaches the loop, which returns at once.
        log.info("Worker %d (pid %d) of group %s stops: %s arrived while it booted", slot,
                 os.getpid(), group.name, signal.Signals(_stop_requested).name)
        return 0
    # Everything imported so far lives as long as the worker: move it out of
    # the cyclic GC's generations so collections only scan per-request garbage.
    gc.collect()
    gc.freeze()
    # Requests free their objects by reference counting; a young-generation
    # collection every 700 allocations costs more than it finds.
    gc.set_threshold(7000, 10, 10)
    log.info("Booting worker %d with pid: %d (group %s) [%s]", slot, os.getpid(), group.name,
             interface.upper())
    if interface == "wsgi":
        notify(notify_fd, Notice.READY)
        loop.run()
        return 0
    # ASGI: ready once the lifespan startup is done and the listeners accept.
    try:
        loop.run(on_ready=lambda: notify(notify_fd, Notice.READY))
    except LifespanFailure as exc:
        return boot_failed(notify_fd, Notice.BOOT_ERROR, str(exc))
    return 0


def _router(group: GroupConfig, routing: Routing | None) -> tuple[Any, Any] | None:
    """(Router, Handoff) for a worker of a server with routes, else None."""
    if routing is None:
        return None
    from fastpool._http import Router
    from fastpool.handoff import Handoff

    # Only this group's queue is read here; the master keeps the other ends.
    handoff = Handoff(routing.queues, routing.local, routing.admission, group.max_queue_wait)
    return Router(routing.routes, handoff.local, group.health_path), handoff


def _wsgi_worker(group: GroupConfig, sockets: list[BoundSocket], app: Callable[..., Any],
                 options: Callable[..., Any], tls_context: ssl.SSLContext | None) -> Any:
    """``options``: WorkerOptions.from_group with this worker's runtime parts
    bound; ``tls_context``: the group's, for its tls_listen sockets."""
    from fastpool import _wsgi

    listeners = []
    for bound in sockets:
        base = base_environ(bound, group, sys.stderr)
        base["wsgi.file_wrapper"] = _wsgi.FileWrapper
        tls = tls_context if bound.address.tls else None
        if tls is not None:
            base["wsgi.url_scheme"] = "https"
            base["HTTPS"] = "on"
        listeners.append((bound.sock.fileno(), bound.is_tcp, base, bound.shared, tls))
    built = options()
    return _wsgi.WSGIWorker(
        app, listeners, built,
        handoff_environ=_handoff_environ(group) if built.router is not None else None)


def _handoff_environ(group: GroupConfig) -> dict[str, Any]:
    """The base environ of connections other groups hand over (no listener of
    this group accepted them; the worker fills in the addresses)."""
    from fastpool import _wsgi

    base = base_environ(None, group, sys.stderr)
    base["wsgi.file_wrapper"] = _wsgi.FileWrapper
    return base


def base_scope(bound: BoundSocket | None, group: GroupConfig) -> dict[str, Any]:
    """The ASGI scope keys that are the same for every request on one socket."""
    server: tuple[str, int | None] | None = None
    if bound is None:
        pass
    elif bound.is_tcp:
        host, port = bound.sock.getsockname()[:2]
        server = (str(host), int(port))
    else:
        name = bound.sock.getsockname()
        server = (str(name), None) if name else None
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "http",
        "server": server,
        "client": None,
        "root_path": group.root_path.rstrip("/"),
    }


def _asgi_worker(group: GroupConfig, sockets: list[BoundSocket], app: Callable[..., Any],
                 access_log: AccessLog | None, options: Callable[..., Any],
                 tls_context: ssl.SSLContext | None) -> Any:
    """``options``: WorkerOptions.from_group with this worker's runtime parts
    bound; ``tls_context``: the group's, for its tls_listen sockets."""
    from fastpool import _asgi
    from fastpool.lifespan import Lifespan

    if group.loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise BootError("--loop uvloop: uvloop is not installed "
                            "(pip install 'fastpool[uvloop]')") from None
    if group.threads > 1:
        log.warning("group %s: threads = %d does not apply to an ASGI app; ignored",
                    group.name, group.threads)
    try:
        from fastpool.websocket import Options
    except ImportError:
        websocket_options = None   # without the websockets package, upgrades are plain HTTP
        log.info("group %s: WebSocket support needs the websockets package "
                 "(pip install 'fastpool[websockets]')", group.name)
    else:
        websocket_options = Options(
            max_size=group.ws_max_size, ping_interval=group.ws_ping_interval,
            ping_timeout=group.ws_ping_timeout, per_message_deflate=group.ws_per_message_deflate,
            access_log=access_log)
    listeners = []
    for bound in sockets:
        scope = base_scope(bound, group)
        tls = tls_context if bound.address.tls else None
        if tls is not None:
            scope["scheme"] = "https"
        listeners.append((bound.sock.fileno(), bound.is_tcp, scope, bound.shared, tls))
    built = options(lifespan=Lifespan(app, group.lifespan) if group.lifespan != "off" else None,
                    websocket_options=websocket_options)
    return _asgi.ASGIWorker(
        app, listeners, built,
        # Connections other groups hand over: no listener of this group took them.
        handoff_scope=base_scope(None, group) if built.router is not None else None)

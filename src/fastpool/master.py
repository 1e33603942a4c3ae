"""The master process: binds, forks, supervises every group and process, stops.

Rules of this module (the model is gunicorn's arbiter):

* The master owns the loop, forking, reaping, the worker groups, reloading
  and signals.  The control socket's server and its commands live in
  ``fastpool.control`` (``ControlServer``, which calls back into ``reload``,
  ``scale`` and ``restart``), the supervised processes in
  ``fastpool.process`` (``Processes``, which calls back into ``fork``).
* Signal handlers only enqueue the signal and wake the loop; one loop does all
  the work: read children's notices and the command processes' output, handle
  queued signals and control requests, reap with ``waitpid(-1, WNOHANG)``,
  enforce timeouts, then bring every group and process to the state it should
  be in (``maintain``).  The master is the child subreaper of everything below
  it: orphans are reaped by the same ``waitpid``.
* Children are forked, never spawned, after the config is parsed, the sockets
  are bound and (with ``preload``) the app is imported.
* The master holds every listening socket for as long as its worker slot
  exists, so a worker that exits, is recycled or is reloaded never takes its
  accept queue down with it.
* A reload (SIGHUP, ``fastpool reload``) starts the new workers of a slot
  first and retires the old one only once the new one says READY; a new
  worker that fails to boot leaves the old ones serving, its error is logged
  once per reload (not once per worker or group), and it does not count
  towards the group's crash loop while an old worker holds its slot.
* Reload on code change (``fastpool.autoreload``, development only): the
  watcher is a child the master forks and supervises, never a thread (a
  thread could hold a lock across a fork); its batches of changed files
  arrive on a pipe the loop selects on, and each is one ordinary reload
  (with ``preload``, the app is imported afresh in the master first).
* Boot failures at start-up stop the server with the message printed once
  and the exit code of the worker's notice (``worker.EXIT_CODES``: 3, or 4
  when the app cannot be imported): never a respawn loop.
  Later, workers that die within ``CRASH_WINDOW`` of boot ``crash_limit``
  times in a row mark their group crash-looping: it is stopped, and
  ``on_crash_loop`` says whether the server stops too.  Process sets follow
  the same rule (``process.CrashStreak``, ``crash_loop``).
* A graceful stop (of the server or of one child) sends workers their signal
  and processes their ``stop_signal``; the server stops once every child,
  and every command's whole process group, is gone, KILLing what is left at
  the deadline.
* One master per control socket: a server whose control socket already has a
  master listening on it refuses to start (exit 2, before it binds or forks
  anything; ``ControlServer.open``); a stale socket file with nobody listening
  is replaced.
* ``pid_file``: the master writes its pid there once its control socket is
  its own, before it binds or forks, and removes it at exit; a file naming
  another running master refuses the start (exit 2; ``fastpool.pidfile``).
* ``env_file`` is loaded into the master's environment (``fastpool.envfile``)
  before any app is imported or child forked, and again by every reload
  (before the new workers fork); fastpool's own settings never come from it.
* systemd: sockets it passed (``LISTEN_FDS``) are taken by the CLI before
  anything else reads the environment and given to groups by
  ``fastpool.systemd.assign``; the master keeps them, as they are, across
  reloads.  With ``NOTIFY_SOCKET`` the master's own loop tells systemd its
  state (``tell_systemd``): ``READY=1`` once every group serves (``booted``),
  ``RELOADING=1`` when a reload begins and ``READY=1`` once its new workers
  serve or it was refused or failed, ``STOPPING=1`` when a stop begins,
  ``STATUS=`` whenever the summary of groups and processes changes, and
  ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` (the loop's wait never
  outlasts it, so a master stuck anywhere stops pinging).  Children never
  see ``LISTEN_*``, ``NOTIFY_SOCKET`` or ``WATCHDOG_*``.
* Signals mean what ``fastpool.signals.TABLE`` says (TERM and INT: graceful
  stop; QUIT, or a second INT: immediate stop; HUP: reload; TTIN/TTOU: one
  worker more/less in every group; USR1: the master and the workers reopen
  their log files), and the master handles exactly the signals that table gives it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import random
import select
import signal
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpool import __version__, autoreload, core, signals, systemd, tls, worker
from fastpool.control import ControlServer, ControlSocketInUse
from fastpool.envfile import EnvFile
from fastpool.handoff import Admission, Queues, Routing
from fastpool.loading import AppLoadError, import_app
from fastpool.log import log_setup_done, reopen_files, setup_error_log
from fastpool.metrics import RESTART_CAUSES, AppMetrics, MetricsServer, Totals, rss_bytes
from fastpool.pidfile import PidFile, PidFileInUse
from fastpool.process import (
    CRASH_WINDOW,
    Child,
    CrashStreak,
    Processes,
    become_subreaper,
    describe_exit,
    signal_child,
)
from fastpool.scoreboard import Scoreboard
from fastpool.settings import ConfigError, GroupConfig, ServerConfig, load
from fastpool.sockets import Address, Listeners, check_addresses

log = logging.getLogger("fastpool.error")

HANDLED_SIGNALS = signals.MASTER_SIGNALS
ABORT_GRACE = 2.0            # SIGABRT, then SIGKILL this much later
LOOP_WAIT = 0.5              # seconds the loop sleeps at most between two looks around
CONTROL_SOCKET_IN_USE = 2    # exit code: another master listens on our control socket
MEMORY_CHECK_INTERVAL = 1.0  # seconds between two looks at the workers' RSS (max_rss)
MIB = 1024 * 1024
PID_FILE_IN_USE = 2          # exit code: the pid file names another running master
ENV_FILE_ERROR = 2           # exit code: the env file cannot be loaded (a config error)


@dataclass
class Group:
    """One worker group: its config, its listening sockets and its state."""

    config: GroupConfig
    listeners: Listeners
    app: Callable[..., Any] | None = None
    wanted: int = 1
    generation: int = 0
    state: str = "running"            # running, crash-loop, stopped
    crashes: CrashStreak = dataclasses.field(default_factory=CrashStreak)
    restarts: int = 0
    ever_ready: bool = False          # a worker of this group has served
    reload_failed_generation: int = -1
    # The SSL context of its tls_listen addresses (fastpool.tls), built from the
    # certificate files at start and again on every reload.
    tls: ssl.SSLContext | None = None
    # The counts of its workers that have exited, restarts by cause, and CPU
    # time by slot (fastpool.metrics): what keeps its counters monotonic.
    totals: Totals = dataclasses.field(default_factory=Totals.empty)


class Master:
    """The supervisor of one server (``run`` until it stops)."""

    def __init__(self, config: ServerConfig, reload_source: Callable[[], ServerConfig] | None
                 = None, *, activated: list[systemd.Activated] | None = None,
                 notifier: systemd.Notifier | None = None, env: EnvFile | None = None) -> None:
        self.config = config
        self.reload_source = reload_source
        self.activated = list(activated or [])      # the sockets systemd passed
        self.notifier = notifier or systemd.Notifier(None)
        self.env = env or EnvFile(os.environ)
        # Its path is fixed at start, as the control socket's.
        self.pid_file = PidFile(config.pid_path)
        # What systemd was told: READY=1 sent, the last STATUS=, and the
        # groups (name: generation) a reload waits for before READY=1 again.
        self.ready_sent = False
        self.status_sent = ""
        self.reload_waiting: dict[str, int] = {}
        self.reload_failed: list[str] = []
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        self.groups: dict[str, Group] = {}
        self.processes = Processes(self.children, self.fork, self.pid)
        self.signal_queue: deque[int] = deque()
        self.stopping = False
        self.kill_deadline = 0.0
        self.killed = False
        self.exit_code = 0
        self.scoreboard = Scoreboard()
        self.queues: Queues | None = None      # handoff queues, when any group has routes
        # Its path is fixed at start: a reload cannot move it.
        self.control = ControlServer(config.control_path, self)
        self.booted = False      # every group at start-up has had a READY worker
        self.metrics: MetricsServer | None = None     # metrics_listen
        self.app_metrics: AppMetrics | None = None    # the apps' prometheus_client directory
        self.memory_checked = 0.0                     # when max_rss was last checked
        # Reload on code change (fastpool.autoreload): the watcher child, when on.
        self.watcher: autoreload.Watcher | None = None
        # The boot errors already logged since the last reload: a reload whose new
        # workers cannot boot says why once, not once per worker or group.
        self.reload_errors: set[str] = set()

    # ---------------------------------------------------------------- start

    def run(self) -> int:
        if not log_setup_done():
            setup_error_log(self.config.log_level)
        try:
            return self._run()
        except ControlSocketInUse as exc:
            print(f"Error: {exc}", file=sys.stderr, flush=True)
            return CONTROL_SOCKET_IN_USE
        except PidFileInUse as exc:
            print(f"Error: {exc}", file=sys.stderr, flush=True)
            return PID_FILE_IN_USE
        except ConfigError as exc:
            log.error("%s", exc)
            return 1
        finally:
            for group in self.groups.values():
                group.listeners.close()
            if self.queues is not None:
                self.queues.close()
            self.control.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.app_metrics is not None:
                self.app_metrics.close()
            self.pid_file.remove()
            self.notifier.close()
            systemd.close_activated(self.activated)

    def _run(self) -> int:
        config = self.config
        try:
            core.check()
        except core.CompiledCoreMissing as exc:
            log.error("%s", exc)
            return 1
        # First: a second server in the same place must not bind or fork anything.
        self.control.open()
        check_addresses(config)
        if config.metrics_listen:
            self.metrics = MetricsServer(self, config.metrics_listen)
            self.metrics.open()
            # Before any app is imported (preload) or forked: prometheus_client
            # reads PROMETHEUS_MULTIPROC_DIR when a metric is created.
            self.app_metrics = AppMetrics.setup(os.environ)
        watch_plan = autoreload.plan(config, Path.cwd())
        self.pid_file.create(self.pid)
        assigned = systemd.assign(config, self.activated)
        check_addresses(config, assigned)
        for name, group_config in config.groups.items():
            self.groups[name] = self.make_group(group_config, assigned[name])
        used = {a.fd for addresses in assigned.values() for a, _ in addresses if a.kind == "fd"}
        for item in self.activated:
            if item.fd not in used:
                log.warning("systemd passed socket %s, which no group listens on", item)
        for group in self.groups.values():
            if group.config.preload:
                try:
                    group.app = import_app(group.config.app)
                except AppLoadError as exc:
                    log.error("App failed to load (group %s): %s", group.config.name, exc)
                    return worker.APP_LOAD_ERROR
        for process_config in config.processes.values():
            self.processes.add(process_config)
        self.setup_routing()
        # Start-up is over once every group has served; with no group (a
        # config of processes only) it is over at once.
        self.booted = not self.groups

        log.info("Starting fastpool %s (master pid %d)", __version__, self.pid)
        for group in self.groups.values():
            for text in group.listeners.describe():
                log.info("Listening at: %s (group %s, %d worker(s))", text, group.config.name,
                         group.wanted)
        if self.metrics is not None:
            log.info("Metrics at: %s (app metrics: %s)", self.metrics.describe(),
                     self.app_metrics.path if self.app_metrics else "-")
        if not self.groups:
            log.info("No worker groups: supervising %s only",
                     ", ".join(f"process {name}" for name in self.processes.groups))
        worker.set_title(f"fastpool: master [{config.path or 'command line'}]")
        become_subreaper()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._on_signal)
        if watch_plan is not None:
            log.info("Reload on code change is on (development only)")
            self.watcher = autoreload.Watcher(watch_plan, self.fork, self.pid)
            self.watcher.start()
        self.maintain()
        self.loop()
        self.processes.close_output()
        log.info("Shutting down: master")
        return self.exit_code

    def make_group(self, config: GroupConfig, assigned: list[tuple[Address, str]]) -> Group:
        """A group listening on ``assigned`` (its addresses, ``systemd.assign``)."""
        addresses = [address for address, _ in assigned]
        tls_context = tls.context_for(config)
        listeners = Listeners(addresses, backlog=config.backlog, reuse_port=config.reuse_port)
        group = Group(config=config, listeners=listeners, wanted=config.workers,
                      tls=tls_context)
        try:
            for slot in range(config.workers):
                listeners.for_slot(slot)
        except BaseException:
            listeners.close()
            raise
        return group

    # ---------------------------------------------------------------- routes

    def setup_routing(self) -> None:
        """Handoff queues for every group, once any group has routes (a
        connection may then move to any group, and back to its home)."""
        if self.queues is None and not any(g.config.routes for g in self.groups.values()):
            return
        if self.queues is None:
            self.queues = Queues()
        for name in self.groups:
            self.queues.add(name)
        for name, group in self.groups.items():
            for prefix in group.config.routes:
                log.info("Route: %s -> group %s", prefix, name)

    def routing_for(self, group: Group) -> Routing | None:
        """What a worker of ``group`` needs to route and hand over (None: no routes)."""
        if self.queues is None:
            return None
        index = self.queues.index
        running = [g for g in self.groups.values() if g.state == "running"]
        return Routing(
            queues=self.queues,
            local=group.config.name,
            routes=tuple((prefix, index[g.config.name]) for g in running
                         for prefix in g.config.routes),
            admission={index[g.config.name]: Admission(g.config.max_pending,
                                                       g.config.retry_after)
                       for g in self.groups.values()},
        )

    # ---------------------------------------------------------------- commands

    def scale(self, name: str, delta: int) -> int:
        """One group's worker count (or a process set's copies) up or down by
        ``delta`` (at least 1); returns the new count."""
        if name in self.processes.groups:
            return self.processes.scale(name, delta)
        group = self.groups[name]
        group.wanted = max(1, group.wanted + delta)
        log.info("Scaling group %s to %d worker(s)", name, group.wanted)
        return group.wanted

    def restart(self, name: str) -> None:
        """Stop every copy of process set ``name`` and start it again."""
        self.processes.restart(name)

    def crash_loop(self, what: str, died: str, action: str) -> None:
        """``what`` ("Group task", "Process set job") is crash-looping and
        is being stopped (``died``: "3 workers"): say so, and stop the server
        too when its ``on_crash_loop`` (``action``) asks."""
        log.error("%s is crash-looping: %s died within %.0f s of boot in a row; stopping it "
                  "(on_crash_loop = %s)", what, died, CRASH_WINDOW, action)
        if action == "stop-server":
            self.exit_code = 1
            self.stop(graceful=True)

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_queue.append(signum)
        try:
            os.write(self.wake_w, b".")
        except OSError:
            pass

    def handle_signals(self) -> None:
        """Do what each queued signal means (``fastpool.signals.TABLE``)."""
        while self.signal_queue:
            signum = signal.Signals(self.signal_queue.popleft())
            action = signals.MASTER_ACTIONS[signum]
            if action == signals.REAP:
                continue   # reaping happens every turn of the loop
            name = signum.name
            if action == signals.IMMEDIATE_STOP or (
                    action == signals.INTERRUPT and self.stopping):
                log.info("Handling signal: %s (immediate stop)", name)
                self.stop(graceful=False)
            elif action in (signals.GRACEFUL_STOP, signals.INTERRUPT):
                log.info("Handling signal: %s (graceful stop)", name)
                self.stop(graceful=True)
            elif self.stopping:
                continue
            elif action == signals.RELOAD:
                log.info("Handling signal: %s (reload)", name)
                self.reload()
            elif action in (signals.MORE_WORKERS, signals.FEWER_WORKERS):
                delta = 1 if action == signals.MORE_WORKERS else -1
                for group in self.groups.values():
                    group.wanted = max(1, group.wanted + delta)
                log.info("Handling signal: %s (%s)", name,
                         ", ".join(f"{n}: {g.wanted} worker(s)" for n, g in self.groups.items())
                         or "no worker groups: nothing to scale")
            elif action == signals.REOPEN_LOGS:
                # First, so that this line is the first of the new file.
                reopen_files()
                log.info("Handling signal: %s (reopen log files)", name)
                self.kill_children(signals.SIGNAL_FOR[signals.REOPEN_LOG], kind="worker")

    # ---------------------------------------------------------------- children

    def all_listening_sockets(self) -> list[socket.socket]:
        socks = []
        for group in self.groups.values():
            socks.extend(group.listeners.all_sockets())
        return socks

    def fork(self, child_main: Callable[[], int], keep: list[socket.socket],
             is_worker: bool = False) -> int:
        """Fork; in the child run ``child_main`` and exit with its code.

        Signals stay blocked across the fork until the child has set its
        handlers: a worker stopped the moment it is born stops cleanly and
        ignores the master's signals (``worker.catch_boot_signals``); a
        process meets the default actions, as before its target runs."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK,
                                      {*HANDLED_SIGNALS, *signals.WORKER_SIGNALS})
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return pid
        code = 1
        try:
            for signum in HANDLED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            if is_worker:
                worker.catch_boot_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (self.wake_r, self.wake_w, self.notify_r):
                os.close(fd)
            self.control.close_in_child()
            self.processes.close_in_child()
            if self.metrics is not None:
                self.metrics.close_in_child()
            if self.watcher is not None:
                self.watcher.close_in_child()
            own = {id(sock) for sock in keep}
            for sock in self.all_listening_sockets():
                if id(sock) not in own:
                    sock.close()
            # systemd's sockets that no group holds now (Listeners.close keeps them open).
            systemd.close_activated(self.activated, keep={sock.fileno() for sock in keep})
            code = child_main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        except BaseException:
            log.exception("Child %d crashed", os.getpid())
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def spawn_worker(self, group: Group, slot: int) -> None:
        config = group.config
        sockets = group.listeners.for_slot(slot)
        board_slot = self.scoreboard.allocate()
        max_requests = config.max_requests
        if max_requests and config.max_requests_jitter:
            max_requests += random.randint(0, config.max_requests_jitter)
        view = self.scoreboard.view(board_slot)
        routing = self.routing_for(group)
        pid = self.fork(lambda: worker.run_worker(
            group=config, slot=slot, sockets=sockets, app=group.app, master_pid=self.pid,
            notify_fd=self.notify_w, board=view, max_requests=max_requests, routing=routing,
            tls_context=group.tls,
        ), [b.sock for b in sockets], is_worker=True)
        self.children[pid] = Child(pid, "worker", config.name, slot, time.monotonic(), board_slot,
                                   group.generation)

    def kill_children(self, signum: int, kind: str | None = None, name: str | None = None) -> None:
        for child in list(self.children.values()):
            if (kind is None or child.kind == kind) and (name is None or child.name == name):
                self.signal_child(child, signum)

    signal_child = staticmethod(signal_child)

    def retire(self, child: Child, cause: str) -> None:
        """Graceful replacement: stop accepting, finish, leave (a worker's
        retire signal; a process's stop_signal).  ``cause``: a restart cause
        of fastpool.metrics (``reload``, ``max_rss``), or ``scale``/``stop``
        when no replacement follows."""
        if child.kind == "process":
            self.processes.retire(child)
        elif not child.retiring:
            child.retiring = True
            child.retire_cause = cause
            self.signal_child(child, signals.SIGNAL_FOR[signals.RETIRE])

    def stop(self, graceful: bool) -> None:
        now = time.monotonic()
        if graceful:
            if self.stopping:
                return
            timeout = max([g.config.graceful_timeout for g in self.groups.values()]
                          + [p.config.graceful_timeout
                             for p in self.processes.groups.values()]
                          + [0.0])
            self.kill_deadline = now + timeout
            self.kill_children(signals.SIGNAL_FOR[signals.SHUTDOWN], kind="worker")
            self.processes.stop_all()
        else:
            self.kill_deadline = min(self.kill_deadline, now + 1.0) if self.stopping else now + 1.0
            self.kill_children(signals.SIGNAL_FOR[signals.QUIT], kind="worker")
            self.processes.quit_all()
        if self.watcher is not None:
            self.watcher.stop()
        if not self.stopping:
            how = "graceful" if graceful else "immediate"
            self.notifier.send("STOPPING=1", f"STATUS=stopping ({how})")
        self.stopping = True

    # ---------------------------------------------------------------- notices

    def read_notices(self) -> None:
        """Act on the children's notices (``worker.notify``, ``worker.parse_notices``)."""
        while True:
            try:
                data = os.read(self.notify_r, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            for pid, kind, message in worker.parse_notices(data):
                child = self.children.get(pid)
                if child is None:
                    continue
                if kind is worker.Notice.READY:
                    child.ready = True
                    group = self.groups.get(child.name)
                    if group is not None:
                        group.ever_ready = True
                        # Start-up ends once; a group added later by a reload
                        # must not turn its boot failures into a server stop.
                        if not self.booted:
                            self.booted = all(g.ever_ready for g in self.groups.values())
                else:
                    self.boot_failure(child, kind, message.rstrip("\n"))

    def boot_failure(self, child: Child, kind: worker.Notice, message: str) -> None:
        """A worker says why it cannot boot (its notice's ``kind`` and message)."""
        group = self.groups.get(child.name)
        if not self.booted:
            # At start-up: the operator must fix the app, not watch it respawn.
            if not self.exit_code:
                log.error("%s", message)
                log.error("Worker %d (pid %d) of group %s failed to boot; stopping the server",
                          child.slot, child.pid, child.name)
                self.exit_code = worker.EXIT_CODES[kind]
            self.stop(graceful=False)
            return
        # Later (a respawn, a reload): log it; the crash-loop guard counts it.
        # A reload's new workers all fail alike: their error is logged once.
        reloading = group is not None and child.generation == group.generation and \
            group.generation > 0
        if not reloading or message not in self.reload_errors:
            log.error("%s", message)
        if group is not None and reloading:
            self.reload_errors.add(message)
            if group.reload_failed_generation != group.generation:
                log.error("Reload of group %s failed: its new workers cannot boot; the old "
                          "ones keep serving", child.name)
                group.reload_failed_generation = group.generation

    # ---------------------------------------------------------------- reaping

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                if self.watcher is not None:
                    self.watcher.exited(pid, describe_exit(status))
                continue
            if self.app_metrics is not None:
                self.app_metrics.worker_gone(pid)
            served = 0
            if child.board_slot >= 0:
                fields = self.scoreboard.fields(child.board_slot)
                served = int(fields[self.scoreboard.layout["requests"]])
                gone_from = self.groups.get(child.name) if child.kind == "worker" else None
                if gone_from is not None:
                    # Before the record is reused: counters never go backwards.
                    gone_from.totals.fold(fields, child.slot, usage.ru_utime + usage.ru_stime)
                self.scoreboard.release(child.board_slot)
            self.read_notices()
            describe = (f"Worker {child.slot} (pid {pid}) of group {child.name}"
                        if child.kind == "worker"
                        else f"Process {child.name} {child.slot} (pid {pid})")
            crashed = True
            if os.WIFEXITED(status):
                code = os.WEXITSTATUS(status)
                crashed = code != 0
                if not crashed or self.stopping or child.retiring:
                    log.info("%s exited%s", describe, f" with code {code}" if code else "")
                else:
                    log.warning("%s exited with code %d", describe, code)
            else:
                # A child the master itself is stopping is not news.
                report = log.info if self.stopping or child.retiring else log.warning
                report("%s was %s", describe, describe_exit(status))
            if child.kind == "process":
                if self.processes.exited(child, crashed, describe_exit(status)):
                    process = self.processes.groups[child.name]
                    self.crash_loop(f"Process set {child.name}",
                                    f"{process.crashes.count} copies",
                                    process.config.on_crash_loop)
                continue
            if self.stopping:
                continue
            self.worker_exited(child, crashed, served, status)

    def worker_exited(self, child: Child, crashed: bool, served: int, status: int) -> None:
        group = self.groups.get(child.name)
        if group is None:
            return
        if crashed and not child.ready and not self.booted and not self.exit_code:
            # Died before serving without saying why (a crash in C during import).
            log.error("Worker %d (pid %d) of group %s died while booting; stopping the server",
                      child.slot, child.pid, child.name)
            self.exit_code = worker.WORKER_BOOT_ERROR
            self.stop(graceful=False)
            return
        failed_reload = group.reload_failed_generation == child.generation and \
            not child.ready and any(
                c.kind == "worker" and c.name == child.name and c.slot == child.slot
                and c.generation != child.generation and not c.retiring
                for c in self.children.values())
        cause = restart_cause(child, status, group.config.max_requests)
        if cause is not None and not failed_reload:
            group.totals.restarted(cause)
        if child.retiring:
            # The master ended it (scale-down, reload, group stop): not a restart
            # of group.restarts, and says nothing about a crash loop either way.
            return
        if failed_reload:
            # A new worker of a failed reload, while the old one keeps its slot:
            # not respawned, and no sign of a crash loop of the serving workers.
            return
        group.restarts += 1
        # A crash loop is workers dying right after boot, before doing any work:
        # not a worker that served requests, nor one aborted for its timeout.
        failed = crashed and not served and not child.abort_sent
        if group.crashes.record(failed, time.monotonic() - child.started,
                                group.config.crash_limit) and group.state == "running":
            group.state = "crash-loop"
            group.totals.restarted("crash_loop")
            self.kill_children(signals.SIGNAL_FOR[signals.SHUTDOWN], kind="worker",
                               name=child.name)
            self.crash_loop(f"Group {child.name}", f"{group.crashes.count} workers",
                            group.config.on_crash_loop)

    # ---------------------------------------------------------------- timeouts

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.kind != "worker":
                continue
            if child.abort_sent:
                if now - child.abort_sent > ABORT_GRACE:
                    self.signal_child(child, signal.SIGKILL)
                continue
            group = self.groups.get(child.name)
            if group is None or not group.config.timeout:
                continue
            busy_since = self.scoreboard.read(child.board_slot).busy_since
            if busy_since and now - busy_since > group.config.timeout:
                log.error("Worker %d (pid %d) of group %s has run one request for %.1f s "
                          "(timeout %g s): aborting it (SIGABRT, its stack follows) and "
                          "replacing it", child.slot, child.pid, child.name, now - busy_since,
                          group.config.timeout)
                child.abort_sent = now
                self.signal_child(child, signal.SIGABRT)

    def check_memory(self) -> None:
        """``max_rss``: recycle (gracefully, the replacement first) a worker
        whose resident memory passed its group's limit; once a second."""
        now = time.monotonic()
        if now - self.memory_checked < MEMORY_CHECK_INTERVAL:
            return
        self.memory_checked = now
        for child in list(self.children.values()):
            if child.kind != "worker" or child.retiring or not child.ready:
                continue
            group = self.groups.get(child.name)
            if group is None or not group.config.max_rss:
                continue
            rss = rss_bytes(child.pid)
            if rss is not None and rss > group.config.max_rss * MIB:
                log.warning("Worker %d (pid %d) of group %s uses %.0f MiB (max_rss %d MiB): "
                            "replacing it gracefully", child.slot, child.pid, child.name,
                            rss / MIB, group.config.max_rss)
                self.retire(child, "max_rss")

    # ---------------------------------------------------------------- reload

    def reload(self, only: str | None = None) -> str | None:
        """Re-read the config and roll every group (or ``only``) onto new workers.
        Returns an error message, or None."""
        if self.ready_sent:
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}",
                               "STATUS=reloading")
        new_config = self.config
        try:
            if self.reload_source is not None:
                new_config = self.reload_source()
            assigned = systemd.assign(new_config, self.activated)
            check_addresses(new_config, assigned)
        except ConfigError as exc:
            log.error("Reload refused, the config has an error (nothing changed): %s", exc)
            self.reload_done(f"reload refused: {exc}")
            return str(exc)
        names = [only] if only is not None else list(new_config.groups)
        self.reload_errors.clear()
        fresh_apps, failed = self.import_fresh(new_config, names)
        # The certificate files are read again (rotation); one that cannot be
        # used refuses the whole reload, like any other config error.
        contexts = {}
        for name in names:
            if name in new_config.groups:
                try:
                    contexts[name] = tls.context_for(new_config.groups[name])
                except ConfigError as exc:
                    log.error("Reload refused (nothing changed): %s", exc)
                    self.reload_done(f"reload refused: {exc}")
                    return str(exc)
        # The env file is read again, for the new workers: last, as nothing
        # may change when the reload is refused.
        try:
            self.env.apply(new_config.env_path)
        except ConfigError as exc:
            log.error("Reload refused (nothing changed): %s", exc)
            self.reload_done(f"reload refused: {exc}")
            return str(exc)
        for name in names:
            group_config = new_config.groups.get(name)
            group = self.groups.get(name)
            if group_config is None or name in failed:
                continue
            if group is None:
                try:
                    self.groups[name] = self.make_group(group_config, assigned[name])
                except ConfigError as exc:
                    log.error("Reload: cannot start group %s: %s", name, exc)
                    continue
                log.info("Reload: starting new group %s", name)
                self.reload_waiting[name] = 0
                continue
            if group_config.listen != group.config.listen or \
                    group_config.tls_listen != group.config.tls_listen or \
                    group_config.reuse_port != group.config.reuse_port:
                log.warning("Reload: group %s changed its listen addresses; restart the "
                            "server to apply that (the rest of its settings apply now)", name)
                # The sockets stay as they are, and so does the config that describes them.
                group_config = dataclasses.replace(
                    group_config.with_values(listen=group.config.listen,
                                             tls_listen=group.config.tls_listen,
                                             reuse_port=group.config.reuse_port),
                    listen_source=group.config.listen_source)
                if contexts[name] is None:
                    contexts[name] = group.tls    # (TLS addresses stay: so does their context)
            group.config = group_config
            group.tls = contexts[name]
            if name in fresh_apps:
                group.app = fresh_apps[name]
            group.wanted = group_config.workers
            group.generation += 1
            group.state = "running"
            group.crashes.reset()
            log.info("Reload: rolling group %s onto new workers (generation %d)", name,
                     group.generation)
            self.reload_waiting[name] = group.generation
        if only is None:
            for name in [n for n in self.groups if n not in new_config.groups]:
                log.info("Reload: stopping group %s (gone from the config)", name)
                self.groups[name].state = "stopped"
                self.groups[name].wanted = 0
            self.processes.reconfigure(new_config.processes)
            self.config = dataclasses.replace(self.config, values=new_config.values)
            self.update_watcher()
        self.setup_routing()
        if not self.reload_waiting:
            self.reload_done("")
        return None

    def import_fresh(self, config: ServerConfig, names: list[str]
                     ) -> tuple[dict[str, Callable[..., Any]], set[str]]:
        """With reload on code change, the preloaded apps of ``names`` imported
        again in the master from fresh modules; returns them, and the groups
        whose app failed to import (their old workers keep serving)."""
        preloading = [name for name in names
                      if name in config.groups and config.groups[name].preload]
        if self.watcher is None or not preloading:
            return {}, set()
        autoreload.forget_modules(self.watcher.plan)
        apps, failed = {}, set()
        for name in preloading:
            try:
                apps[name] = import_app(config.groups[name].app)
            except AppLoadError as exc:
                message = f"App failed to load: {exc}"
                if message not in self.reload_errors:
                    log.error("%s", message)
                    self.reload_errors.add(message)
                log.error("Reload of group %s failed: its app cannot be imported; the old "
                          "workers keep serving", name)
                failed.add(name)
        return apps, failed

    def update_watcher(self) -> None:
        """After the config was read again: start, stop or restart the watcher
        when the reload settings changed."""
        try:
            new_plan = autoreload.plan(self.config, Path.cwd())
        except ConfigError as exc:
            log.error("Reload: %s (the watcher keeps watching as before)", exc)
            return
        old = self.watcher
        if new_plan == (old.plan if old is not None else None):
            return
        if old is not None:
            old.stop()
            old.close_in_child()   # its pipe: the master reads it no more
        self.watcher = None
        if new_plan is None:
            log.info("Reload on code change is off now")
            return
        self.watcher = autoreload.Watcher(new_plan, self.fork, self.pid)
        self.watcher.start()

    def check_watcher(self, ready: list[Any]) -> None:
        """The watcher saw files change: log them, and reload."""
        watcher = self.watcher
        if watcher is None or watcher.fd < 0 or watcher.fd not in ready:
            return
        batches = watcher.read()
        if not batches or self.stopping:
            return
        changed = autoreload.Batch(
            [name for batch in batches for name in batch.names][:autoreload.NAMES_SENT],
            sum(batch.count for batch in batches))
        log.info("Reload: %s changed; reloading", changed.describe())
        self.reload()
    # ---------------------------------------------------------------- systemd

    def summary(self) -> str:
        """One line for systemd's STATUS=: each group's serving workers (and
        each process set's running copies) against the wanted count."""
        parts = []
        for name, group in self.groups.items():
            if group.state != "running":
                parts.append(f"group {name} {group.state}")
                continue
            serving = {c.slot for c in self.children.values()
                       if c.kind == "worker" and c.name == name and c.ready and not c.retiring
                       and c.slot < group.wanted}
            parts.append(f"group {name} {len(serving)}/{group.wanted} workers")
        for name, process in self.processes.groups.items():
            copies = len(self.processes.instances(name))
            parts.append(f"process {name} {copies}/{process.wanted} running")
        return f"{'serving' if self.booted else 'starting'}: {', '.join(parts) or 'nothing'}"

    def reload_done(self, problem: str) -> None:
        """The reload is over (``problem``: why it did not apply, "" when it
        did): READY=1 again, with the STATUS that says how it went."""
        self.reload_waiting.clear()
        if not self.ready_sent:
            return
        self.status_sent = problem or self.summary()
        self.notifier.send("READY=1", f"STATUS={self.status_sent}")

    def reload_progress(self) -> None:
        """Whether every group a reload rolled serves on its new workers (or
        gave up: its new workers cannot boot, it crash-loops, it is gone)."""
        failed: list[str] = []
        for name, generation in list(self.reload_waiting.items()):
            group = self.groups.get(name)
            if group is None or group.generation != generation:
                del self.reload_waiting[name]     # gone, or rolled again by a later reload
            elif group.state != "running" or group.reload_failed_generation == generation:
                failed.append(name)
                del self.reload_waiting[name]
            else:
                serving = {c.slot for c in self.children.values()
                           if c.kind == "worker" and c.name == name and c.ready
                           and c.generation == generation}
                if serving.issuperset(range(group.wanted)):
                    del self.reload_waiting[name]
        self.reload_failed.extend(failed)
        if self.reload_waiting:
            return
        problem = ""
        if self.reload_failed:
            problem = (f"reload failed: the new workers of group "
                       f"{', '.join(self.reload_failed)} cannot boot; the old ones keep serving")
        self.reload_failed = []
        self.reload_done(problem)

    def tell_systemd(self) -> None:
        """What systemd should know now (a turn of the loop): READY=1 once
        booted, the end of a reload, a new STATUS=."""
        if not self.notifier.enabled or self.stopping:
            return
        if not self.ready_sent:
            if self.booted:
                self.ready_sent = True
                self.status_sent = self.summary()
                self.notifier.send("READY=1", f"MAINPID={self.pid}",
                                   f"STATUS={self.status_sent}")
                return
        elif self.reload_waiting:
            self.reload_progress()
            return
        summary = self.summary()
        if summary != self.status_sent:
            self.status_sent = summary
            self.notifier.send(f"STATUS={summary}")

    # ---------------------------------------------------------------- maintain

    def maintain(self) -> None:
        """Bring every group and process to the state it should be in."""
        for name, group in list(self.groups.items()):
            workers = [c for c in self.children.values()
                       if c.kind == "worker" and c.name == name]
            if group.state != "running":
                for child in workers:
                    self.retire(child, "stop")
                if not workers and group.state == "stopped":
                    group.listeners.close()
                    del self.groups[name]
                continue
            for slot in range(group.wanted):
                in_slot = [c for c in workers if c.slot == slot and not c.retiring]
                new = [c for c in in_slot if c.generation == group.generation]
                old = [c for c in in_slot if c.generation != group.generation]
                if not new:
                    # After a failed reload the old workers keep the slot.
                    if not old or group.reload_failed_generation != group.generation:
                        self.spawn_worker(group, slot)
                elif any(c.ready for c in new):
                    for child in old:
                        self.retire(child, "reload")
            for child in workers:
                if child.slot >= group.wanted:
                    self.retire(child, "scale")
            # Slots above the wanted count whose last worker is gone: give back their sockets.
            busy_slots = {c.slot for c in workers}
            for slot in list(group.listeners.per_slot):
                if slot >= group.wanted and slot not in busy_slots:
                    group.listeners.close_slot(slot)
        self.processes.maintain()
        if self.watcher is not None:
            self.watcher.maintain()

    # ---------------------------------------------------------------- the loop

    def loop(self) -> None:
        while True:
            readable: list[int | socket.socket] = [self.wake_r, self.notify_r,
                                                   *self.processes.output_fds()]
            if self.control.sock is not None:
                readable.append(self.control.sock)
            writable: list[socket.socket] = []
            if self.metrics is not None:
                readable.extend(self.metrics.readable())
                writable = self.metrics.writable()
            if self.watcher is not None and self.watcher.fd >= 0:
                readable.append(self.watcher.fd)
            wait = LOOP_WAIT
            now = time.monotonic()
            self.notifier.ping_watchdog(now)
            for due in (self.processes.next_output_due(), self.notifier.watchdog_due(now)):
                if due is not None:
                    wait = max(0.0, min(wait, due - now))
            try:
                ready, ready_out, _ = select.select(readable, writable, [], wait)
            except InterruptedError:
                ready = ready_out = []
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
                ready = ready_out = []
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            self.read_notices()
            self.processes.read_output(ready)
            self.handle_signals()
            self.check_watcher(ready)
            if self.control.sock is not None and self.control.sock in ready and \
                    not self.stopping:
                self.control.serve()
            self.reap()
            if self.metrics is not None:
                # (Also while stopping: a scrape during a drain sees it drain.)
                self.metrics.serve(ready, ready_out)
            self.processes.check_stops()
            if self.stopping:
                watching = self.watcher is not None and self.watcher.pid
                if not self.children and not self.processes.lingering and not watching:
                    return
                if time.monotonic() >= self.kill_deadline and not self.killed:
                    log.warning("Graceful timeout reached; killing %d child(ren)",
                                len(self.children) + len(self.processes.lingering))
                    self.kill_children(signal.SIGKILL)
                    self.processes.kill_lingering()
                    if self.watcher is not None:
                        self.watcher.stop(signal.SIGKILL)
                    self.killed = True
                continue
            self.check_timeouts()
            self.check_memory()
            self.maintain()
            self.tell_systemd()
            if not self.groups and not self.processes.groups:
                log.info("Nothing left to supervise")
                return


def restart_cause(child: Child, status: int, max_requests: int) -> str | None:
    """Why a worker that exited is being replaced (fastpool.metrics.RESTART_CAUSES),
    or None when it is not (scaled down, its group stopped)."""
    if child.retiring:
        return child.retire_cause if child.retire_cause in RESTART_CAUSES else None
    if child.abort_sent:
        return "timeout"
    if os.WIFSIGNALED(status):
        return "signal"
    # A worker leaves on its own with code 0 only after max_requests.
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and max_requests:
        return "max_requests"
    return "exit"


def run(config: ServerConfig, cli: Mapping[str, Any], config_file: str | None,
        app: str | None, *, environ: Mapping[str, str] | None = None,
        activated: list[systemd.Activated] | None = None) -> int:
    """``fastpool serve``: run a master until it stops; return the exit code.

    ``environ``: the environment the settings were read from (reloads read
    them from it again), ``activated``: the sockets systemd passed (both
    taken by the CLI before anything else reads the environment)."""
    chdir = config.chdir
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            log.error("--chdir: cannot change to %r: %s", chdir, exc.strerror)
            return 1
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Settings come from the environment the server started with, never from the env file.
    settings_environ = dict(os.environ if environ is None else environ)
    env = EnvFile(os.environ)
    try:
        env.apply(config.env_path)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return ENV_FILE_ERROR
    notifier = systemd.take_notifier()

    def reload_source() -> ServerConfig:
        return load(cli, settings_environ, config_file, app)

    return Master(config, reload_source if config.path is not None else None,
                  activated=activated, notifier=notifier, env=env).run()


"""The master process: binds, forks, supervises, stops.

Rules of this module (the model is gunicorn's arbiter):

* Signal handlers only enqueue the signal and wake the loop; one loop does all
  the work: handle queued signals, reap children with ``waitpid(-1,
  WNOHANG)``, respawn empty worker slots, enforce the shutdown deadline.
* Workers are forked, never spawned, after the config is parsed, the sockets
  are bound and (with ``preload``) the app is imported.
* A worker that dies is replaced in the same slot, on the same sockets.  A
  worker that fails to boot stops the whole server with its message, printed
  once, and exit code 3 (boot error) or 4 (app failed to load) — never a
  respawn loop.
* TERM and INT: graceful stop (workers finish in-flight requests, then exit;
  after ``graceful_timeout`` they are killed).  QUIT, or a second INT:
  immediate stop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fastpool import __version__, core, worker
from fastpool.loading import AppLoadError, import_app
from fastpool.log import setup_error_log
from fastpool.settings import Config, ConfigError
from fastpool.sockets import Listeners, parse_address

log = logging.getLogger("fastpool.error")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid = os.getpid()
        self.workers: dict[int, int] = {}       # pid -> slot
        self.signal_queue: deque[int] = deque()
        self.stopping = False
        self.kill_deadline = 0.0
        self.killed = False
        self.exit_code = 0
        self.app: Callable[..., Any] | None = None
        self.listeners: Listeners | None = None
        self.boot_messages: dict[int, str] = {}

    # ---- start

    def run(self) -> int:
        setup_error_log(self.config.log_level)
        try:
            return self._run()
        except ConfigError as exc:
            log.error("%s", exc)
            return 1
        finally:
            if self.listeners is not None:
                self.listeners.close()

    def _run(self) -> int:
        config = self.config
        if config.chdir:
            try:
                os.chdir(config.chdir)
            except OSError as exc:
                raise ConfigError(f"--chdir: cannot change to {config.chdir!r}: "
                                  f"{exc.strerror}") from None
        try:
            core.load()
        except core.CompiledCoreMissing as exc:
            log.error("%s", exc)
            return 1
        addresses = [parse_address(text, config.bind_source) for text in config.binds]
        self.listeners = Listeners(addresses, backlog=config.backlog,
                                   reuse_port=config.reuse_port)
        for slot in range(config.workers):
            self.listeners.for_slot(slot)
        if config.preload:
            try:
                self.app = import_app(config.app)
            except AppLoadError as exc:
                log.error("App failed to load: %s", exc)
                return worker.APP_LOAD_ERROR

        log.info("Starting fastpool %s", __version__)
        for text in self.listeners.describe():
            log.info("Listening at: %s (%d)", text, self.pid)
        log.info("Using worker: wsgi (compiled), %d worker(s)", config.workers)

        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.boot_r, self.boot_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._on_signal)
        for slot in range(config.workers):
            self.spawn(slot)
        self.loop()
        log.info("Shutting down: master")
        return self.exit_code

    # ---- signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_queue.append(signum)
        try:
            os.write(self.wake_w, b".")
        except OSError:
            pass

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.popleft()
            if signum == signal.SIGCHLD:
                continue   # reaping happens every turn of the loop
            name = signal.Signals(signum).name
            if signum == signal.SIGQUIT or (signum == signal.SIGINT and self.stopping):
                log.info("Handling signal: %s (immediate stop)", name)
                self.stop(graceful=False)
            else:
                log.info("Handling signal: %s (graceful stop)", name)
                self.stop(graceful=True)

    # ---- workers

    def spawn(self, slot: int) -> None:
        assert self.listeners is not None
        sockets = self.listeners.for_slot(slot)
        pid = os.fork()
        if pid:
            self.workers[pid] = slot
            return
        # Child: from here on, never return into the master's code.
        code = 1
        try:
            for signum in HANDLED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            os.close(self.boot_r)
            own = {id(b.sock) for b in sockets}
            for sock in self.listeners.all_sockets():
                if id(sock) not in own:
                    sock.close()
            code = worker.run(config=self.config, slot=slot, sockets=sockets, app=self.app,
                              master_pid=self.pid, boot_fd=self.boot_w)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        except BaseException:
            log.exception("Worker %d crashed", os.getpid())
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def kill_all(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, graceful: bool) -> None:
        now = time.monotonic()
        if graceful:
            if self.stopping:
                return
            self.kill_deadline = now + self.config.graceful_timeout
            self.kill_all(signal.SIGTERM)
        else:
            self.kill_deadline = min(self.kill_deadline, now + 1.0) if self.stopping else now + 1.0
            self.kill_all(signal.SIGQUIT)
        self.stopping = True

    def read_boot_messages(self) -> None:
        while True:
            try:
                data = os.read(self.boot_r, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            # Records are "PID\0MESSAGE\x1e" (see worker.report_boot_failure).
            for record in data.decode("utf-8", "replace").split("\x1e"):
                pid_text, _, message = record.partition("\0")
                if pid_text.strip().isdigit():
                    self.boot_messages[int(pid_text)] = message.rstrip("\n")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            if os.WIFEXITED(status):
                code = os.WEXITSTATUS(status)
                if code in (worker.WORKER_BOOT_ERROR, worker.APP_LOAD_ERROR):
                    self.read_boot_messages()
                    if not self.exit_code:
                        message = self.boot_messages.get(pid, "Worker failed to boot.")
                        log.error("%s", message)
                        log.error("Worker %d (pid %d) failed to boot; stopping the server",
                                  slot, pid)
                        self.exit_code = code
                    self.stop(graceful=False)
                elif code and not self.stopping:
                    log.warning("Worker %d (pid %d) exited with code %d", slot, pid, code)
                else:
                    log.info("Worker %d (pid %d) exited", slot, pid)
            elif os.WIFSIGNALED(status):
                signum = os.WTERMSIG(status)
                try:
                    name = signal.Signals(signum).name
                except ValueError:
                    name = str(signum)
                # A worker the master itself is stopping is not news.
                report = log.info if self.stopping else log.warning
                report("Worker %d (pid %d) was killed by signal %s", slot, pid, name)

    # ---- the loop

    def loop(self) -> None:
        while True:
            try:
                select.select([self.wake_r], [], [], 1.0)
            except InterruptedError:
                pass
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            self.handle_signals()
            self.reap()
            if self.stopping:
                if not self.workers:
                    return
                if time.monotonic() >= self.kill_deadline and not self.killed:
                    log.warning("Graceful timeout reached; killing %d worker(s)",
                                len(self.workers))
                    self.kill_all(signal.SIGKILL)
                    self.killed = True
                continue
            running = set(self.workers.values())
            for slot in range(self.config.workers):
                if slot not in running:
                    self.spawn(slot)

"""Supervised processes: the master's children, and the ``[process.NAME]`` ones.

Rules of this module:

* A ``Child`` is one forked child as the master sees it: a group's worker or
  a supervised process (``kind``), its slot, its generation and its state.
  ``signal_child`` is the one way to signal it: a child that leads its own
  process group (a command process) is signalled as a whole group.
* ``Processes`` keeps every ``[process.NAME]`` (a "process set") at its
  count: a copy that ends (its target returns, raises or dies; its program
  exits) is started again in its slot, after a backoff that doubles with each
  death in a row that came within ``BACKOFF_MAX`` of its start (0.5 s, 1 s,
  2 s, ... up to ``BACKOFF_MAX``) and is 0 after a longer life.
* The crash-loop rule is the groups' (``CrashStreak``, shared with the
  master): ``crash_limit`` failed exits in a row (non-zero, or by a signal),
  each within ``CRASH_WINDOW`` of its start, stop the set (state
  ``crash-loop``) and, with ``on_crash_loop = "stop-server"``, the server.
  Clean exits and copies the master stopped never count.
* A reload moves a set whose table changed (or that is not running) onto a
  new generation, which restarts every copy; an unchanged set keeps its
  copies (same pids) and returns to the file's count.  ``restart`` is that
  for one set, on demand.  Sets gone from the config are stopped.
* A graceful stop of a copy sends its ``stop_signal`` and, ``graceful_timeout``
  later, KILL.  A command process is exec'd in a process group of its own,
  and a copy is its whole group: the stop signal and the KILL go to the
  group, and its slot starts again only once nobody of the group is left
  (``lingering``; the master is the child subreaper, so orphans of the group
  are its children and an empty group is really empty).
* Forking is the master's: ``Processes`` calls back into it (``fork``) and
  records what it spawns in the master's ``children``.
* A command process's stdout and stderr are pipes that the master's loop
  reads (``read_output``, never blocking) and logs as whole lines, each
  prefixed ``[NAME INDEX]`` on the ``fastpool.output`` logger; a line
  without its newline is logged once it is ``PARTIAL_LINE_WAIT`` old or
  ``PARTIAL_LINE_LIMIT`` long.  A target process writes to the master's
  stderr directly, as it always did.
* In the child, ``run_process`` calls the target with the master's signals
  ignored and TERM and QUIT at their default action; its return value is the
  exit code (``worker.APP_LOAD_ERROR`` when the target cannot be imported).
  ``exec_command`` sets up the process (its group, niceness, CPUs, working
  directory, environment, stdin from /dev/null, output pipes, every signal at
  its default action) and execs the command; ``EXEC_FAILED`` when it cannot.
  Every copy has ``FASTPOOL_PROCESS_NAME`` and ``FASTPOOL_PROCESS_INDEX`` in
  its environment.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from fastpool import signals
from fastpool.loading import AppLoadError, import_app
from fastpool.settings import ProcessConfig
from fastpool.worker import APP_LOAD_ERROR, child_setup, set_title

log = logging.getLogger("fastpool.error")
# The lines of command processes (fastpool.log keeps it at INFO whatever
# log_level says: a program's own output is never dropped).
output_log = logging.getLogger("fastpool.output")

BACKOFF_MAX = 30.0           # seconds: the longest wait before a restart
CRASH_WINDOW = 30.0          # a failed exit this soon after boot counts towards a crash loop
PARTIAL_LINE_WAIT = 1.0      # seconds a line without its newline waits before it is logged
PARTIAL_LINE_LIMIT = 64 * 1024   # bytes of a line without newline logged at once
OUTPUT_READ = 64 * 1024      # bytes read from one output pipe per turn of the loop
EXEC_FAILED = 127            # exit code of a command that could not be exec'd (as a shell's)
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


@dataclass
class Child:
    """A forked child of the master."""

    pid: int
    kind: str                # "worker" or "process"
    name: str                # group or process name
    slot: int
    started: float
    board_slot: int = -1     # its record in the scoreboard (workers only)
    generation: int = 0
    ready: bool = False
    retiring: bool = False
    retire_cause: str = ""   # why the master retires it (fastpool.metrics.RESTART_CAUSES, "scale")
    abort_sent: float = 0.0
    own_group: bool = False  # leads a process group of its own (a command process)
    kill_at: float = 0.0     # a stop was asked: KILL at this time (0: no stop asked)
    killed: bool = False     # KILL sent


def signal_child(child: Child, signum: int) -> None:
    """Send ``signum`` to a child (to its whole process group when it leads one)."""
    try:
        if child.own_group:
            os.killpg(child.pid, signum)
        else:
            os.kill(child.pid, signum)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether anybody of process group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # a member that changed its user: still there
    return True


def become_subreaper() -> None:
    """Make this process (the master) the parent of its children's orphans, so
    that a command's whole process group is reaped here and can be seen to end."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass   # not Linux: orphans go to init, which reaps them too


@dataclass
class CrashStreak:
    """Failed exits right after the start, in a row: the crash-loop rule that
    groups and process sets share."""

    count: int = 0

    def record(self, failed: bool, lived: float, limit: int) -> bool:
        """One exit (``failed``: one that may count, after ``lived`` seconds);
        True when it makes the streak reach ``limit``."""
        if not failed or lived > CRASH_WINDOW:
            self.count = 0
            return False
        self.count += 1
        return self.count >= limit

    def reset(self) -> None:
        self.count = 0


def describe_exit(status: int) -> str:
    """A ``waitpid`` status in words: "exit code 0", "killed by signal SIGKILL"."""
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    signum = os.WTERMSIG(status)
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = str(signum)
    return f"killed by signal {name}"


@dataclass
class ProcessGroup:
    """One ``[process.NAME]``: its config and the state of its copies."""

    config: ProcessConfig
    wanted: int = 1                                             # copies to run (scale)
    restarts: int = 0
    generation: int = 0
    failures: dict[int, int] = field(default_factory=dict)      # quick deaths in a row, by slot
    next_start: dict[int, float] = field(default_factory=dict)  # no restart before, by slot
    state: str = "running"                                      # running, crash-loop, stopped
    crashes: CrashStreak = field(default_factory=CrashStreak)
    last_exit: str | None = None                                # describe_exit of the last one

    @property
    def stop_signal(self) -> int:
        return signal.Signals[f"SIG{self.config.stop_signal}"]


class OutputLines:
    """One output pipe of a command process, logged as whole lines with the
    copy's prefix."""

    def __init__(self, fd: int, prefix: str) -> None:
        self.fd = fd
        self.prefix = prefix
        self.pending = bytearray()   # the start of a line whose newline has not come
        self.pending_since = 0.0     # when its first byte came

    def read(self, now: float) -> bool:
        """Read what the pipe has (once); False at its end (every writer gone)."""
        try:
            data = os.read(self.fd, OUTPUT_READ)
        except BlockingIOError:
            return True
        if not data:
            self.flush()
            return False
        self.take(data, now)
        return True

    def drain(self, now: float) -> None:
        """Everything the pipe holds now, then the partial line: the last read."""
        while True:
            try:
                data = os.read(self.fd, OUTPUT_READ)
            except OSError:
                break
            if not data:
                break
            self.take(data, now)
        self.flush()

    def take(self, data: bytes, now: float) -> None:
        had_partial = bool(self.pending)
        self.pending += data
        if b"\n" in data:
            *lines, rest = self.pending.split(b"\n")
            for line in lines:
                self.emit(line)
            self.pending = bytearray(rest)
            self.pending_since = now
        elif not had_partial:
            self.pending_since = now
        while len(self.pending) >= PARTIAL_LINE_LIMIT:
            self.emit(self.pending[:PARTIAL_LINE_LIMIT])
            del self.pending[:PARTIAL_LINE_LIMIT]

    def due(self) -> float | None:
        """When the pending partial line must be logged (None: nothing pending)."""
        return self.pending_since + PARTIAL_LINE_WAIT if self.pending else None

    def flush(self) -> None:
        if self.pending:
            self.emit(self.pending)
            self.pending = bytearray()

    def emit(self, line: bytes | bytearray) -> None:
        output_log.info("%s %s", self.prefix, bytes(line).rstrip(b"\r").decode(
            errors="replace"))


# The master's fork: run ``child_main`` in a child that keeps the sockets in
# ``keep`` (of the master's listening sockets) and exits with its return value.
Fork = Callable[[Callable[[], int], list[socket.socket]], int]


class Processes:
    """Every supervised process of the server, kept at its count."""

    def __init__(self, children: dict[int, Child], fork: Fork, master_pid: int) -> None:
        self.children = children
        self.fork = fork
        self.master_pid = master_pid
        self.groups: dict[str, ProcessGroup] = {}
        # Process groups whose leader has been reaped while others of the group
        # are still alive, by group id (= the leader's pid).
        self.lingering: dict[int, Child] = {}
        self.outputs: dict[int, OutputLines] = {}

    # ---------------------------------------------------------------- the sets

    def add(self, config: ProcessConfig) -> None:
        self.groups[config.name] = ProcessGroup(config, wanted=config.count)

    def reconfigure(self, configs: Mapping[str, ProcessConfig]) -> None:
        """A reload: sets whose table changed (or that are not running) are
        restarted on their new config, new sets started, sets gone stopped;
        the others keep their copies and return to the file's count."""
        for name, config in configs.items():
            process = self.groups.get(name)
            if process is None:
                log.info("Reload: starting process %s", name)
                self.add(config)
                continue
            if config != process.config or process.state != "running":
                log.info("Reload: restarting process %s (%s)", name,
                         "its table changed" if config != process.config else process.state)
                process.config = config
                self.restart(name)
            process.wanted = config.count
        for name, process in self.groups.items():
            if name not in configs:
                log.info("Reload: stopping process %s (gone from the config)", name)
                process.state = "stopped"

    def restart(self, name: str) -> None:
        """Every copy of set ``name`` stopped and started again (a new
        generation), its crash loop and backoff forgotten."""
        process = self.groups[name]
        process.generation += 1
        process.state = "running"
        process.crashes.reset()
        process.failures.clear()
        process.next_start.clear()
        log.info("Restarting process %s (generation %d)", name, process.generation)

    def scale(self, name: str, delta: int) -> int:
        """Set ``name``'s count up or down by ``delta`` (at least 1); the new count."""
        process = self.groups[name]
        process.wanted = max(1, process.wanted + delta)
        log.info("Scaling process %s to %d cop%s", name, process.wanted,
                 "y" if process.wanted == 1 else "ies")
        return process.wanted

    def instances(self, name: str) -> list[Child]:
        """The live children of process ``name``."""
        return [c for c in self.children.values() if c.kind == "process" and c.name == name]

    # ---------------------------------------------------------------- starting

    def spawn(self, process: ProcessGroup, index: int) -> None:
        config, master_pid = process.config, self.master_pid
        if config.command is None:
            pid = self.fork(lambda: run_process(process=config, index=index,
                                                master_pid=master_pid), [])
            self.children[pid] = Child(pid, "process", config.name, index, time.monotonic(),
                                       generation=process.generation)
            return
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = self.fork(lambda: exec_command(process=config, index=index,
                                                 master_pid=master_pid, stdout=out_w,
                                                 stderr=err_w), [])
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        # The child makes its own group too; doing it here as well means the
        # group exists before anyone may signal it, whichever runs first.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass    # the child has done it and exec'd already
        prefix = f"[{config.name} {index}]"
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            self.outputs[fd] = OutputLines(fd, prefix)
        self.children[pid] = Child(pid, "process", config.name, index, time.monotonic(),
                                   generation=process.generation, own_group=True)

    # ---------------------------------------------------------------- stopping

    def retire(self, child: Child) -> None:
        """A graceful stop of one copy: its stop_signal now, KILL after its
        graceful_timeout (``check_stops``)."""
        if child.retiring:
            return
        child.retiring = True
        process = self.groups.get(child.name)
        stop = process.stop_signal if process is not None else signal.SIGTERM
        grace = process.config.graceful_timeout if process is not None else 0.0
        child.kill_at = time.monotonic() + grace
        signal_child(child, stop)

    def stop_all(self) -> None:
        """The server's graceful stop: every copy gets its stop signal."""
        for child in list(self.children.values()):
            if child.kind == "process":
                self.retire(child)

    def quit_all(self) -> None:
        """The server's immediate stop: QUIT to target processes (as to
        workers), KILL to every command's process group."""
        for child in [*self.children.values(), *self.lingering.values()]:
            if child.kind == "process":
                child.retiring = True
                signal_child(child, signal.SIGKILL if child.own_group else signal.SIGQUIT)

    def kill_lingering(self) -> None:
        for child in self.lingering.values():
            signal_child(child, signal.SIGKILL)

    def check_stops(self) -> None:
        """KILL the copies (and lingering groups) whose graceful_timeout is
        over; forget the lingering groups nobody is left of."""
        now = time.monotonic()
        for child in [*self.children.values(), *self.lingering.values()]:
            if child.kind == "process" and child.kill_at and not child.killed and \
                    now >= child.kill_at:
                log.warning("Process %s %d (pid %d) did not stop within its graceful_timeout: "
                            "killing it%s", child.name, child.slot, child.pid,
                            " and its process group" if child.own_group else "")
                signal_child(child, signal.SIGKILL)
                child.killed = True
        for pgid in [pgid for pgid in self.lingering if not group_alive(pgid)]:
            del self.lingering[pgid]

    def exited(self, child: Child, crashed: bool, how: str) -> bool:
        """A copy was reaped (``how``: ``describe_exit``): when may its slot
        start again.  True when this exit makes its set crash-loop (the set is
        then stopped; the caller says so and applies on_crash_loop)."""
        process = self.groups.get(child.name)
        now = time.monotonic()
        if child.own_group and group_alive(child.pid):
            # Its program is gone, not all of its group: the rest is stopped as
            # the copy would have been, and the slot waits for the group to end.
            if not child.kill_at:
                child.kill_at = now + (process.config.graceful_timeout if process else 0.0)
                signal_child(child, process.stop_signal if process else signal.SIGTERM)
            self.lingering[child.pid] = child
        if process is None:
            return False
        process.last_exit = how
        if child.retiring:
            return False
        process.restarts += 1
        lived = now - child.started
        failures = 0 if lived > BACKOFF_MAX else process.failures.get(child.slot, 0) + 1
        process.failures[child.slot] = failures
        delay = min(BACKOFF_MAX, 0.5 * 2 ** (failures - 1)) if failures else 0.0
        process.next_start[child.slot] = now + delay
        if process.crashes.record(crashed, lived, process.config.crash_limit) and \
                process.state == "running":
            process.state = "crash-loop"
            return True
        if delay:
            log.info("Process %s %d will be restarted in %.1f s", child.name, child.slot, delay)
        return False

    def maintain(self) -> None:
        """Bring every process to its count, on its current generation."""
        now = time.monotonic()
        for name, process in list(self.groups.items()):
            instances = self.instances(name)
            lingering = [c for c in self.lingering.values() if c.name == name]
            if process.state != "running":
                for child in instances:
                    self.retire(child)
                if process.state == "stopped" and not instances and not lingering:
                    del self.groups[name]
                continue
            for child in instances:
                if child.slot >= process.wanted or child.generation != process.generation:
                    self.retire(child)
            # A slot starts again once its last copy, and that copy's whole
            # process group, is gone.
            busy = {c.slot for c in instances + lingering}
            for index in range(process.wanted):
                if index not in busy and now >= process.next_start.get(index, 0.0):
                    self.spawn(process, index)

    # ---------------------------------------------------------------- output

    def output_fds(self) -> list[int]:
        return list(self.outputs)

    def read_output(self, ready: Iterable[object]) -> None:
        """Read the output pipes among ``ready``; log the partial lines that are due."""
        now = time.monotonic()
        for fd in ready:
            lines = self.outputs.get(fd) if isinstance(fd, int) else None
            if lines is not None and not lines.read(now):
                os.close(fd)
                del self.outputs[fd]
        for lines in self.outputs.values():
            due = lines.due()
            if due is not None and now >= due:
                lines.flush()

    def next_output_due(self) -> float | None:
        """When the next partial line must be logged (None: none pending)."""
        return min((d for d in (o.due() for o in self.outputs.values()) if d is not None),
                   default=None)

    def close_output(self) -> None:
        """The master is leaving: log what the pipes still hold, then close them."""
        now = time.monotonic()
        for fd, lines in self.outputs.items():
            lines.drain(now)
            os.close(fd)
        self.outputs = {}

    def close_in_child(self) -> None:
        """A forked child's copies of the pipes' read ends."""
        for fd in self.outputs:
            os.close(fd)
        self.outputs = {}


def process_environ(config: ProcessConfig, index: int) -> dict[str, str]:
    """What a copy adds to the environment: its env table, its name and index."""
    return {**dict(config.env), "FASTPOOL_PROCESS_NAME": config.name,
            "FASTPOOL_PROCESS_INDEX": str(index)}


def run_process(*, process: ProcessConfig, index: int, master_pid: int) -> int:
    """A supervised custom process: call its target; its return ends the process."""
    set_title(f"fastpool: {process.name} process {index}")
    child_setup(master_pid, process.nice, process.cpus,
                death_signal=signal.Signals[f"SIG{process.stop_signal}"])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    os.environ.update(process_environ(process, index))
    log.info("Starting process %s %d with pid: %d", process.name, index, os.getpid())
    if process.cwd is not None:
        try:
            os.chdir(process.cwd)
        except OSError as exc:
            log.error("process %s %d: cannot change to %s: %s", process.name, index,
                      process.cwd, exc.strerror)
            return 1
    assert process.target is not None     # (a target process: load() saw to it)
    try:
        target = import_app(process.target, callable_kind="a process target")
        target()
    except AppLoadError as exc:
        log.error("process %s: %s", process.name, exc)
        return APP_LOAD_ERROR
    except Exception:
        log.exception("process %s %d (pid %d) raised", process.name, index, os.getpid())
        return 1
    return 0


# Python ignores these itself, and an exec keeps what is ignored: a program
# must start with them at their default action, as it would from a shell.
PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


def exec_command(*, process: ProcessConfig, index: int, master_pid: int, stdout: int,
                 stderr: int) -> int:
    """A supervised program, in the forked child: set up, then exec it.
    Returns only when the exec fails (``EXEC_FAILED``)."""
    assert process.command is not None
    # The master's death reaches the program as a graceful stop.
    child_setup(master_pid, process.nice, process.cpus,
                death_signal=signal.Signals[f"SIG{process.stop_signal}"])
    for signum in (*signals.MASTERS_SIGNALS, *PYTHON_IGNORED):
        signal.signal(signum, signal.SIG_DFL)
    # Its own process group: a stop reaches every process it starts, and a
    # Ctrl-C on the master's terminal reaches only the master, which stops it.
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    environ = {**os.environ, **process_environ(process, index)}
    try:
        if process.cwd is not None:
            os.chdir(process.cwd)
        os.execvpe(process.command[0], list(process.command), environ)
    except OSError as exc:
        # stderr is the pipe now: the master logs this with the copy's prefix.
        log.error("process %s %d: cannot run %s: %s", process.name, index,
                  shlex.join(process.command), exc.strerror or exc)
    return EXEC_FAILED

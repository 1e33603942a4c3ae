"""Supervised processes: the master's children, and the ``[process.NAME]`` ones.

Rules of this module:

* A ``Child`` is one forked child as the master sees it: a group's worker or
  a supervised process (``kind``), its slot, its generation and its state.
* ``Processes`` keeps every ``[process.NAME]`` at its ``count``: an instance
  that ends (its target returns, raises or dies) is started again in its
  slot, after a backoff that doubles with each death in a row that came
  within ``BACKOFF_MAX`` of its start (0.5 s, 1 s, 2 s, ... up to
  ``BACKOFF_MAX``) and is 0 after a longer life.  A reload moves every
  instance of a process onto a new generation, and stops the processes gone
  from the config.
* Forking and signalling are the master's: ``Processes`` calls back into it
  (``fork``, ``retire``) and records what it spawns in the master's
  ``children``.
* In the child, ``run_process`` calls the target with the master's signals
  ignored and TERM and QUIT at their default action; its return value is the
  exit code (``worker.APP_LOAD_ERROR`` when the target cannot be imported).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fastpool.loading import AppLoadError, import_app
from fastpool.settings import ProcessConfig
from fastpool.worker import APP_LOAD_ERROR, child_setup, set_title

log = logging.getLogger("fastpool.error")

BACKOFF_MAX = 30.0      # seconds: the longest wait before a restart


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
    abort_sent: float = 0.0


@dataclass
class ProcessGroup:
    """One ``[process.NAME]``: its config and the state of its instances."""

    config: ProcessConfig
    restarts: int = 0
    generation: int = 0
    failures: dict[int, int] = field(default_factory=dict)      # quick deaths in a row, by slot
    next_start: dict[int, float] = field(default_factory=dict)  # no restart before, by slot
    state: str = "running"                                      # running, stopped


# The master's fork: run ``child_main`` in a child that keeps the sockets in
# ``keep`` (of the master's listening sockets) and exits with its return value.
Fork = Callable[[Callable[[], int], list[socket.socket]], int]


class Processes:
    """Every supervised process of the server, kept at its count."""

    def __init__(self, children: dict[int, Child], fork: Fork,
                 retire: Callable[[Child], None], master_pid: int) -> None:
        self.children = children
        self.fork = fork
        self.retire = retire
        self.master_pid = master_pid
        self.groups: dict[str, ProcessGroup] = {}

    def add(self, config: ProcessConfig) -> None:
        self.groups[config.name] = ProcessGroup(config)

    def reconfigure(self, configs: Mapping[str, ProcessConfig]) -> None:
        """A reload: new configs (and a new generation) for the processes in
        ``configs``, new processes started, the others stopped."""
        for name, config in configs.items():
            process = self.groups.get(name)
            if process is None:
                self.add(config)
            else:
                process.config = config
                process.generation += 1
        for name, process in self.groups.items():
            if name not in configs:
                process.state = "stopped"

    def instances(self, name: str) -> list[Child]:
        """The live children of process ``name``."""
        return [c for c in self.children.values() if c.kind == "process" and c.name == name]

    def spawn(self, process: ProcessGroup, index: int) -> None:
        config, master_pid = process.config, self.master_pid
        pid = self.fork(lambda: run_process(process=config, index=index,
                                            master_pid=master_pid), [])
        self.children[pid] = Child(pid, "process", config.name, index, time.monotonic(),
                                   generation=process.generation)

    def exited(self, child: Child) -> None:
        """An instance ended on its own: when may its slot start again."""
        process = self.groups.get(child.name)
        if process is None or child.retiring:
            return
        process.restarts += 1
        lived = time.monotonic() - child.started
        failures = 0 if lived > BACKOFF_MAX else process.failures.get(child.slot, 0) + 1
        process.failures[child.slot] = failures
        delay = min(BACKOFF_MAX, 0.5 * 2 ** (failures - 1)) if failures else 0.0
        process.next_start[child.slot] = time.monotonic() + delay
        if delay:
            log.info("Process %s %d will be restarted in %.1f s", child.name, child.slot, delay)

    def maintain(self) -> None:
        """Bring every process to its count, on its current generation."""
        now = time.monotonic()
        for name, process in list(self.groups.items()):
            instances = self.instances(name)
            if process.state == "stopped":
                for child in instances:
                    self.retire(child)
                if not instances:
                    del self.groups[name]
                continue
            for child in instances:
                if child.slot >= process.config.count or child.generation != process.generation:
                    self.retire(child)
            running = {c.slot for c in instances if not c.retiring}
            for index in range(process.config.count):
                if index not in running and now >= process.next_start.get(index, 0.0) and \
                        not any(c.slot == index for c in instances):
                    self.spawn(process, index)


def run_process(*, process: ProcessConfig, index: int, master_pid: int) -> int:
    """A supervised custom process: call its target; its return ends the process."""
    set_title(f"fastpool: {process.name} process {index}")
    child_setup(master_pid, process.nice, process.cpus)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    log.info("Starting process %s %d with pid: %d", process.name, index, os.getpid())
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

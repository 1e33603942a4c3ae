"""Which signal means what, to the master and to a worker: the one table.

Rules of this module:

* Every signal fastpool handles is one row of ``TABLE``: what the master does
  when it receives it, and what a worker does (or that a worker leaves it to
  the master and ignores it).  master.py installs its handlers from
  ``MASTER_SIGNALS``, worker.py from ``WORKER_SIGNALS``; nothing else lists
  signals.
* A worker's signals (``WORKER_SIGNALS``): TERM = graceful stop, USR2 = retire
  (graceful, but idle keep-alive connections are not cut), QUIT = immediate
  exit, USR1 = reopen the log files.  The master's own (INT, HUP, TTIN, TTOU)
  are ignored in a worker: a Ctrl-C reaches the whole process group, and the
  master then stops the workers in order.
* SIGABRT is nobody's handler: faulthandler dumps a worker's Python stacks
  before the default action kills it (how the master's ``timeout`` shows where
  a worker was stuck).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

# What a signal asks of the master.
GRACEFUL_STOP = "graceful stop"
INTERRUPT = "graceful stop; a second one: immediate stop"
IMMEDIATE_STOP = "immediate stop"
RELOAD = "reload"
MORE_WORKERS = "one worker more in every group"
FEWER_WORKERS = "one worker fewer in every group"
REOPEN_LOGS = "reopen the log files, and the workers theirs"
REAP = "reap children"

# What a signal asks of a worker.
SHUTDOWN = "shutdown"          # graceful stop, idle keep-alive connections closed
RETIRE = "retire"              # graceful stop, idle keep-alive connections kept until due
QUIT = "quit"                  # exit now
REOPEN_LOG = "reopen log"      # reopen the access and error logs
MASTERS = "the master's"       # ignored: the master's business
DEFAULT = "default"            # the default action


@dataclass(frozen=True)
class Meaning:
    """One row: what ``signum`` means to the master ("": not handled) and to a worker."""

    signum: signal.Signals
    master: str
    worker: str


TABLE: tuple[Meaning, ...] = (
    Meaning(signal.SIGTERM, master=GRACEFUL_STOP, worker=SHUTDOWN),
    Meaning(signal.SIGUSR2, master="", worker=RETIRE),
    Meaning(signal.SIGQUIT, master=IMMEDIATE_STOP, worker=QUIT),
    Meaning(signal.SIGUSR1, master=REOPEN_LOGS, worker=REOPEN_LOG),
    Meaning(signal.SIGINT, master=INTERRUPT, worker=MASTERS),
    Meaning(signal.SIGHUP, master=RELOAD, worker=MASTERS),
    Meaning(signal.SIGTTIN, master=MORE_WORKERS, worker=MASTERS),
    Meaning(signal.SIGTTOU, master=FEWER_WORKERS, worker=MASTERS),
    Meaning(signal.SIGCHLD, master=REAP, worker=DEFAULT),
)

# What the master does on each signal it handles.
MASTER_ACTIONS: dict[signal.Signals, str] = {m.signum: m.master for m in TABLE if m.master}
# The signals the master handles (and blocks across a fork).
MASTER_SIGNALS: tuple[signal.Signals, ...] = tuple(MASTER_ACTIONS)
# What a worker does on each signal it handles itself.
WORKER_ACTIONS: dict[signal.Signals, str] = {
    m.signum: m.worker for m in TABLE if m.worker not in (MASTERS, DEFAULT)}
# The signals a worker handles, from its first instruction on: TERM, USR2,
# QUIT, USR1 (the ASGI worker re-registers their Python handlers on its loop).
WORKER_SIGNALS: tuple[signal.Signals, ...] = tuple(WORKER_ACTIONS)
# The signal that asks a worker for an action (what the master sends).
SIGNAL_FOR: dict[str, signal.Signals] = {action: s for s, action in WORKER_ACTIONS.items()}
# The master's signals, which a worker ignores.
MASTERS_SIGNALS: tuple[signal.Signals, ...] = tuple(
    m.signum for m in TABLE if m.worker == MASTERS)
# Signals a worker leaves at their default action.
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    m.signum for m in TABLE if m.worker == DEFAULT)

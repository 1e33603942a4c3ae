"""A tiny bjoern launcher: ``python bjoern_serve.py HOST PORT WORKERS`` serves ``apps:app``.

Rules: with one worker bjoern runs in this process; with more, the socket is
bound once and the process forks WORKERS children that all serve it, the parent
only waiting for them (and passing SIGTERM/SIGINT on). Run it with bench/ on
``sys.path`` (PYTHONPATH), as run.py does.
"""

from __future__ import annotations

import os
import signal
import sys

import bjoern
from apps import app


def main(argv: list[str]) -> None:
    host, port, workers = argv[0], int(argv[1]), int(argv[2])
    if workers <= 1:
        bjoern.run(app, host, port)
        return
    bjoern.listen(app, host, port)
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            bjoern.run()
            os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


if __name__ == "__main__":
    main(sys.argv[1:])

"""The app of the isolation benchmark (``bench/isolation.py``); import as ``isolation_app:app``.

Routes:

* ``GET /``                  -- the fast path: ``Hello, World!\\n`` at once
* ``GET /slow/sleep?ms=N``   -- blocks N ms (default 200) in ``time.sleep``: a request that
  waits on I/O and holds its worker (or thread) without using the CPU
* ``GET /slow/cpu?ms=N``     -- spins until the request's thread has used N ms of CPU
  time: work that needs the CPU, so under contention it takes longer than N ms
* ``GET /tast/sleep?ms=N``, ``GET /tast/cpu?ms=N`` -- the same under ``/tast``, the prefix
  that the one-port layouts (``isolation.py --one-port``) route to a separate pool
* ``GET /tast/hello``        -- ``Hello, World!\n`` at once, like ``/``: the routed hello
  of ``bench/routes.py`` (the app's work is the same for both paths)
* anything else              -- 404

Every response carries a Content-Length. Only the standard library is used, so every
server's interpreter can import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

HELLO = b"Hello, World!\n"
DEFAULT_MS = 200
SLOW_KINDS = ("sleep", "cpu")
SLOW_PREFIXES = ("/slow/", "/tast/")  # the two-port layouts use /slow, the one-port /tast
ROUTED_HELLO = "/tast/hello"


def block_sleep(seconds: float) -> None:
    time.sleep(seconds)


def block_cpu(seconds: float) -> None:
    """Busy-loop until this thread has used ``seconds`` of CPU time (not wall time)."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        for _ in range(1000):  # real work between clock reads
            n += 1


_BLOCK = {"sleep": block_sleep, "cpu": block_cpu}


def _respond(start_response: Callable[..., Any], status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"),
                            ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/" or path == ROUTED_HELLO:
        return _respond(start_response, "200 OK", HELLO)
    kind = None
    for prefix in SLOW_PREFIXES:
        if path.startswith(prefix):
            kind = path[len(prefix):]
            break
    if kind in _BLOCK:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            ms = int(query.get("ms", [DEFAULT_MS])[0])
        except ValueError:
            return _respond(start_response, "400 Bad Request", b"ms must be an integer\n")
        _BLOCK[kind](ms / 1000.0)
        return _respond(start_response, "200 OK", f"{kind} {ms} ms\n".encode())
    return _respond(start_response, "404 Not Found", b"not found\n")

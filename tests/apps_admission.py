"""The apps of the admission-control tests (test_admission.py).

``app`` (WSGI) and ``asgi`` (ASGI 3) answer ``/slow`` after 0.2 s of blocking
work (``time.sleep``: a worker that is busy, the case admission control is
for) and anything else at once; the body is ``PATH PID``.
"""

from __future__ import annotations

import os
import time
from typing import Any

SLOW_SECONDS = 0.2


def _body(path: str) -> bytes:
    if path == "/slow":
        time.sleep(SLOW_SECONDS)
    return f"{path} {os.getpid()}\n".encode()


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = _body(environ["PATH_INFO"])
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = _body(scope["path"])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

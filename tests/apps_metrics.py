"""Apps of tests/test_metrics.py, WSGI (``app``) and ASGI (``asgi``), with the
same paths: /hello 200, /missing 404, /fail raises (500), /slow?S sleeps S
seconds, /grow keeps 80 MiB more of memory (max_rss), and every request
counts in the app's own prometheus_client counter ``app_requests_total``."""

import asyncio
import time

from prometheus_client import Counter

REQUESTS = Counter("app_requests", "Requests the app saw", ["path"])
HELD: list[bytes] = []
GROW = 80 * 1024 * 1024


def _answer(path: str, query: str) -> tuple[str, float]:
    REQUESTS.labels(path).inc()
    if path == "/missing":
        return "404 Not Found", 0.0
    if path == "/fail":
        raise RuntimeError("the app failed on purpose")
    if path == "/grow":
        HELD.append(b"x" * GROW)
    return "200 OK", float(query) if path == "/slow" and query else 0.0


def app(environ, start_response):
    status, pause = _answer(environ["PATH_INFO"], environ.get("QUERY_STRING", ""))
    if pause:
        time.sleep(pause)
    start_response(status, [("Content-Type", "text/plain")])
    return [status.encode()]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    status, pause = _answer(scope["path"], scope["query_string"].decode())
    if pause:
        await asyncio.sleep(pause)
    code = int(status.split()[0])
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": status.encode()})

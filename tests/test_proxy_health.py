"""health_path (answered without the app) and forwarded_allow_ips (trusted proxies)."""

from __future__ import annotations

import http.client
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from client import fetch, start_sleeper
from conftest import wait_for

# ---------------------------------------------------------------- health_path


def test_health_path_is_answered_without_the_app(serve):
    # apps_wsgi:main answers any other path with the request's environ as JSON.
    server = serve("apps_wsgi:main", "--health-path", "/healthz", "--access-log", "-")
    status, headers, body = fetch(server, "/healthz")
    assert (status, body) == (200, b"OK\n")
    assert headers["content-type"] == "text/plain"
    assert headers["server"] == "fastpool"
    status, _, body = fetch(server, "/healthz?probe=1")
    assert (status, body) == (200, b"OK\n")
    # Only the exact path: /healthzz and /healthz/x go to the app.
    for path in ("/healthzz", "/healthz/x"):
        status, _, body = fetch(server, path)
        assert status == 200
        assert json.loads(body)["PATH_INFO"] == path
    wait_for(lambda: '"GET /healthz HTTP/1.1" 200 3' in server.log, what="an access log line")


def test_health_path_says_503_once_a_graceful_stop_begins(serve):
    server = serve("apps_wsgi:main", "--health-path", "/healthz", "--workers", "1")
    keep_alive = http.client.HTTPConnection(server.host, server.port, timeout=10)
    assert fetch(keep_alive, "/healthz").status == 200
    with ThreadPoolExecutor(1) as pool:
        future = start_sleeper(pool, server, 1.5)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM" in server.log, what="the master to get TERM")
        # The worker is busy in the app; the health request on the open
        # keep-alive connection is answered as soon as it is free, with 503.
        status, headers, body = fetch(keep_alive, "/healthz")
        assert (status, body) == (503, b"stopping\n")
        assert headers["connection"] == "close"
        assert future.result(timeout=15).status == 200     # the in-flight request still completes
    assert server.proc.wait(15) == 0


def test_health_is_not_queued_behind_busy_app_threads(serve):
    server = serve("apps_wsgi:main", "--health-path", "/healthz", "--workers", "1",
                   "--threads", "2")
    with ThreadPoolExecutor(2) as pool:
        sleepers = [start_sleeper(pool, server, 2) for _ in range(2)]   # every thread busy
        started = time.monotonic()
        status, _, body = fetch(server, "/healthz")
        took = time.monotonic() - started
        assert (status, body) == (200, b"OK\n")
        assert took < 0.5, f"the health check waited {took:.2f}s behind the app threads"
        assert all(f.result(timeout=15).status == 200 for f in sleepers)


def test_health_path_must_be_a_path(serve):
    server = serve("apps_wsgi:main", "--health-path", "healthz", wait=False)
    assert server.proc.wait(15) == 2
    assert "--health-path: expected a path starting with /" in server.log


# ---------------------------------------------------------------- forwarded_allow_ips


def environ_of(server, headers: dict[str, str]) -> dict:
    status, _, body = fetch(server, "/", headers=headers)
    assert status == 200
    return json.loads(body)


def test_trusted_proxy_sets_remote_addr_and_scheme(serve):
    server = serve("apps:environ")   # default: 127.0.0.1 and ::1 are trusted
    env = environ_of(server, {"X-Forwarded-For": "203.0.113.7",
                              "X-Forwarded-Proto": "https"})
    assert env["REMOTE_ADDR"] == "203.0.113.7"
    assert env["wsgi.url_scheme"] == "https"
    # The client is the nearest hop that is not a trusted proxy itself.
    env = environ_of(server, {"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 127.0.0.1"})
    assert env["REMOTE_ADDR"] == "203.0.113.9"
    # An unknown scheme is ignored.
    assert environ_of(server, {"X-Forwarded-Proto": "gopher"})["wsgi.url_scheme"] == "http"
    assert environ_of(server, {})["REMOTE_ADDR"] == "127.0.0.1"


def test_untrusted_peer_cannot_spoof(serve):
    server = serve("apps:environ", "--forwarded-allow-ips", "10.1.2.3")
    env = environ_of(server, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["wsgi.url_scheme"] == "http"


def test_trust_every_peer(serve):
    server = serve("apps:environ", "--forwarded-allow-ips", "*")
    # Every hop is trusted, so the left-most address is the original client.
    env = environ_of(server, {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
    assert env["REMOTE_ADDR"] == "198.51.100.1"

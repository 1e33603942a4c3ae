"""No client can hold up another client of the same worker; streamed bodies are
not held back; deadlines are what README says; bad input ends a connection,
never a worker.

Rules: one worker per server (so "another client" means the same worker), on
both interfaces.  Each misbehaving client is checked against a second client
whose request must be answered within ``FAST`` while the first one
misbehaves, and against the worker's pid (it must not have died).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from client import Stream, connect, get, read_until_close, worker_pid
from conftest import HTTP_APPS, Server, start_http_server, stop_server, wait_for

FAST = 0.1           # seconds: a request to a free worker takes about a millisecond
CLIENT_TIMEOUT = 2   # --client-timeout of the servers below


# (the ``interface`` fixture, wsgi and asgi, is conftest's)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, interface: str) -> Iterator[Server]:
    srv = start_http_server(interface, tmp_path_factory.mktemp(f"hard-{interface}"),
                            "--client-timeout", str(CLIENT_TIMEOUT),
                            "--limit-request-body", "100000")
    yield srv
    stop_server(srv)


def answered_fast(server: Server, path: str = "/fast") -> float:
    """A second client's request is answered within FAST; returns its time."""
    started = time.monotonic()
    sock, stream = connect(server)
    with sock:
        sock.sendall(get(path))
        response = stream.response()
    elapsed = time.monotonic() - started
    assert response.status == 200
    assert elapsed < FAST, f"the other client waited {elapsed * 1000:.0f} ms"
    return elapsed


# ---------------------------------------------------------------- one client never holds the worker


def test_expect_100_continue_without_a_body_holds_nobody(server):
    pid = worker_pid(server)
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        stream = Stream(sock)
        assert stream.response().status == 100
        for _ in range(5):
            answered_fast(server)
        # The body never comes: 408 once the body stops arriving for client_timeout.
        started = time.monotonic()
        rest = stream.until_eof()
        assert rest.startswith(b"HTTP/1.1 408 "), rest[:100]
        assert CLIENT_TIMEOUT - 0.5 < time.monotonic() - started < CLIENT_TIMEOUT + 1.5
    assert worker_pid(server) == pid


def test_a_client_that_stops_reading_holds_nobody(server):
    """A large streamed body to a client that reads nothing: the worker serves
    others meanwhile, and closes the stalled connection after client_timeout
    without progress, with one log line."""
    pid = worker_pid(server)
    before = server.log.count("took no response bytes")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((server.host, server.port))
    with sock:
        sock.sendall(get("/big?size=200000000&chunked=1"))
        for _ in range(5):
            answered_fast(server)
        wait_for(lambda: server.log.count("took no response bytes") > before,
                 timeout=CLIENT_TIMEOUT + 3, what="the stalled reader to be closed")
        # What the client had not read ends in a close.
        read_until_close(sock, 10)
    assert server.log.count("took no response bytes") == before + 1
    assert worker_pid(server) == pid


def test_a_trickled_head_holds_nobody_and_is_cut_from_its_first_byte(server):
    """client_timeout counts from a request's first byte, however the rest trickles."""
    with server.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = b"GET /slow HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 200
        first_byte = time.monotonic()
        closed_after = None
        for index, byte in enumerate(head):
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - first_byte
                break
            if index == 5:
                answered_fast(server)
            sock.settimeout(0.05)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            closed_after = time.monotonic() - first_byte
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            break
    assert closed_after is not None, "the trickled head was never cut"
    assert CLIENT_TIMEOUT - 0.1 <= closed_after <= CLIENT_TIMEOUT + 1.1, closed_after


def test_a_body_that_stops_arriving_holds_nobody_and_gets_408(server):
    pid = worker_pid(server)
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n12345")
        for _ in range(5):
            answered_fast(server)
        answer = read_until_close(sock, CLIENT_TIMEOUT + 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert worker_pid(server) == pid


def test_half_close_in_the_middle_of_a_body_holds_nobody(server):
    """The client sends part of a body, then shuts its side: the request can never
    complete.  No answer, no app error in the log, and the worker serves on."""
    pid = worker_pid(server)
    log_before = server.log
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n12345")
        answered_fast(server)
        sock.shutdown(socket.SHUT_WR)
        assert read_until_close(sock, 5) == b""
        answered_fast(server)
    new_lines = server.log[len(log_before):]
    assert "Error" not in new_lines and "Traceback" not in new_lines, new_lines
    assert worker_pid(server) == pid


# ---------------------------------------------------------------- streamed bodies are not held back


def event_times(sock: socket.socket, count: int, timeout: float = 10.0) -> list[float]:
    """When each of ``count`` server-sent events arrived (seconds after now)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    seen: list[float] = []
    data = b""
    while len(seen) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(seen)} events"
        data += chunk
        while data.count(b"data: ") > len(seen):
            seen.append(time.monotonic() - started)
    return seen


def assert_events_arrive_as_produced(sock: socket.socket, path: str, every: float = 0.3,
                                     count: int = 4) -> None:
    sock.sendall(get(f"{path}?n={count}&every={every}"))
    times = event_times(sock, count)
    for index, arrived in enumerate(times):
        # Each event leaves when it is produced, not with the next or at the end.
        assert index * every - 0.05 < arrived < index * every + 0.2, times


def test_each_streamed_block_is_sent_as_the_app_produces_it(server):
    with server.connect() as sock:
        assert_events_arrive_as_produced(sock, "/events")


@pytest.mark.parametrize(("app", "path"), [
    ("apps_wsgi_flask:app", "/events"),             # Flask stream_with_context
    ("apps_django:application", "/events"),         # Django StreamingHttpResponse, WSGI
    ("apps_django:asgi_application", "/aevents"),   # the same over ASGI, an async generator
])
def test_framework_streaming_responses_are_not_held_back(serve, app, path):
    srv = serve(app)
    with srv.connect() as sock:
        assert_events_arrive_as_produced(sock, path)


# ---------------------------------------------------------------- closing cleanly


def test_an_error_answered_while_the_client_still_sends_is_not_destroyed(server):
    """413 for a body the server refuses, while the client is still sending it:
    the server shuts its side and drains, so the answer is not lost to a reset."""
    body = b"x" * 2_000_000
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = b""
        try:
            for start in range(0, len(body), 65536):
                part = body[start:start + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_until_close(sock, 10)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert answer.endswith(b"request body too large\n"), answer[-100:]


def test_upgrade_request_with_a_body_in_a_later_read_never_kills_the_worker(server):
    """It killed an ASGI worker (an empty list indexed with bounds checks off)."""
    pid = worker_pid(server)
    for _ in range(12):
        with server.connect() as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n"
                         b"Upgrade: x\r\nContent-Length: 5\r\n\r\n")
            time.sleep(0.01)   # the body must come in a read of its own
            sock.sendall(b"hello")
            answer = read_until_close(sock, 5)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        assert answer.endswith(b"hello")
    assert worker_pid(server) == pid


def test_a_client_reset_in_the_middle_of_a_response_is_a_closed_connection(server):
    pid = worker_pid(server)
    for _ in range(5):
        sock = server.connect()
        sock.sendall(get("/big?size=50000000"))
        assert sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        answered_fast(server)
    assert worker_pid(server) == pid


# ---------------------------------------------------------------- out of descriptors


def test_running_out_of_descriptors_pauses_accepting(serve, interface, tmp_path: Path):
    """At the descriptor limit the worker stops accepting for a second at a time
    (one log line each), keeps serving the connections it has, and accepts
    again once descriptors are free."""
    srv = serve(HTTP_APPS[interface], "--interface", interface,
                "--client-timeout", "30", nofile=80)
    held = [srv.connect() for _ in range(100)]
    try:
        # Whatever the worker accepted still works (the first one surely was).
        held[0].sendall(get("/first"))
        assert Stream(held[0]).response().body == b"GET /first"
        wait_for(lambda: "accept failed" in srv.log, timeout=10,
                 what="the worker to run out of descriptors")
        first = time.monotonic()
        # It tries again after its pause, and fails again: one line per try,
        # not one per queued connection or per loop turn.
        wait_for(lambda: srv.log.count("accept failed") >= 3, timeout=10,
                 what="the worker to retry accepting")
        assert srv.log.count("accept failed") <= 3 + (time.monotonic() - first), srv.log[-2000:]
        for sock in held[40:]:
            sock.close()
        del held[40:]
        # Freed descriptors: a new client is accepted and served.
        with srv.connect() as sock:
            sock.sendall(get("/after"))
            assert Stream(sock, timeout=10).response().body == b"GET /after"
        held[1].sendall(get("/still"))
        assert Stream(held[1]).response().body == b"GET /still"
    finally:
        for sock in held:
            sock.close()


def test_bytes_sent_after_a_closing_request_do_not_reset_its_answer(server):
    """``Connection: close``, then more bytes while a large answer is still
    going out: the server never reads them (nothing after a closing request is
    a request), and closing with them unread would reset the connection and
    throw away what the kernel had not sent yet; it drains them first, as
    after an error."""
    size = 16 * 1024 * 1024
    with server.connect() as sock:
        sock.sendall(get(f"/big?size={size}", extra="Connection: close\r\n"))
        sock.settimeout(10)
        answer = sock.recv(65536)
        try:
            sock.sendall(b"after the close " * 4096)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer += read_until_close(sock, 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert len(body) == size, (head, len(body))

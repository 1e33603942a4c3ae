"""Request limits (gunicorn's names and defaults): request line, header fields,
header field size and body size, set by flag or by environment variable.

Each rejected request gets its status (414, 431, 413), the connection is
closed, and the same worker goes on serving.  Every test runs against both
interfaces: ``--interface wsgi`` serving ``tests/apps_http.py`` and
``--interface asgi`` serving ``tests/apps_http_asgi.py`` (the same routes).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from client import (
    Response,
    Stream,
    chunked_post,
    exchange,
    get,
    read_until_close,
    worker_pid,
)
from conftest import Server, start_http_server, stop_server

DEFAULT_LINE = 4094
DEFAULT_FIELDS = 100
DEFAULT_FIELD_SIZE = 8190

# The custom limits, given by flags or by environment variables.
LINE = 100
FIELDS = 5
FIELD_SIZE = 200
BODY = 1000
CUSTOM = {
    "limit-request-line": LINE,
    "limit-request-fields": FIELDS,
    "limit-request-field-size": FIELD_SIZE,
    "limit-request-body": BODY,
}


# (the ``interface`` fixture, wsgi and asgi, is conftest's)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, interface: str) -> Iterator[Server]:
    srv = start_http_server(interface, tmp_path_factory.mktemp(f"limits-default-{interface}"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module", params=["flags", "env"])
def custom_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  interface: str) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp(f"limits-{request.param}-{interface}")
    if request.param == "flags":
        args = [item for name, value in CUSTOM.items() for item in (f"--{name}", str(value))]
        srv = start_http_server(interface, directory, *args)
    else:
        env = {"FASTPOOL_" + name.upper().replace("-", "_"): str(value)
               for name, value in CUSTOM.items()}
        srv = start_http_server(interface, directory, env=env)
    yield srv
    stop_server(srv)


# ---------------------------------------------------------------- helpers


def request_line(length: int, method: str = "GET") -> bytes:
    """A request line of exactly ``length`` bytes, CRLF not counted."""
    fixed = len(f"{method} / HTTP/1.1")
    assert length >= fixed
    return f"{method} /{'a' * (length - fixed)} HTTP/1.1".encode()


def with_fields(count: int, first_line: bytes = b"GET / HTTP/1.1") -> bytes:
    """A request with exactly ``count`` header fields (Host included)."""
    fields = [b"Host: test"] + [b"X-Field-%d: %d" % (i, i) for i in range(1, count)]
    return first_line + b"\r\n" + b"".join(f + b"\r\n" for f in fields[:count]) + b"\r\n"


def field_of_size(size: int) -> bytes:
    """A ``name: value`` header field of exactly ``size`` bytes, CRLF not counted."""
    name = b"X-Big"
    return name + b": " + b"v" * (size - len(name) - 2)


def read_sized(stream: Stream) -> Response:
    """One response framed by a Content-Length, and nothing after it yet, on a
    connection that may stay open."""
    response = stream.response()
    assert response.header("content-length") is not None, f"no Content-Length: {response}"
    assert not stream.buf, "more bytes than the response's Content-Length"
    return response


def ok(server: Server, data: bytes) -> bytes:
    """Send one request that must succeed; the connection stays usable."""
    with server.connect() as sock:
        stream = Stream(sock)
        sock.sendall(data)
        response = read_sized(stream)
        assert response.status == 200, response.body
        sock.sendall(get("/still-open"))
        assert read_sized(stream).body == b"GET /still-open"
    return response.body


def rejected(server: Server, data: bytes, status: int) -> None:
    """``data`` gets ``status`` and a closed connection; then the same worker still serves."""
    pid = worker_pid(server)
    (response,) = exchange(server, data, half_close=False)
    assert response.status == status, response.body
    assert (response.header("connection") or "").lower() == "close"
    assert worker_pid(server) == pid


def trickle(server: Server, first: bytes, piece: bytes, limit_bytes: int) -> int:
    """Send ``first``, then ``piece`` after ``piece`` (never ending the head) until the
    server answers; return the status.  Fails if it has not answered well past
    ``limit_bytes``: the server must not buffer a head forever."""
    with server.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(first)
        sent = len(first)
        answer = b""
        while sent < 3 * limit_bytes + 65536:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            sock.settimeout(0.05)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            break
        assert answer, f"no answer after {sent} bytes of a head that never ends"
        answer += read_until_close(sock)
    return Stream.of(answer).head().status


# ---------------------------------------------------------------- request line


def test_request_line_at_the_default_limit_is_served(default_server):
    line = request_line(DEFAULT_LINE)
    assert ok(default_server, line + b"\r\nHost: test\r\n\r\n") == line[:-9]


def test_request_line_just_under_the_default_limit_is_served(default_server):
    for method in ("GET", "DELETE"):
        line = request_line(DEFAULT_LINE - 8, method)
        assert ok(default_server, line + b"\r\nHost: test\r\n\r\n").startswith(method.encode())


def test_request_line_over_the_default_limit_is_414(default_server):
    rejected(default_server, request_line(DEFAULT_LINE + 1) + b"\r\nHost: test\r\n\r\n", 414)
    rejected(default_server, request_line(3 * DEFAULT_LINE) + b"\r\nHost: test\r\n\r\n", 414)


def test_request_line_that_never_ends_is_414(default_server):
    assert trickle(default_server, b"GET /", b"a" * 500, DEFAULT_LINE) == 414


def test_request_line_limit_zero_means_unlimited(tmp_path, interface):
    server = start_http_server(interface, tmp_path, "--limit-request-line", "0")
    try:
        line = request_line(20000)
        # Sent in pieces, so that no single read holds the whole line.
        with server.connect() as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(line), 1000):
                sock.sendall(line[start:start + 1000])
                sock.settimeout(0.02)
                try:
                    early = sock.recv(65536)
                except TimeoutError:
                    continue
                raise AssertionError(f"answered before the request ended: {early[:200]!r}")
            sock.sendall(b"\r\nHost: test\r\n\r\n")
            response = read_sized(Stream(sock))
        assert response.status == 200, response.body
        assert response.body == line[:-9]
    finally:
        stop_server(server)


# ---------------------------------------------------------------- header fields


def test_default_field_count_limit(default_server):
    ok(default_server, with_fields(DEFAULT_FIELDS))
    rejected(default_server, with_fields(DEFAULT_FIELDS + 1), 431)


def test_default_field_size_limit(default_server):
    field = field_of_size(DEFAULT_FIELD_SIZE)
    ok(default_server, b"GET / HTTP/1.1\r\nHost: test\r\n" + field + b"\r\n\r\n")
    field = field_of_size(DEFAULT_FIELD_SIZE + 1)
    rejected(default_server, b"GET / HTTP/1.1\r\nHost: test\r\n" + field + b"\r\n\r\n", 431)


@pytest.mark.parametrize("before", [b"Host: test\r\n", b""], ids=["after-host", "first-field"])
def test_field_that_never_ends_is_431(default_server, before):
    pid = worker_pid(default_server)
    status = trickle(default_server, b"GET / HTTP/1.1\r\n" + before + b"X-Endless: ",
                     b"v" * 700, DEFAULT_FIELD_SIZE)
    assert status == 431
    assert worker_pid(default_server) == pid


def test_field_name_that_never_ends_is_431(default_server):
    status = trickle(default_server, b"GET / HTTP/1.1\r\nHost: test\r\nX-",
                     b"n" * 700, DEFAULT_FIELD_SIZE)
    assert status == 431


def test_many_small_trickled_fields_hit_the_field_count_limit(default_server):
    # Each piece completes a field: only the field count can stop this head.
    status = trickle(default_server, b"GET / HTTP/1.1\r\nHost: test\r\n",
                     b"X-Small: 1\r\n" * 10, DEFAULT_FIELDS)
    assert status == 431


# ---------------------------------------------------------------- custom limits


def test_custom_request_line_limit(custom_server):
    for method in ("GET", "DELETE"):
        ok(custom_server, request_line(LINE - 8, method) + b"\r\nHost: test\r\n\r\n")
    rejected(custom_server, request_line(LINE + 1) + b"\r\nHost: test\r\n\r\n", 414)
    assert trickle(custom_server, b"GET /", b"a" * 20, LINE) == 414


def test_custom_request_line_exactly_at_the_limit_is_served(custom_server):
    ok(custom_server, request_line(LINE) + b"\r\nHost: test\r\n\r\n")


def test_custom_field_count_limit(custom_server):
    ok(custom_server, with_fields(FIELDS))
    rejected(custom_server, with_fields(FIELDS + 1), 431)


def test_custom_field_size_limit(custom_server):
    ok(custom_server, b"GET / HTTP/1.1\r\nHost: test\r\n" + field_of_size(FIELD_SIZE) + b"\r\n\r\n")
    rejected(custom_server,
             b"GET / HTTP/1.1\r\nHost: test\r\n" + field_of_size(FIELD_SIZE + 1) + b"\r\n\r\n",
             431)
    assert trickle(custom_server, b"GET / HTTP/1.1\r\nHost: test\r\nX-Endless: ",
                   b"v" * 50, FIELD_SIZE) == 431


def test_custom_body_limit_content_length(custom_server):
    body = b"b" * BODY
    assert ok(custom_server, b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body)) == body
    # Too large: answered from the head alone, without waiting for the body.
    started = time.monotonic()
    rejected(custom_server,
             b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % (BODY + 1), 413)
    assert time.monotonic() - started < 3


def test_custom_body_limit_chunked(custom_server):
    head = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    small = b"400\r\n" + b"c" * 0x400 + b"\r\n"   # 1024 bytes: over the limit alone
    within = b"1f4\r\n" + b"c" * 500 + b"\r\n"
    assert ok(custom_server, head + within + within + b"0\r\n\r\n") == b"c" * 1000
    rejected(custom_server, head + small + b"0\r\n\r\n", 413)
    # Growing past the limit while it arrives, never finished by the client.
    pid = worker_pid(custom_server)
    with custom_server.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        answer = b""
        for _ in range(20):
            try:
                sock.sendall(b"c8\r\n" + b"c" * 200 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.05)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
        answer += read_until_close(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert worker_pid(custom_server) == pid


def test_large_chunked_body_over_the_limit_while_the_app_reads(tmp_path, interface):
    """Past the 256 KiB buffering threshold the app is already reading the body
    (WSGI: the blocking path; ASGI: awaiting receive()) when the limit is crossed:
    still a 413."""
    limit = 300000
    server = start_http_server(interface, tmp_path, "--limit-request-body", str(limit))
    try:
        body = bytes(range(256)) * (limit // 256)
        pieces = [body[i:i + 50000] for i in range(0, len(body), 50000)]
        with server.connect() as sock:
            sock.sendall(chunked_post("/echo-chunks", *pieces))
            response = read_sized(Stream(sock))
        assert response.status == 200 and response.body == body
        over = body + b"x" * 100000
        pieces = [over[i:i + 50000] for i in range(0, len(over), 50000)]
        pid = worker_pid(server)
        with server.connect() as sock:
            try:
                sock.sendall(chunked_post("/echo-chunks", *pieces))
            except (BrokenPipeError, ConnectionResetError):
                pass
            raw = read_until_close(sock)
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
        assert worker_pid(server) == pid
        # And a Content-Length over the limit is refused before the app runs.
        too_long = b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % (limit + 1)
        (response,) = exchange(server, too_long, half_close=False)
        assert response.status == 413
    finally:
        stop_server(server)


def test_env_variable_is_overridden_by_flag(tmp_path, interface):
    server = start_http_server(interface, tmp_path, "--limit-request-line", "4094",
                               env={"FASTPOOL_LIMIT_REQUEST_LINE": "100"})
    try:
        ok(server, request_line(1000) + b"\r\nHost: test\r\n\r\n")
        rejected(server, request_line(DEFAULT_LINE + 1) + b"\r\nHost: test\r\n\r\n", 414)
    finally:
        stop_server(server)

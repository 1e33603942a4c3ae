"""HTTP/1.1 behaviour of the worker, checked on the wire with raw sockets.

Keep-alive and its idle timeout, HTTP/1.0, pipelining, chunked request bodies,
``Expect: 100-continue``, ``Connection: close`` both ways, response framing
(chunked, close-delimited, HEAD, 204/304, wrong Content-Length), slowloris,
large bodies both ways, bad input and app errors.

Every test runs against both interfaces: ``--interface wsgi`` serving
``tests/apps_http.py`` and ``--interface asgi`` serving ``tests/apps_http_asgi.py``
(the same routes, the same bytes).  The few that are about WSGI only are
marked ``WSGI_ONLY``.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import pytest
from apps_http import pattern
from client import Stream, chunked_post, connect, get, post, worker_pid
from conftest import Server, start_http_server, stop_server

# ---------------------------------------------------------------- servers
# (the ``interface`` fixture, wsgi and asgi, is conftest's)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, interface: str) -> Iterator[Server]:
    """One worker, default settings; shared by the tests that need no flags."""
    srv = start_http_server(interface, tmp_path_factory.mktemp(f"http-{interface}"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def timeouts_server(tmp_path_factory: pytest.TempPathFactory,
                    interface: str) -> Iterator[Server]:
    """One worker with short keep-alive and header timeouts."""
    srv = start_http_server(interface, tmp_path_factory.mktemp(f"http-timeouts-{interface}"),
                            "--keep-alive", "1", "--header-timeout", "2")
    yield srv
    stop_server(srv)


WSGI_ONLY = pytest.mark.parametrize("interface", ["wsgi"], indirect=True)


# ---------------------------------------------------------------- keep-alive


def test_keep_alive_is_the_default(server):
    sock, stream = connect(server)
    with sock:
        for i in range(5):
            sock.sendall(get(f"/ka/{i}"))
            response = stream.response()
            assert response.status == 200
            assert response.body == f"GET /ka/{i}".encode()
            assert response.header("connection") is None
        stream.assert_open(0.2)


def test_idle_keep_alive_connection_is_closed_after_timeout(timeouts_server):
    sock, stream = connect(timeouts_server)
    with sock:
        # Requests spaced just under --keep-alive 1: each one restarts the idle clock,
        # so the connection outlives several keep-alive periods.
        for i in range(3):
            sock.sendall(get(f"/idle/{i}"))
            response = stream.response()
            assert (response.status, response.body) == (200, f"GET /idle/{i}".encode())
            if i < 2:
                stream.assert_open(0.5)
        idle_since = time.monotonic()
        stream.assert_closed(timeout=5.0)
        idle = time.monotonic() - idle_since
    assert 0.5 <= idle <= 3.5, f"idle connection closed after {idle:.2f}s with --keep-alive 1"


def test_http10_keep_alive_when_asked(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/one", "1.0", extra="Connection: keep-alive\r\n"))
        response = stream.response()
        assert (response.status, response.body) == (200, b"GET /one")
        assert response.header("connection").lower() == "keep-alive"
        assert response.header("content-length") == "8"
        stream.assert_open(0.2)
        sock.sendall(get("/two", "1.0", extra="Connection: keep-alive\r\n"))
        response = stream.response()
        assert (response.status, response.body) == (200, b"GET /two")
        assert response.header("connection").lower() == "keep-alive"
        # Without the header, the connection ends after the response.
        sock.sendall(get("/three", "1.0"))
        response = stream.response()
        assert (response.status, response.body) == (200, b"GET /three")
        stream.assert_closed()


def test_http10_without_keep_alive_is_closed(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/old", "1.0"))
        response = stream.response()
        assert (response.status, response.body) == (200, b"GET /old")
        assert (response.header("connection") or "close").lower() == "close"
        stream.assert_closed()


# ---------------------------------------------------------------- pipelining


def test_pipelined_requests_are_answered_in_order(server):
    paths = [f"/pipe/{i}?n={i}" for i in range(16)]
    sock, stream = connect(server)
    with sock:
        sock.sendall(b"".join(get(p) for p in paths))
        for path in paths:
            response = stream.response()
            assert (response.status, response.body) == (200, f"GET {path}".encode())
        stream.assert_open(0.2)
        sock.sendall(get("/after"))
        assert stream.response().body == b"GET /after"


def test_pipelined_mixed_framings_stay_in_step(server):
    """Responses of every framing, pipelined: any extra or missing byte breaks the next."""
    requests = [
        (get("/a"), "GET", b"GET /a"),
        (get("/stream?n=3"), "GET", b"part 0\npart 1\npart 2\n"),
        (get("/noread", method="HEAD"), "HEAD", b""),
        (get("/status/204"), "GET", b""),
        (get("/big?size=100000"), "GET", pattern(100000)),
        (get("/status/304"), "GET", b""),
        (get("/big?size=70000&chunked=1"), "GET", pattern(70000)),
        (get("/z"), "GET", b"GET /z"),
    ]
    sock, stream = connect(server)
    with sock:
        sock.sendall(b"".join(r for r, _, _ in requests))
        for _, method, body in requests:
            response = stream.response(method)
            assert response.body == body
        stream.assert_open(0.2)


def test_pipelined_posts_with_bodies(server):
    bodies = [b"", b"x", b"hello world", bytes(range(256)) * 40, b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
              pattern(100000)]
    data = b"".join(post("/echo", body) for body in bodies)
    data += chunked_post("/echo", b"chunked ", b"in the ", b"middle")
    data += post("/echo", b"last")
    sock, stream = connect(server)
    with sock:
        sock.sendall(data)
        for body in [*bodies, b"chunked in the middle", b"last"]:
            response = stream.response()
            assert response.status == 200
            assert response.body == body
        stream.assert_open(0.2)


# ---------------------------------------------------------------- request bodies


def test_chunked_request_body_is_dechunked(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(chunked_post("/echo", b"Hello", b", ", b"chunked ", b"world", b"!" * 300))
        response = stream.response()
        assert response.status == 200
        assert response.body == b"Hello, chunked world" + b"!" * 300
        # The app sees no Content-Length and the environ says chunked.
        sock.sendall(chunked_post("/env", b"abc"))
        response = stream.response()
        assert response.status == 200
        assert b'"CONTENT_LENGTH"' not in response.body
        assert b'"HTTP_TRANSFER_ENCODING": "chunked"' in response.body


def test_chunked_request_body_split_across_writes(server):
    body = (b"5\r\nHello\r\n"
            b"1a;ext=1\r\n" + b"abcdefghijklmnopqrstuvwxyz" + b"\r\n"
            b"3\r\n!!!\r\n0\r\n\r\n")
    head = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    # Cut everywhere: inside the head, inside size lines, data, CRLFs and the last chunk.
    data = head + body
    cuts = [10, len(head) - 1, len(head) + 1, len(head) + 4, len(head) + 9, len(head) + 12,
            len(head) + 25, len(head) + 44, len(data) - 3, len(data) - 1]
    sock, stream = connect(server)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = 0
        for cut in cuts:
            sock.sendall(data[start:cut])
            start = cut
            stream.assert_open(0.02)   # nothing is answered before the body ends
        sock.sendall(data[start:])
        response = stream.response()
        assert response.status == 200
        assert response.body == b"Hello" + b"abcdefghijklmnopqrstuvwxyz" + b"!!!"


def test_expect_100_continue_is_sent_when_the_app_reads(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 11\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = stream.response()
        assert interim.status == 100
        assert interim.version == b"HTTP/1.1"
        sock.sendall(b"hello world")
        response = stream.response()
        assert (response.status, response.body) == (200, b"hello world")
        # The connection is still good for the next request.
        sock.sendall(get("/next"))
        assert stream.response().body == b"GET /next"


ASGI_ONLY = pytest.mark.parametrize("interface", ["asgi"], indirect=True)


@ASGI_ONLY   # an ASGI app asks for the body with receive(); a WSGI app runs once it is in
def test_expect_100_continue_without_reading_gets_the_final_response(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(b"POST /noread HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        response = stream.response()
        assert response.status == 200, "no 100 Continue when the app never reads the body"
        assert response.body == b"ok"
        if (response.header("connection") or "").lower() == "close":
            stream.assert_closed()
        else:
            # Kept open: the unsent body must be read and discarded, not parsed.
            sock.sendall(b"12345" + get("/after"))
            assert stream.response().body == b"GET /after"


@WSGI_ONLY
def test_expect_100_continue_is_answered_before_a_wsgi_app_runs(server):
    """The WSGI app runs only once the body is in (wsgi.input never waits on the
    client), so the loop answers 100 Continue whatever the app will do."""
    sock, stream = connect(server)
    with sock:
        sock.sendall(b"POST /noread HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert stream.response().status == 100
        stream.assert_open(0.1)   # the app waits for the body
        sock.sendall(b"12345")
        response = stream.response()
        assert (response.status, response.body) == (200, b"ok")
        sock.sendall(get("/after"))
        assert stream.response().body == b"GET /after"


def test_no_100_continue_for_http_10(server):
    """RFC 9110 10.1.1: an HTTP/1.0 client's 100-continue is ignored."""
    sock, stream = connect(server)
    with sock:
        sock.sendall(b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        stream.assert_open(0.2)
        sock.sendall(b"hello")
        response = stream.response()
        assert (response.status, response.body) == (200, b"hello")


def test_large_request_body_is_echoed_intact(server):
    body = pattern(5 * 1024 * 1024)
    sock, stream = connect(server, timeout=30)
    with sock:
        sock.sendall(post("/echo", body))
        response = stream.response()
        assert response.status == 200
        assert len(response.body) == len(body)
        assert hashlib.sha256(response.body).digest() == hashlib.sha256(body).digest()
        stream.assert_open(0.1)


def test_large_chunked_request_body_read_in_pieces(server):
    body = pattern(3 * 1024 * 1024 + 17)
    pieces = [body[i:i + 100003] for i in range(0, len(body), 100003)]
    sock, stream = connect(server, timeout=30)
    with sock:
        sock.sendall(chunked_post("/echo-chunks", *pieces))
        response = stream.response()
        assert response.status == 200
        assert hashlib.sha256(response.body).digest() == hashlib.sha256(body).digest()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_response_read_slowly_arrives_intact(server, framing):
    size = 10 * 1024 * 1024
    query = "&chunked=1" if framing == "chunked" else ""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sock.settimeout(30)
    sock.connect((server.host, server.port))
    with sock:
        sock.sendall(get(f"/big?size={size}{query}"))
        stream = Stream(sock, 30)
        head = stream.head()
        assert head.status == 200
        # Read slowly: small reads with pauses, and one long stall in the middle.
        raw = bytearray(stream.buf)
        stream.buf.clear()
        started = time.monotonic()
        reads = 0
        expected_raw = size if framing == "content-length" else None
        while expected_raw is None or len(raw) < expected_raw:
            if framing == "chunked" and raw.endswith(b"\r\n0\r\n\r\n"):
                break
            data = sock.recv(16384)
            assert data, "connection closed before the whole body arrived"
            raw += data
            reads += 1
            if reads % 64 == 0:
                time.sleep(0.01)
            if reads == 100:
                time.sleep(1.0)   # the server must wait for a stalled reader, not drop it
        assert time.monotonic() - started < 25
        if framing == "content-length":
            assert head.header("content-length") == str(size)
            body = bytes(raw)
        else:
            assert head.header("transfer-encoding") == "chunked"
            stream.buf += raw
            parts = []
            while (length := int(stream.line(), 16)) != 0:
                parts.append(stream.exact(length))
                assert stream.exact(2) == b"\r\n"
            assert stream.line() == b""
            body = b"".join(parts)
        assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(size)).digest()


# ---------------------------------------------------------------- Connection: close


def test_request_connection_close_is_honoured(server):
    sock, stream = connect(server)
    with sock:
        # The second request follows the close on the same connection: never answered.
        sock.sendall(get("/bye", extra="Connection: close\r\n") + get("/ignored"))
        response = stream.response()
        assert (response.status, response.body) == (200, b"GET /bye")
        assert response.header("connection").lower() == "close"
        stream.assert_closed()


def test_app_connection_close_header_closes_after_the_response(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/close"))
        response = stream.response()
        assert (response.status, response.body) == (200, b"bye")
        assert [v.lower() for v in response.all("connection")] == ["close"]
        stream.assert_closed()


# ---------------------------------------------------------------- response framing


def test_streamed_response_is_chunked_on_http11(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/stream?n=4"))
        response = stream.response()
        assert response.status == 200
        assert response.header("transfer-encoding") == "chunked"
        assert response.header("content-length") is None
        assert response.body == b"part 0\npart 1\npart 2\npart 3\n"
        assert len(response.chunks) >= 1
        stream.assert_open(0.1)
        sock.sendall(get("/again"))
        assert stream.response().body == b"GET /again"


def test_streamed_response_is_close_delimited_on_http10(server):
    sock, stream = connect(server)
    with sock:
        # Even when HTTP/1.0 asks for keep-alive: without a length, only close ends the body.
        sock.sendall(get("/stream?n=3", "1.0", extra="Connection: keep-alive\r\n"))
        response = stream.head()
        assert response.status == 200
        assert response.header("content-length") is None
        assert response.header("transfer-encoding") is None
        assert (response.header("connection") or "close").lower() == "close"
        assert stream.until_eof() == b"part 0\npart 1\npart 2\n"


def test_head_has_the_get_headers_and_no_body(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/noread"))
        got = stream.response()
        # HEAD, then GET on the same connection: a leaked body would break the second parse.
        sock.sendall(get("/noread", method="HEAD") + get("/big?size=1000", method="HEAD")
                     + get("/after"))
        head = stream.response("HEAD")
        assert head.status == 200
        assert head.header("content-length") == got.header("content-length") == "2"
        big = stream.response("HEAD")
        assert big.status == 200
        assert big.header("content-length") == "1000"
        after = stream.response()
        assert after.body == b"GET /after"
        stream.assert_open(0.1)


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(server, status):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get(f"/status/{status}") + get("/next"))
        response = stream.head()
        assert response.status == status
        assert response.header("transfer-encoding") is None
        if status == 204:
            assert response.header("content-length") is None
        # The next bytes are the next response's status line, not a body.
        following = stream.response()
        assert (following.status, following.body) == (200, b"GET /next")


@WSGI_ONLY
def test_write_then_a_list_is_one_response_and_the_connection_goes_on(server):
    """PEP 3333's write() starts a chunked body; the list that follows ends it once."""
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/write-list") + get("/after"))
        response = stream.response()
        assert (response.status, response.body) == (200, b"one,two,three,four")
        assert stream.response().body == b"GET /after"
        stream.assert_open(0.1)


def test_an_apps_content_length_is_not_sent_with_204(server):
    """RFC 9110 8.6: no Content-Length in a 1xx or 204 response, whatever the app says."""
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/status/204?length=0") + get("/next"))
        response = stream.head()
        assert response.status == 204
        assert response.header("content-length") is None
        assert stream.response().body == b"GET /next"


def test_app_yielding_more_than_content_length_is_cut_and_closed(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/overlong"))
        response = stream.response()
        assert response.status == 200
        assert response.header("content-length") == "5"
        assert response.body == b"01234"
        stream.assert_closed()   # and no stray bytes before the close


def test_app_yielding_less_than_content_length_closes(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/short"))
        response = stream.head()
        assert response.status == 200
        assert response.header("content-length") == "10"
        assert stream.until_eof() == b"01234"
        assert stream.eof, "the connection must be closed when the body falls short"


# ---------------------------------------------------------------- slowloris


def test_slowloris_is_cut_off_while_the_worker_serves_others(timeouts_server):
    server = timeouts_server
    request = get("/slow", extra="X-Slow: yes\r\n")
    slow = server.connect(timeout=10)
    slow.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.monotonic()
    closed_after = None
    answer = b""
    latencies = []
    with slow:
        for i in range(len(request)):
            try:
                slow.sendall(request[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
            # Another client of the same (only) worker is served at once.
            began = time.monotonic()
            sock, stream = connect(server, timeout=5)
            with sock:
                sock.sendall(get(f"/other/{i}", extra="Connection: close\r\n"))
                response = stream.response()
            latencies.append(time.monotonic() - began)
            assert (response.status, response.body) == (200, f"GET /other/{i}".encode())
            # Wait up to 0.5 s for the server to give up on the slow client.
            slow.settimeout(0.5)
            try:
                data = slow.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            answer += data
            if not data:
                closed_after = time.monotonic() - start
                break
            slow.settimeout(5)
            answer += Stream(slow).until_eof()
            closed_after = time.monotonic() - start
            break
    assert closed_after is not None, "a client trickling its head was never disconnected"
    assert 1.5 <= closed_after <= 4.5, f"disconnected after {closed_after:.2f}s, timeout 2s"
    assert not answer or answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert max(latencies) < 1.0, f"other clients waited up to {max(latencies):.2f}s"


# ---------------------------------------------------------------- bad input


BAD_REQUESTS = [
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="garbage"),
    pytest.param(b"\x00\x01\x02\x03\xff\xfe\r\n\r\n", 400, id="binary"),
    pytest.param(b"GET\r\n\r\n", 400, id="method-only"),
    pytest.param(b"GET / HTTP/1.1 extra\r\n\r\n", 400, id="extra-token-in-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, id="space-in-header-name"),
    pytest.param(b"GET / HTTP/1.1\r\nBad(: x\r\n\r\n", 400, id="separator-in-header-name"),
    pytest.param(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400, id="header-without-colon"),
    pytest.param(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                 400, id="conflicting-content-lengths"),
    pytest.param(b"POST /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400,
                 id="non-numeric-content-length"),
    pytest.param(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n", 400, id="content-length-and-transfer-encoding"),
    pytest.param(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
                 400, id="bad-chunk-size"),
    # chunked not the final coding: the length cannot be known (RFC 9112 6.3)
    pytest.param(b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
                 id="transfer-encoding-gzip"),
    # chunked last, but a coding fastpool does not decode (RFC 9112 6.1)
    pytest.param(b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 b"0\r\n\r\n", 501, id="transfer-encoding-gzip-chunked"),
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501,
                 id="connect"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: test\r\n\r\n", 400, id="method-not-a-token"),
    pytest.param(b"GET / HTTP/1.2\r\nHost: test\r\n\r\n", 505, id="http-1.2"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: test\r\n\r\n", 505, id="http-2.0"),
    pytest.param(b"GET / HTTP/3.0\r\nHost: test\r\n\r\n", 505, id="http-3.0"),
    pytest.param(b"GET / HTTP/0.9\r\n\r\n", 505, id="http-0.9"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, id="http2-preface"),
]


@pytest.mark.parametrize(("data", "status"), BAD_REQUESTS)
def test_bad_request_gets_a_status_and_is_closed(server, data, status):
    sock, stream = connect(server)
    with sock:
        sock.sendall(data)   # no half-close: the server itself must end the connection
        response = stream.response()
        assert response.status == status, response.body
        assert response.header("connection").lower() == "close"
        stream.assert_closed()


def test_any_method_token_reaches_the_app(server):
    """RFC 9110 9.1: a method is a token; llhttp's list of methods is not the limit."""
    methods = ["QUERY", "PURGE", "get", "-BLARGH", "X_Y.Z~1", "M" * 40]
    sock, stream = connect(server)
    with sock:
        # Pipelined (read boundaries inside a method are replayed by test_corpus.py).
        sock.sendall(b"".join(get(f"/m/{i}", method=method) for i, method in enumerate(methods)))
        for i, method in enumerate(methods):
            response = stream.response()
            assert (response.status, response.body) == (200, f"{method} /m/{i}".encode())
        stream.assert_open(0.1)


@pytest.mark.parametrize(("garbage", "status"), [
    (b"\x00\x01\x02 junk\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/3.0\r\n\r\n", 505),
])
def test_requests_before_bad_input_are_answered_first(server, garbage, status):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/first") + get("/second") + garbage)
        assert stream.response().body == b"GET /first"
        assert stream.response().body == b"GET /second"
        response = stream.response()
        assert response.status == status, response.body
        stream.assert_closed()


@WSGI_ONLY   # an ASGI worker upgrades to WebSocket (test_asgi_websocket.py)
@pytest.mark.parametrize("before", [b"", get("/first")], ids=["alone", "pipelined"])
def test_upgrade_request_is_answered_then_closed(server, before):
    """The WSGI worker speaks no other protocol: it answers the request as plain HTTP
    and closes (the bytes after the head belong to the other protocol)."""
    pid = worker_pid(server)
    sock, stream = connect(server)
    with sock:
        sock.sendall(before + b"GET /up HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n\x81\x05hello")
        if before:
            assert stream.response().body == b"GET /first"
        response = stream.response()
        assert (response.status, response.body) == (200, b"GET /up")
        assert response.header("connection").lower() == "close"
        stream.assert_closed()
    assert worker_pid(server) == pid


# ---------------------------------------------------------------- app errors


@pytest.mark.parametrize("path", ["/raise", "/nonbytes"])
def test_app_error_is_a_500_and_the_worker_survives(server, path):
    pid = worker_pid(server)
    sock, stream = connect(server)
    with sock:
        sock.sendall(get(path))
        response = stream.response()
        assert response.status == 500
        assert b"boom" not in response.body and b"Traceback" not in response.body
        assert response.header("connection").lower() == "close"
        stream.assert_closed()
    assert worker_pid(server) == pid


def test_app_error_mid_stream_closes_and_the_worker_survives(server):
    pid = worker_pid(server)
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/raise-stream"))
        response = stream.head()
        assert response.status == 200
        rest = stream.until_eof()
        assert stream.eof
        assert b"first part\n" in rest
        # The chunked body was never terminated: the client can tell it is incomplete.
        assert not rest.endswith(b"0\r\n\r\n")
    assert worker_pid(server) == pid


def test_worker_keeps_serving_during_and_after_errors(server):
    """Errors on one connection do not disturb a keep-alive connection next to it."""
    pid = worker_pid(server)
    keep, keep_stream = connect(server)
    with keep:
        keep.sendall(get("/before"))
        assert keep_stream.response().body == b"GET /before"
        errors = []
        for data in (get("/raise"), b"GARBAGE\r\n\r\n", get("/raise-stream")):
            sock, stream = connect(server)
            with sock:
                sock.sendall(data)
                errors.append(stream.head().status)
        assert errors == [500, 400, 200]
        keep.sendall(get("/after"))
        assert keep_stream.response().body == b"GET /after"
    assert worker_pid(server) == pid

"""PEP 3333 behaviour of the compiled worker, against the real ``fastpool serve``.

One single-worker server (``apps_wsgi:main``) is shared by the module; its
routes are wrapped in ``wsgiref.validate.validator`` except where a test needs
what the validator forbids (see apps_wsgi.py).  Being a single worker matters:
``/closed`` reports the ``close()`` calls of the same process that served the
earlier requests.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import struct
import uuid
from urllib.parse import quote

import apps_wsgi
import pytest
from client import chunked, exchange, fetch, fetch_json, parse_responses, raw_request
from conftest import Server, start_server, stop_server, wait_for

# ---------------------------------------------------------------- helpers


def build(method: str, target: str, body: bytes | None = None, *,
          chunks: list[bytes] | None = None, headers: list[tuple[str, str]] = (),
          close: bool = True, version: str = "HTTP/1.1") -> bytes:
    """One raw request; ``chunks`` sends the body with chunked transfer coding."""
    lines = [f"{method} {target} {version}", "Host: test.local"]
    lines += [f"{k}: {v}" for k, v in headers]
    if chunks is not None:
        lines.append("Transfer-Encoding: chunked")
        payload = chunked(*chunks)
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    else:
        payload = b""
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def closed_tags(server: Server) -> list[str]:
    return fetch_json(server, "/closed")


def closed_with(server: Server, tag: str) -> list[str]:
    """The CLOSED records of ``tag`` (waits until there is at least one)."""
    return wait_for(lambda: [t for t in closed_tags(server) if t.startswith(tag + ":")],
                    timeout=10, what=f"close() of {tag}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server("apps_wsgi:main", tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv, signal.SIGQUIT)


@pytest.fixture(scope="module")
def flask_server(tmp_path_factory):
    srv = start_server("apps_wsgi_flask:app", tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv, signal.SIGQUIT)


# ---------------------------------------------------------------- environ


def test_environ_request_keys(server):
    body = b"name=value&x=1"
    with server.connect() as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(build("POST", "/environ/item?a=1&b=%20", body,
                           headers=[("Content-Type", "application/x-www-form-urlencoded"),
                                    ("User-Agent", "env-test/1")]))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    (response,) = parse_responses(data)
    assert response.status == 200
    env = response.json()
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/environ/item"
    assert env["RAW_URI"] == "/environ/item?a=1&b=%20"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert env["CONTENT_LENGTH"] == str(len(body))
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["body"] == body.decode()
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(server.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["HTTP_HOST"] == "test.local"
    assert env["HTTP_USER_AGENT"] == "env-test/1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == str(client_port)
    for key in ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
                "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "HTTP_HOST"):
        assert env["types"][key] == "str", key


def test_environ_http_10_protocol(server):
    (response,) = exchange(server, build("GET", "/environ/old", version="HTTP/1.0",
                                         close=False))
    assert response.status == 200
    assert response.json()["SERVER_PROTOCOL"] == "HTTP/1.0"


def test_environ_wsgi_keys(server):
    marker = f"wsgi-errors-marker-{uuid.uuid4().hex}"
    env = fetch_json(server, f"/environ?errors={marker}")
    assert env["wsgi.version"] == [1, 0]
    assert env["types"]["wsgi.version"] == "tuple"
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.input_terminated"] is True
    assert env["wsgi.multithread"] is False
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert env["file_wrapper_callable"] is True
    assert "wsgi.input" in env["types"] and "wsgi.errors" in env["types"]
    # What the app wrote to wsgi.errors reaches the server's error output.
    wait_for(lambda: marker in server.log, timeout=10, what="the wsgi.errors line in the log")


def test_path_info_is_percent_decoded_as_latin1(server):
    env = fetch_json(server, "/caf%C3%A9/x%20y?q=%C3%A9")
    assert env["PATH_INFO"] == "/caf\xc3\xa9/x y"
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café/x y"
    assert env["RAW_URI"] == "/caf%C3%A9/x%20y?q=%C3%A9"
    assert env["QUERY_STRING"] == "q=%C3%A9"


def test_repeated_headers_are_joined(server):
    (response,) = exchange(server, build("GET", "/environ", headers=[
        ("X-Multi", "first"), ("Accept", "text/plain"), ("X-Multi", "second"),
        ("x-multi", "third")]))
    env = response.json()
    assert env["HTTP_X_MULTI"] == "first, second, third"
    assert env["HTTP_ACCEPT"] == "text/plain"


def test_header_names_with_underscore_are_dropped(server):
    (response,) = exchange(server, build("GET", "/environ", headers=[
        ("X-Auth_User", "mallory"), ("X_Forwarded_For", "6.6.6.6"), ("X-Auth-Kind", "ok")]))
    env = response.json()
    assert env["HTTP_X_AUTH_KIND"] == "ok"
    assert "HTTP_X_AUTH_USER" not in env
    assert "HTTP_X_FORWARDED_FOR" not in env
    assert "mallory" not in json.dumps(env) and "6.6.6.6" not in json.dumps(env)


def test_script_name_from_root_path(serve):
    server = serve("apps_wsgi:main", "--root-path", "/api")
    env = fetch_json(server, "/api/x/y?z=1")
    assert env["SCRIPT_NAME"] == "/api"
    assert env["PATH_INFO"] == "/x/y"
    assert env["RAW_URI"] == "/api/x/y?z=1"
    assert env["QUERY_STRING"] == "z=1"
    env = fetch_json(server, "/api")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/api", "")
    # The routes of the app work under the prefix.
    status, _, body = fetch(server, "/api/hello")
    assert (status, body) == (200, b"Hello, WSGI!\n")


# ---------------------------------------------------------------- wsgi.input

BODY = b"abcdef\nsecond line\nthird\nfourth\nfifth-no-newline"
# Chunk boundaries fall inside lines and next to newlines.
CHUNKS = [b"ab", b"cdef\nsec", b"ond line\n", b"third\nfo", b"u", b"rth\nfifth-no-newline"]
assert b"".join(CHUNKS) == BODY

INPUT_CASES = {
    "mixed": ("input", "read:3,readline,readline:4,readline,readlines,read:10,readline",
              ["abc", "def\n", "seco", "nd line\n", ["third\n", "fourth\n", "fifth-no-newline"],
               "", ""]),
    "readline-limits": ("input", "readline:1,readline:100,readline:6,readline:6,readline",
                        ["a", "bcdef\n", "second", " line\n", "third\n"]),
    # The validator's own __iter__ calls readline(): iterate the server's object.
    "iter": ("input-raw", "iter,readline",
             [["abcdef\n", "second line\n", "third\n", "fourth\n", "fifth-no-newline"], ""]),
    "pieces": ("input", "pieces:5",
               [[BODY[i:i + 5].decode() for i in range(0, len(BODY), 5)]]),
    "readlines-hint": ("input", "readlines:8,readline,readlines:1,read:1000",
                       [["abcdef\n", "second line\n"], "third\n", ["fourth\n"],
                        "fifth-no-newline"]),
    "read-more-than-body": ("input", "read:1000,read:1", [BODY.decode(), ""]),
    "read-all": ("input-raw", "readline,readall,readall,read:4",
                 ["abcdef\n", BODY[7:].decode(), "", ""]),
}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_wsgi_input(server, case, framing):
    route, ops, expected = INPUT_CASES[case]
    target = f"/{route}?ops={ops}"
    if framing == "chunked":
        request = build("POST", target, chunks=CHUNKS)
    else:
        request = build("POST", target, BODY)
    (response,) = exchange(server, request)
    assert response.status == 200, response.body
    assert response.json() == expected


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_wsgi_input_large_body(server, framing):
    """Bodies larger than the worker's buffer are read from the socket while the app runs."""
    line = b"0123456789" * 9 + b"abcdefghi\n"   # 100 bytes
    body = line * 12_000 + b"tail"              # ~1.2 MB
    expected_digest = [len(body), hashlib.sha256(body).hexdigest()]
    for route, ops, expected in (
            ("input", "digest:65536", expected_digest),
            ("input", "digest:1000", expected_digest),
            ("input", "iterdigest", [len(body), 12_001, expected_digest[1]]),
            ("input-raw", "iterdigest", [len(body), 12_001, expected_digest[1]])):
        if framing == "chunked":
            pieces = [body[i:i + 70_000] for i in range(0, len(body), 70_000)]
            request = build("POST", f"/{route}?ops={ops}", chunks=pieces)
        else:
            request = build("POST", f"/{route}?ops={ops}", body)
        (response,) = exchange(server, request, timeout=20)
        assert response.status == 200, response.body
        assert response.json() == [expected], ops


PIPELINE_READS = {
    "read-n": ("input", "readline,read:1000,readline,read:1000", ["hello\n", "world", "", ""]),
    "read-all": ("input-raw", "readall,readall,readline", ["hello\nworld", "", ""]),
    "iter": ("input-raw", "iter,readlines", [["hello\n", "world"], []]),
}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("reads", list(PIPELINE_READS))
def test_wsgi_input_never_reads_past_the_body(server, framing, reads):
    """A pipelined request right behind the body is not eaten by greedy reads."""
    route, ops, expected = PIPELINE_READS[reads]
    target = f"/{route}?ops={ops}"
    if framing == "chunked":
        first = build("POST", target, chunks=[b"hel", b"lo\nwor", b"ld"], close=False)
    else:
        first = build("POST", target, b"hello\nworld", close=False)
    second = build("POST", "/input-raw?ops=readall", b"second-body\nmore")
    first_response, second_response = exchange(server, first + second)
    assert first_response.status == 200
    assert first_response.json() == expected
    assert second_response.status == 200
    assert second_response.json() == ["second-body\nmore"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_wsgi_input_large_body_then_pipelined_request(server, framing):
    """The body is read from the socket while the app runs; the next request's
    bytes, read in the same recv, still make a request of their own."""
    body = os.urandom(700_000)
    target = "/input?ops=digest:50000"
    if framing == "chunked":
        first = build("POST", target, chunks=[body[:400_000], body[400_000:]], close=False)
    else:
        first = build("POST", target, body, close=False)
    second = build("POST", "/input-raw?ops=readall", b"right behind")
    first_response, second_response = exchange(server, first + second, timeout=20)
    assert first_response.status == 200
    assert first_response.json() == [[len(body), hashlib.sha256(body).hexdigest()]]
    assert second_response.status == 200
    assert second_response.json() == ["right behind"]


def test_unread_body_does_not_leak_into_next_request(server):
    first = build("POST", "/hello", b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", close=False)
    second = build("GET", "/input?ops=read:100")
    responses = exchange(server, first + second)
    assert [r.status for r in responses] == [200, 200]
    assert responses[0].body == b"Hello, WSGI!\n"
    assert responses[1].json() == [""]


# ---------------------------------------------------------------- start_response


def test_exc_info_before_body_replaces_the_response(server):
    status, headers, body = fetch(server, "/exc-before-body")
    assert status == 503
    assert body == b"replacement body"
    assert headers["X-Replaced"] == "yes"
    assert headers["X-Original"] is None


def test_exc_info_after_body_reraises_and_closes(server):
    data = raw_request(server, build("GET", "/exc-after-body", close=False))
    (response,) = parse_responses(data)
    assert response.status == 200
    assert response.body.startswith(b"partial body;")
    assert b"must never be sent" not in data
    # The response cannot be finished honestly: it is cut off, and the
    # connection closed (raw_request returned, so the server closed it).
    assert not response.complete
    # The original exception propagated out of start_response into the log.
    wait_for(lambda: "boom-after-body original" in server.log, timeout=10,
             what="the re-raised exception in the log")


def test_start_response_twice_without_exc_info_is_500(server):
    data = raw_request(server, build("GET", "/start-twice"))
    (response,) = parse_responses(data)
    assert response.status == 500
    assert b"must never be sent" not in data
    assert b"201" not in data.split(b"\r\n", 1)[0]


def test_write_callable_mixes_with_returned_iterable(server):
    status, _, body = fetch(server, "/write-mix")
    assert (status, body) == (200, b"one,two,three,four")
    status, _, body = fetch(server, "/write-only")
    assert (status, body) == (200, b"alpha;beta;gamma")


def test_write_callable_keeps_the_connection_usable(server):
    responses = exchange(server, build("GET", "/write-mix", close=False)
                         + build("GET", "/write-only"))
    assert [(r.status, r.body, r.complete) for r in responses] == [
        (200, b"one,two,three,four", True), (200, b"alpha;beta;gamma", True)]


# ---------------------------------------------------------------- close()


def test_close_called_after_success(server):
    tag = uuid.uuid4().hex
    status, _, body = fetch(server, f"/close-ok?tag={tag}")
    assert (status, body) == (200, b"first;second")
    assert closed_with(server, tag) == [f"{tag}:2"]


def test_close_called_after_error_before_first_item(server):
    tag = uuid.uuid4().hex
    status, _, body = fetch(server, f"/close-error-early?tag={tag}")
    assert status == 500
    assert b"never" not in body
    assert closed_with(server, tag) == [f"{tag}:0"]


def test_close_called_after_error_mid_iteration(server):
    tag = uuid.uuid4().hex
    data = raw_request(server, build("GET", f"/close-error-late?tag={tag}", close=False))
    (response,) = parse_responses(data)
    assert response.status == 200
    assert response.body == b"first part;"
    assert not response.complete
    assert closed_with(server, tag) == [f"{tag}:1"]


def test_close_called_after_client_disconnect_mid_stream(server):
    tag = uuid.uuid4().hex
    with server.connect() as sock:
        sock.sendall(build("GET", f"/stream-forever?tag={tag}", close=False))
        received = 0
        while received < 2 << 20:
            chunk = sock.recv(65536)
            assert chunk, "server closed the stream early"
            received += len(chunk)
        # Hang up with unread data: the peer gets a reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    (record,) = closed_with(server, tag)
    produced = int(record.split(":")[1])
    assert produced < apps_wsgi.STREAM_CHUNKS, "the app was iterated to the end"
    # The worker is still serving.
    assert fetch(server, "/hello")[0] == 200


# ---------------------------------------------------------------- header validation


@pytest.mark.parametrize("kind", list(apps_wsgi.BAD_HEADERS))
def test_invalid_response_header_is_500_and_never_sent(server, kind):
    data = raw_request(server, build("GET", f"/bad-header?kind={kind}"))
    (response,) = parse_responses(data)
    assert response.status == 500
    assert b"X-Bad" not in data
    assert b"X Bad" not in data
    assert b"Injected" not in data
    assert b"X-Good" not in data
    assert b"must never be sent" not in data


# ---------------------------------------------------------------- wsgi.file_wrapper


def test_file_wrapper_with_a_real_file(server, tmp_path):
    data = os.urandom(2_500_000)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    tag = uuid.uuid4().hex
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        for _ in range(2):   # the framing is right: the connection stays usable
            conn.request("GET", f"/file?tag={tag}&path={quote(str(path))}")
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Length") == str(len(data))
            assert response.getheader("Transfer-Encoding") is None
            assert response.read() == data
    finally:
        conn.close()
    assert closed_with(server, tag) == [f"{tag}:file", f"{tag}:file"]


def test_file_wrapper_starts_at_the_file_position(server, tmp_path):
    data = os.urandom(100_000)
    path = tmp_path / "offset.bin"
    path.write_bytes(data)
    status, headers, body = fetch(server, f"/file?offset=1234&path={quote(str(path))}")
    assert status == 200
    assert headers["Content-Length"] == str(len(data) - 1234)
    assert body == data[1234:]


def test_file_wrapper_with_an_empty_file(server, tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    status, headers, body = fetch(server, f"/file?path={quote(str(path))}")
    assert (status, headers["Content-Length"], body) == (200, "0", b"")


def test_file_wrapper_without_fileno_falls_back_to_iteration(server):
    size = 300_001
    tag = uuid.uuid4().hex
    status, _, body = fetch(server, f"/file-bytesio?size={size}&tag={tag}")
    assert status == 200
    assert body == apps_wsgi.pattern(size)
    assert closed_with(server, tag) == [f"{tag}:bytesio"]


# ---------------------------------------------------------------- Flask


def test_flask_app(flask_server):
    server = flask_server
    status, headers, body = fetch(server, "/")
    assert (status, body) == (200, b"flask index")
    assert headers["Content-Type"].startswith("text/html")

    status, headers, body = fetch(server, "/items/12?colour=blue")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"id": 12, "square": 144, "args": {"colour": "blue"}}

    status, _, body = fetch(server, "/form", method="POST",
                            body=b"name=J%C3%BCrgen+M&tag=a&tag=b",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert json.loads(body) == {"name": "Jürgen M", "tags": ["a", "b"], "path": "/form",
                                "script_root": ""}

    payload = json.dumps({"k": [1, 2, 3]}).encode()
    status, _, body = fetch(server, "/json", method="POST", body=payload,
                            headers={"Content-Type": "application/json"})
    assert status == 201
    assert json.loads(body) == {"received": {"k": [1, 2, 3]}, "length": len(payload)}

    status, _, body = fetch(server, "/no/such/page")
    assert status == 404
    assert b"Not Found" in body

    status, _, body = fetch(server, "/form")   # GET on a POST-only route
    assert status == 405

    status, _, body = fetch(server, "/abort")
    assert status == 500
    assert b"Internal Server Error" in body


def test_flask_app_keep_alive(flask_server):
    conn = http.client.HTTPConnection(flask_server.host, flask_server.port, timeout=10)
    try:
        for item_id in range(5):
            conn.request("GET", f"/items/{item_id}")
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["square"] == item_id * item_id
    finally:
        conn.close()


# ---------------------------------------------------------------- last: the validator's view


def test_validator_saw_every_iterable_closed(server):
    """wsgiref's validator complains on stderr when an iterable is dropped unclosed."""
    assert fetch(server, "/hello")[0] == 200
    assert "garbage collected without being closed" not in server.log

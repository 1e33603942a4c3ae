"""The ASGI worker (HTTP and lifespan), against the real ``fastpool serve``.

One single-worker server of ``apps_asgi:app`` (plain ASGI 3, no framework) is
shared by the module, started with no ``--interface``, ``--loop`` or
``--lifespan`` flag, so it also checks the defaults (auto, auto, auto); a
second one serves the Starlette app (``apps_asgi_starlette:app``).  Tests that
need other flags, signals or a failing app start their own.  Facts the wire
does not show (lifespan events, what ``receive()`` returned) are files the app
writes in the server's working directory.  WebSocket: test_asgi_websocket.py;
HTTP framing and limits for both interfaces: test_http.py and test_limits.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apps_asgi
import pytest
from client import (
    Stream,
    chunked_post,
    connect,
    fetch,
    fetch_json,
    get,
    post,
    worker_pid,
)
from clusters import fastpool, group, ports, render
from conftest import (
    TESTS,
    Server,
    record,
    start_server,
    stop_server,
    wait_exit,
    wait_for,
)

# ---------------------------------------------------------------- servers
# (``starlette_server``, apps_asgi_starlette:app, is conftest's)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``apps_asgi:app``, one worker, every ASGI setting at its default."""
    srv = start_server("apps_asgi:app", tmp_path_factory.mktemp("asgi"))
    yield srv
    stop_server(srv)


# ---------------------------------------------------------------- helpers


def workdir(server: Server) -> Path:
    """The server's working directory, where the apps write their records."""
    return server.log_path.parent


def b(text: str) -> dict[str, str]:
    """How apps_asgi.jsonable shows a bytes value."""
    return {"bytes": text}


# ---------------------------------------------------------------- interface, loop, flags


def test_coroutine_function_is_served_as_asgi_by_default(server):
    # The module's server has no --interface flag: auto-detection made it ASGI.
    scope = fetch_json(server, "/scope")
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"


def test_object_with_an_async_call_is_served_as_asgi(serve):
    server = serve("apps_asgi:instance_app")
    assert fetch_json(server, "/anything") == {
        "app": "instance", "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}


def test_wsgi_app_with_interface_auto_is_served_as_wsgi(serve):
    server = serve("apps_asgi:wsgi_app", "--interface", "auto")
    assert fetch_json(server, "/") == {"app": "wsgi", "SERVER_PROTOCOL": "HTTP/1.1"}


def test_asgi2_class_is_wrapped_with_interface_asgi(serve):
    server = serve("apps_asgi:ASGI2App", "--interface", "asgi", "--lifespan", "off")
    assert fetch_json(server, "/two", method="POST", body=b"hi") == {
        "app": "asgi2", "path": "/two", "body": "hi"}
    # A new instance per request: the second one sees its own scope.
    assert fetch_json(server, "/three")["path"] == "/three"


def test_interface_wsgi_with_an_async_app_is_a_startup_error(serve):
    server = serve("apps_asgi:app", "--interface", "wsgi", wait=False)
    code, _ = wait_exit(server, 15)
    log = server.log
    assert code != 0, log
    naming = [line for line in log.splitlines() if re.search(r"(?i)asgi|async|coroutine", line)]
    assert len(naming) == 1, f"expected one line saying the app is async:\n{log}"
    assert "Traceback" not in log, log


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--interface", "cgi", ("auto", "wsgi", "asgi")),
    ("--loop", "tokio", ("auto", "asyncio", "uvloop")),
    ("--lifespan", "maybe", ("auto", "on", "off")),
    ("--ws-max-size", "big", ("integer",)),
    ("--ws-ping-interval", "often", ("number",)),
    ("--ws-ping-timeout", "soon", ("number",)),
])
def test_bad_asgi_setting_is_an_operator_error(tmp_path, flag, value, expected):
    result = fastpool("serve", "apps_asgi:app", flag, value, "--port", "0", cwd=tmp_path,
                      timeout=20)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {flag}"), result.stderr
    assert value in lines[0] and all(word in lines[0] for word in expected), result.stderr


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_loop_flag_picks_the_event_loop(serve, loop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    server = serve("apps_asgi:app", "--loop", loop)
    status, _, body = fetch(server, "/loop")
    assert status == 200, body
    module = body.decode().split(".")[0]
    assert module == loop, f"--loop {loop} runs {body.decode()}"
    assert fetch(server, "/sleep?s=0.01").body == b"slept 0.01"


def test_loop_auto_is_uvloop_when_installed(server):
    pytest.importorskip("uvloop")
    status, _, body = fetch(server, "/loop")
    assert status == 200
    assert body.startswith(b"uvloop."), body


@pytest.fixture
def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails as if it were not installed."""
    hide = tmp_path / "hide-uvloop"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n\n\n"
        "class HideUvloop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'uvloop':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
        "sys.meta_path.insert(0, HideUvloop())\n")
    path = os.pathsep.join([str(hide), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path.rstrip(os.pathsep)}


def test_loop_uvloop_without_uvloop_is_an_error(serve, without_uvloop):
    server = serve("apps_asgi:app", "--loop", "uvloop", wait=False, env=without_uvloop)
    code, _ = wait_exit(server, 15)
    assert code != 0, server.log
    assert any("uvloop" in line for line in server.log.splitlines()), server.log
    assert "Traceback" not in server.log, server.log


def test_loop_auto_without_uvloop_is_asyncio(serve, without_uvloop):
    server = serve("apps_asgi:app", wait=True, env=without_uvloop)
    status, _, body = fetch(server, "/loop")
    assert status == 200
    assert body.startswith(b"asyncio."), body


def test_version_still_reports_the_compiled_core(tmp_path):
    result = fastpool("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "compiled core: yes" in result.stdout
    imported = subprocess.run([sys.executable, "-c", "import fastpool._asgi"],
                              capture_output=True, text=True, timeout=30)
    assert imported.returncode == 0, imported.stderr


def test_interface_per_group_in_a_config_file(clusters):
    chosen = ports("sync", "async")
    text = render(groups={
        "sync": group(chosen["sync"], app="apps_asgi:wsgi_app", interface="wsgi"),
        "async": group(chosen["async"], app="apps_asgi:app", interface="asgi"),
    })
    cluster = clusters.start(text, workers=2, ports=chosen)
    for name, port in chosen.items():
        status, _, raw = fetch(port, "/scope")
        body = json.loads(raw)
        assert status == 200, (name, body, cluster.log)
        if name == "sync":
            assert body == {"app": "wsgi", "SERVER_PROTOCOL": "HTTP/1.1"}
        else:
            assert body["type"] == "http" and body["server"][1] == port


# ---------------------------------------------------------------- the http scope


def test_http_scope(server):
    target = "/scope/caf%C3%A9/a%2Fb%20c?x=%20y&z=1"
    sock, stream = connect(server)
    with sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: test\r\nX-First: 1\r\n"
                     "X-Second: Two Words\r\nx-first: again\r\n\r\n".encode("latin-1"))
        response = stream.response()
        client_port = sock.getsockname()[1]
    assert response.status == 200, response.body
    scope = json.loads(response.body)
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/scope/café/a/b c"
    assert scope["raw_path"] == b("/scope/caf%C3%A9/a%2Fb%20c")
    assert scope["query_string"] == b("x=%20y&z=1")
    assert scope["root_path"] == ""
    assert scope["headers"] == [[b("host"), b("test")], [b("x-first"), b("1")],
                                [b("x-second"), b("Two Words")], [b("x-first"), b("again")]]
    assert scope["client"] == ["127.0.0.1", client_port]
    assert scope["server"] == ["127.0.0.1", server.port]
    assert scope["state"] == {"answer": 42, "started_by": worker_pid(server)}


@pytest.mark.parametrize(("method", "version"), [
    ("GET", "1.0"), ("POST", "1.1"), ("DELETE", "1.1"), ("OPTIONS", "1.0")])
def test_http_scope_method_and_version(server, method, version):
    sock, stream = connect(server)
    with sock:
        sock.sendall(f"{method} /scope HTTP/{version}\r\nHost: test\r\nContent-Length: 0\r\n"
                     "Connection: close\r\n\r\n".encode())
        response = stream.response()
    assert response.status == 200, response.body
    scope = json.loads(response.body)
    assert (scope["method"], scope["http_version"]) == (method, version)
    assert scope["query_string"] == b("")


def test_root_path_is_reported_and_path_keeps_the_prefix(serve):
    server = serve("apps_asgi:app", "--root-path", "/api")
    scope = fetch_json(server, "/api/scope/x?q=1")
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/scope/x"
    assert scope["raw_path"] == b("/api/scope/x")
    assert scope["query_string"] == b("q=1")


def test_state_is_a_copy_for_each_request(server):
    assert "mutated" in fetch_json(server, "/state-mutate")
    state = fetch_json(server, "/scope")["state"]
    assert "mutated" not in state, "a request's change to scope['state'] leaked into the next"
    assert state["answer"] == 42


# ---------------------------------------------------------------- receive


def test_request_without_a_body_is_one_empty_message(server):
    info = fetch_json(server, "/body-info")
    assert info["length"] == 0
    assert info["messages"] == [
        {"type": "http.request", "size": 0, "body_type": "bytes", "more_body": False}]


def check_messages(info: dict, body: bytes) -> None:
    assert info["length"] == len(body)
    assert info["sha256"] == hashlib.sha256(body).hexdigest()
    messages = info["messages"]
    assert {m["type"] for m in messages} == {"http.request"}
    assert {m["body_type"] for m in messages} == {"bytes"}
    assert [m["more_body"] for m in messages] == [True] * (len(messages) - 1) + [False]
    assert sum(m["size"] for m in messages) == len(body)


def test_chunked_upload_arrives_intact(server):
    body = os.urandom(700_000)
    sizes = [1, 2, 1000, 65536, 100_003, 7, 250_000]
    parts, start = [], 0
    for size in sizes:
        parts.append(body[start:start + size])
        start += size
    parts.append(body[start:])
    sock, stream = connect(server, timeout=30)
    with sock:
        sock.sendall(chunked_post("/body-info", *parts))
        response = stream.response()
    assert response.status == 200, response.body
    check_messages(json.loads(response.body), body)


def test_large_content_length_upload_arrives_intact(server):
    body = os.urandom(1024 * 1024)
    sock, stream = connect(server, timeout=30)
    with sock:
        sock.sendall(post("/body-info", body))
        response = stream.response()
        info = json.loads(response.body)
        check_messages(info, body)
        # The connection is still in step for the next request.
        sock.sendall(post("/echo", b"next"))
        assert stream.response().body == b"next"


def leave(sock: socket.socket, how: str) -> None:
    """The client goes away: ``close`` (a FIN, as a closed browser tab or a killed
    client) or ``reset`` (an RST: SO_LINGER 0)."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_receive_returns_http_disconnect_when_the_client_goes_away(server, how):
    tag = uuid.uuid4().hex
    sock, stream = connect(server)
    try:
        sock.sendall(post(f"/disconnect?tag={tag}", b"abc"))
        receiving = record(server, f"receiving-{tag}")
        assert receiving == [{"type": "http.request", "size": 3, "more_body": False}]
        # The body is complete, the client still there: receive() must wait.
        stream.assert_open(0.3)
        assert not (workdir(server) / f"disconnect-{tag}").exists()
    finally:
        leave(sock, how)
    outcome = record(server, f"disconnect-{tag}")
    assert outcome["messages"] == [{"type": "http.request", "size": 3, "more_body": False},
                                   {"type": "http.disconnect", "size": 0, "more_body": False}]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_receive_returns_http_disconnect_when_the_client_goes_away_mid_body(server, how):
    tag = uuid.uuid4().hex
    sent = 512 * 1024
    sock = server.connect()
    try:
        head = (f"POST /disconnect?tag={tag} HTTP/1.1\r\nHost: test\r\n"
                f"Content-Length: {4 * sent}\r\n\r\n").encode()
        sock.sendall(head + b"x" * sent)
        record(server, f"receiving-{tag}")   # the app is receiving the body
    finally:
        leave(sock, how)
    outcome = record(server, f"disconnect-{tag}")
    messages = outcome["messages"]
    assert messages[-1]["type"] == "http.disconnect", messages
    requests = messages[:-1]
    assert requests and all(m["type"] == "http.request" and m["more_body"] for m in requests), \
        messages
    assert 0 < sum(m["size"] for m in requests) <= sent


def test_body_over_the_limit_ends_the_apps_receive(serve, tmp_path):
    """A 413 while the app awaits more body ends the request: its receive() then
    returns http.disconnect, so no app task is left waiting and a stop is prompt."""
    limit = 300_000
    server = serve("apps_asgi:app", "--limit-request-body", str(limit))
    tag = uuid.uuid4().hex
    piece = b"y" * 40_000
    sock, stream = connect(server)
    with sock:
        sock.sendall(f"POST /disconnect?tag={tag} HTTP/1.1\r\nHost: test\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(7):   # 280 000 bytes: within the limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        record(server, f"receiving-{tag}")   # the app is receiving the body
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))   # past the limit
        except OSError:
            pass
        response = stream.response()
        assert response.status == 413
    outcome = record(server, f"disconnect-{tag}")
    messages = outcome["messages"]
    assert messages[-1]["type"] == "http.disconnect", messages
    assert sum(m["size"] for m in messages) <= limit
    server.proc.send_signal(signal.SIGTERM)
    code, took = wait_exit(server, 15)
    assert code == 0, server.log
    assert took < 5, f"the stop took {took:.1f}s after the 413:\n{server.log}"


def test_send_after_the_client_went_away_raises_an_oserror(server):
    """ASGI spec 2.4: send() on a closed connection raises a subclass of OSError."""
    tag = uuid.uuid4().hex
    sock = server.connect()
    try:
        sock.sendall(post(f"/disconnect?tag={tag}", b"abc"))
        record(server, f"receiving-{tag}")
    finally:
        leave(sock, "reset")
    outcome = record(server, f"disconnect-{tag}")
    assert outcome["send_error"] is not None, "send() after http.disconnect did not raise"
    assert outcome["send_error_is_oserror"], outcome


# ---------------------------------------------------------------- send


def test_streamed_response_without_length_is_chunked(server):
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/stream?n=5"))
        response = stream.response()
        assert response.status == 200
        assert response.header("transfer-encoding") == "chunked"
        assert response.header("content-length") is None
        assert response.body == b"".join(b"part %d\n" % i for i in range(5))
        stream.assert_open(0.1)
        sock.sendall(get("/again"))
        assert stream.response().body == b"GET /again"


def test_streamed_response_with_length_is_sent_as_is(server):
    body = b"".join(b"part %d\n" % i for i in range(5))
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/stream?n=5&cl=1"))
        response = stream.response()
        assert response.status == 200
        assert response.header("content-length") == str(len(body))
        assert response.header("transfer-encoding") is None
        assert response.body == body
        sock.sendall(get("/again"))
        assert stream.response().body == b"GET /again"


def test_head_gets_headers_and_no_body(server):
    sock, stream = connect(server)
    with sock:
        # Pipelined: a body leaked after either HEAD would break the next parse.
        sock.sendall(get("/stream?n=5&cl=1", method="HEAD") + get("/stream?n=3", method="HEAD")
                     + get("/after"))
        with_length = stream.response("HEAD")
        assert with_length.status == 200
        assert with_length.header("content-length") == "35"
        streamed = stream.response("HEAD")
        assert streamed.status == 200
        after = stream.response()
        assert (after.status, after.body) == (200, b"GET /after")
        stream.assert_open(0.1)


def test_response_parts_are_sent_as_the_app_produces_them(server):
    sock, stream = connect(server)
    with sock:
        started = time.monotonic()
        sock.sendall(get("/stream?n=2&delay=1.0"))
        head = stream.head()
        assert head.status == 200
        first = stream.line()
        assert int(first, 16) == len(b"part 0\n")
        assert stream.exact(len(b"part 0\n") + 2) == b"part 0\n\r\n"
        first_at = time.monotonic() - started
        assert stream.line() == b"%x" % len(b"part 1\n")
        second_at = time.monotonic() - started
    assert first_at < 0.8, f"the first part arrived after {first_at:.2f}s: it was held back"
    assert second_at >= 0.9, f"the second part arrived after {second_at:.2f}s, before its delay"


# ---------------------------------------------------------------- app errors


def test_exception_before_response_start_is_a_500_and_the_worker_survives(server):
    pid = worker_pid(server)
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/raise"))
        response = stream.response()
    assert response.status == 500
    assert b"boom" not in response.body and b"Traceback" not in response.body
    assert worker_pid(server) == pid
    assert fetch(server, "/next").body == b"GET /next"


@pytest.mark.parametrize("kind", sorted(apps_asgi.MISUSES))
def test_messages_in_the_wrong_order_or_shape_are_refused(server, kind):
    """The app's send raises; the client gets a 500 if nothing was sent yet (else
    the complete response it already had), the error log names the misuse, and
    the worker serves on."""
    pid = worker_pid(server)
    sock, stream = connect(server)
    with sock:
        sock.sendall(get(f"/misuse?kind={kind}"))
        response = stream.response()
    expected = 200 if kind == "body-after-complete" else 500
    assert response.status == expected
    wait_for(lambda: f"/misuse?kind={kind}" in server.log, what="the misuse to be logged")
    assert worker_pid(server) == pid
    assert fetch(server, "/next").body == b"GET /next"


def test_exception_after_response_start_closes_the_connection(server):
    pid = worker_pid(server)
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/raise-after-start"))
        head = stream.head()
        assert head.status == 200
        assert head.header("transfer-encoding") == "chunked"
        rest = stream.until_eof()
        assert stream.eof, "the connection must be closed after the app raised"
    assert b"first part\n" in rest
    assert not rest.endswith(b"0\r\n\r\n"), "the chunked body must not look complete"
    assert worker_pid(server) == pid


def test_app_returning_without_a_response_is_a_500(server):
    pid = worker_pid(server)
    sock, stream = connect(server)
    with sock:
        sock.sendall(get("/no-response"))
        response = stream.response()
    assert response.status == 500
    assert worker_pid(server) == pid


@pytest.mark.parametrize("kind", list(apps_asgi.BAD_HEADERS))
def test_invalid_response_header_is_a_500_and_never_sent(server, kind):
    with server.connect() as sock:
        sock.sendall(get(f"/bad-header?kind={kind}", extra="Connection: close\r\n"))
        stream = Stream(sock)
        response = stream.response()
        data = b"\r\n".join(f"{k}: {v}".encode("latin-1") for k, v in response.headers)
        data += response.body + stream.until_eof()
    assert response.status == 500
    for never in (b"x-bad", b"x bad", b"injected", b"x-good", b"must never be sent"):
        assert never not in data.lower(), data


# ---------------------------------------------------------------- keep-alive, pipelining


def test_keep_alive_serves_many_requests_on_one_connection(server):
    sock, stream = connect(server)
    with sock:
        ports_seen = set()
        for i in range(5):
            sock.sendall(get(f"/scope?i={i}"))
            response = stream.response()
            assert response.status == 200
            scope = json.loads(response.body)
            assert scope["query_string"] == b(f"i={i}")
            ports_seen.add(scope["client"][1])
        assert ports_seen == {sock.getsockname()[1]}
        stream.assert_open(0.2)


@pytest.mark.parametrize("pause", ["0", "0.05"])
def test_each_request_runs_in_its_own_context(server, pause):
    # An app call that never suspends runs its one step right in the protocol
    # callback, one that suspends becomes a Task afterwards: either way in a
    # copy of the context, so a context variable set by one request is not
    # what the next request on the same connection starts with, and survives
    # the request's own suspension.
    sock, stream = connect(server)
    with sock:
        for value in ("one", "two", "three"):
            sock.sendall(get(f"/context?set={value}&s={pause}"))
            response = stream.response()
            assert response.status == 200
            assert json.loads(response.body) == {"before": "unset", "after": value}
        # pipelined: the three run back to back in one data_received
        sock.sendall(b"".join(get(f"/context?set=p{i}&s={pause}") for i in range(3)))
        for i in range(3):
            assert json.loads(stream.response().body) == {"before": "unset",
                                                           "after": f"p{i}"}


def test_pipelined_requests_are_answered_in_order(server):
    requests = [
        (get("/sleep?s=0.3"), "GET", b"slept 0.3"),
        (get("/first"), "GET", b"GET /first"),
        (post("/echo", b"a body"), "GET", b"a body"),
        (get("/stream?n=3"), "GET", b"part 0\npart 1\npart 2\n"),
        (get("/stream?n=2&cl=1", method="HEAD"), "HEAD", b""),
        (chunked_post("/echo", b"chunked ", b"body"), "GET", b"chunked body"),
        (get("/sleep?s=0.1"), "GET", b"slept 0.1"),
        (get("/last"), "GET", b"GET /last"),
    ]
    sock, stream = connect(server)
    with sock:
        sock.sendall(b"".join(r for r, _, _ in requests))
        for _, method, body in requests:
            response = stream.response(method)
            assert (response.status, response.body) == (200, body)
        stream.assert_open(0.2)


# ---------------------------------------------------------------- concurrency


def test_100_concurrent_requests_on_one_worker(server):
    """One worker, 100 requests that each await asyncio.sleep(0.2): they overlap."""
    count = 100
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    socks = []
    try:
        for _ in range(count):
            sock = server.connect()
            sock.sendall(get("/sleep?s=0.2", extra="Connection: close\r\n"))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, bytearray())
            socks.append(sock)
        answers = []
        deadline = started + 20
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    key.data.extend(data)
                else:
                    selector.unregister(key.fileobj)
                    answers.append(bytes(key.data))
        elapsed = time.monotonic() - started
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    assert len(answers) == count, f"{count - len(answers)} requests unanswered after 20s"
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert answer.endswith(b"slept 0.2"), answer[-200:]
    assert elapsed < 2.0, f"100 concurrent 0.2 s requests took {elapsed:.2f}s on one worker"


# ---------------------------------------------------------------- lifespan


def test_lifespan_startup_ran_once_before_serving(server):
    events = fetch_json(server, "/lifespan")
    assert events == ["startup"]
    pid = worker_pid(server)
    startups = sorted(p.name for p in workdir(server).glob("lifespan-startup-*"))
    assert startups == [f"lifespan-startup-{pid}"]
    # The state set in startup is in the request scopes (a first request included).
    assert fetch_json(server, "/scope")["state"]["started_by"] == pid


def test_lifespan_startup_and_shutdown_in_every_worker(serve, tmp_path):
    server = serve("apps_asgi:app", "--workers", "2")
    pids = server.worker_pids()
    assert len(pids) == 2
    expected = sorted(f"lifespan-startup-{pid}" for pid in pids)
    wait_for(lambda: sorted(p.name for p in tmp_path.glob("lifespan-startup-*")) == expected,
             what=f"{expected}:\n{server.log}")
    assert not list(tmp_path.glob("lifespan-shutdown-*"))
    server.proc.send_signal(signal.SIGTERM)
    code, took = wait_exit(server, 15)
    assert code == 0, server.log
    assert sorted(p.name for p in tmp_path.glob("lifespan-shutdown-*")) == sorted(
        f"lifespan-shutdown-{pid}" for pid in pids), server.log


@pytest.mark.parametrize(("app", "needle"), [
    ("apps_asgi:startup_fails", "no database at db.invalid:5432"),
    ("apps_asgi:startup_raises", "startup exploded: cache unreachable"),
], ids=["startup-failed", "startup-raises"])
def test_lifespan_startup_failure_stops_the_server_once(serve, tmp_path, app, needle):
    server = serve(app, "--lifespan", "on", wait=False)
    code, took = wait_exit(server, 15)
    log = server.log
    assert code == 3, log     # a boot failure other than the import (BOOT_ERROR notice)
    assert len([line for line in log.splitlines()
                if "failed to boot; stopping the server" in line]) == 1, log
    assert took < 10, f"the server took {took:.1f}s to give up:\n{log}"
    attempts = list(tmp_path.glob("startup-attempt-*"))
    assert len(attempts) == 1, f"lifespan startup ran {len(attempts)} times:\n{log}"
    mentions = [line for line in log.splitlines()
                if re.search(r"(?i)lifespan", line) and re.search(r"(?i)startup", line)]
    assert mentions, f"no message mentions the lifespan startup:\n{log}"
    if needle is not None:
        assert needle in log, f"the app's failure message is not reported:\n{log}"


def test_lifespan_auto_serves_an_app_that_raises_on_the_lifespan_scope(serve):
    server = serve("apps_asgi:no_lifespan")
    assert fetch(server, "/hello").body == b"GET /hello"
    assert fetch_json(server, "/lifespan") == []


def test_lifespan_off_never_calls_the_app_with_a_lifespan_scope(serve, tmp_path):
    server = serve("apps_asgi:app", "--lifespan", "off")
    assert fetch(server, "/hello").body == b"GET /hello"
    assert fetch_json(server, "/lifespan") == []
    server.proc.send_signal(signal.SIGTERM)
    code, _ = wait_exit(server, 15)
    assert code == 0, server.log
    assert not list(tmp_path.glob("lifespan-*")), server.log


# ---------------------------------------------------------------- graceful shutdown


def test_sigterm_lets_an_in_flight_request_finish(serve, tmp_path):
    server = serve("apps_asgi:app")
    tag = uuid.uuid4().hex
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fetch, server, f"/slow?s=1&tag={tag}", timeout=15)
        wait_for(lambda: (tmp_path / f"sleeping-{tag}").exists() or future.done(),
                 what="the app to start sleeping")
        assert not future.done(), future.result()
        server.proc.send_signal(signal.SIGTERM)
        status, _, body = future.result(timeout=15)
    assert (status, body) == (200, b"slept")
    code, took = wait_exit(server, 15)
    assert code == 0, server.log
    assert took < 10, f"the server took {took:.1f}s to stop after the request ended"


# ---------------------------------------------------------------- Starlette


def test_starlette_json_with_lifespan_state(starlette_server):
    body = fetch_json(starlette_server, "/json")
    assert body["hello"] == "starlette"
    assert body["greeting"] == "hello from the lifespan"
    assert body["started_by"] == body["pid"]


def test_starlette_streaming_response(starlette_server):
    sock, stream = connect(starlette_server)
    with sock:
        sock.sendall(get("/stream?n=4"))
        response = stream.response()
        assert response.status == 200
        assert response.header("transfer-encoding") == "chunked"
        assert response.body == b"part 0\npart 1\npart 2\npart 3\n"
        sock.sendall(get("/json"))
        assert stream.response().status == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_starlette_streamed_request_body(starlette_server, framing):
    body = os.urandom(1024 * 1024 + 3)
    if framing == "chunked":
        data = chunked_post("/upload", *[body[i:i + 70000] for i in range(0, len(body), 70000)])
    else:
        data = post("/upload", body)
    sock, stream = connect(starlette_server, timeout=30)
    with sock:
        sock.sendall(data)
        response = stream.response()
    assert response.status == 200, response.body
    info = json.loads(response.body)
    assert info["length"] == len(body)
    assert info["sha256"] == hashlib.sha256(body).hexdigest()
    assert info["chunks"] >= 1


def test_starlette_background_task(starlette_server):
    tag = uuid.uuid4().hex
    started = time.monotonic()
    status, _, body = fetch(starlette_server, f"/background?tag={tag}")
    took = time.monotonic() - started
    assert (status, body) == (200, b"accepted")
    assert took < 0.8, f"the response waited {took:.2f}s for its background task"
    assert fetch(starlette_server, f"/background-result?tag={tag}").body in (b"pending",
                                                                           b"running")
    wait_for(lambda: fetch(starlette_server, f"/background-result?tag={tag}").body == b"done",
             timeout=10, interval=0.1, what="the background task to finish")


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_the_groups_backlog_is_kept(serve, interface):
    """The worker never calls listen() again on the master's socket: an ASGI
    group started with --backlog 100 has an accept queue of 100 (it had 2048)."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    app = "apps_asgi:app" if interface == "asgi" else "apps_wsgi:main"
    srv = serve(app, "--interface", interface, "--backlog", "100", "--no-reuse-port")
    fetch(srv, "/pid")   # the worker is serving
    result = subprocess.run(["ss", "-Hltn", f"sport = :{srv.port}"], capture_output=True,
                            text=True, check=True)
    backlogs = {line.split()[2] for line in result.stdout.splitlines() if line.strip()}
    assert backlogs == {"100"}, result.stdout

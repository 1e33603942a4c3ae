"""Black-box tests of TLS listeners (issue 14; README, "HTTPS"): HTTPS through
the real CLI for WSGI and ASGI, checked only through what a client sees (the
wire, the certificates, the log, pids, ``fastpool check``/``status``).

* what the app sees (scheme, HTTPS, SSL_* keys, the ASGI tls extension), ALPN,
  SNI, keep-alive, pipelining, 100-continue, bodies, limits, the health path,
  static files, the access log, a WebSocket (wss), a plain and a TLS listener
  side by side, with Python's ssl client and with curl;
* the other settings: an encrypted key, tls_min_version, tls_ciphers, the
  FASTPOOL_* environment variables;
* client certificates: required, optional, another CA's;
* bad input that ends one connection only (the workers keep their pids);
* config errors: exit code 2, one line naming the file;
* certificate rotation by reload under a TLS load, and a broken certificate's
  refused reload; a handshake under way when a reload begins; SIGTERM;
* routes over TLS (the relay): the target group answers, keep-alive moves
  between groups, large bodies both ways, a client that resets, max_pending's
  503, a flood of the slow group;
* kernel TLS where the machine has it, and what ``fastpool check`` says of it.

Certificates: tls_certs.Certs (trustme); apps: apps_tls_blackbox.py.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from client import Response, Stream, fetch, get, parse_responses, post, read_until_close
from clusters import Load, fastpool, new_clusters, ports, render, routed_group
from conftest import DEADLINE, Server, alive, free_port, stop_server, wait_for
from tls_certs import (
    PASSWORD,
    BioClient,
    Certs,
    client_hello,
    context,
    der,
    peer_cn,
    subject,
    tls_connect,
)

from fastpool.control import request as control_request

APPS = {"wsgi": "apps_tls_blackbox:app", "asgi": "apps_tls_blackbox:asgi"}
# The group with the listeners, per interface (routes: see the ``routed`` fixture).
WEB_APPS = {"wsgi": "apps_tls_blackbox:web", "asgi": "apps_tls_blackbox:asgi_web"}
TASK_APP = "apps_tls_blackbox:task"      # WSGI: one request at a time per worker
API_APP = "apps_tls_blackbox:asgi_api"
ULP_LIST = Path("/proc/sys/net/ipv4/tcp_available_ulp")


def ktls_missing() -> str | None:
    """Why this machine cannot do kernel TLS (every reason), or None when it can."""
    reasons = []
    if not hasattr(ssl, "OP_ENABLE_KTLS"):
        reasons.append("this Python has no ssl.OP_ENABLE_KTLS (3.12 or later has it)")
    try:
        ulps = ULP_LIST.read_text().split()
    except OSError:
        ulps = []
    if "tls" not in ulps:
        reasons.append(f"the kernel has no tls ULP ({ULP_LIST} lists "
                       f"{' '.join(ulps) or 'nothing'})")
    return "; ".join(reasons) or None


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls-certs"))


def start_tls(directory: Path, app: str, *args: str, interface: str, plain: bool = True,
              workers: int = 1, env: dict[str, str] | None = None) -> Server:
    """``fastpool serve APP --tls-bind 127.0.0.1:P [--bind 127.0.0.1:Q] ARGS``,
    waited for on both ports.  ``server.tls_port`` is the TLS one; ``port`` the
    plain one (the TLS one without a plain listener)."""
    plain_port, tls_port = free_port(), free_port()
    while tls_port == plain_port:
        tls_port = free_port()
    name = uuid.uuid4().hex[:8]
    argv = [app, "--interface", interface, "--workers", str(workers),
            "--tls-bind", f"127.0.0.1:{tls_port}",
            "--control-socket", str(directory / f"{name}.sock"), *args]
    if plain:
        argv += ["--bind", f"127.0.0.1:{plain_port}"]
    server = Server(argv, port=plain_port if plain else tls_port, workers=workers, env=env,
                    cwd=directory, log_path=directory / f"server-{name}.log")
    server.tls_port = tls_port
    server.plain_port = plain_port if plain else None
    try:
        server.wait_ready()
        wait_for(lambda: can_connect(tls_port), what=f"the TLS port {tls_port}")
    except BaseException:
        server.kill()
        raise
    return server


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Seen:
    """One request over TLS: the response and the connection's TLS facts."""

    response: Response
    version: str
    cipher: str
    alpn: str | None
    peer: bytes          # the server's certificate (DER)
    port: int            # the client's own port

    @property
    def body(self) -> dict:
        assert self.response.status == 200, (self.response.status, self.response.body[:300])
        return json.loads(self.response.body)


def tls_once(port: int, ctx: ssl.SSLContext, target: str = "/", method: str = "GET",
             body: bytes = b"", timeout: float = 10.0) -> Seen:
    """One request with ``Connection: close`` on a new TLS connection."""
    sock, stream = tls_connect(port, ctx, timeout)
    with sock:
        if body or method == "POST":
            sock.sendall(post(target, body, "Connection: close\r\n", method))
        else:
            sock.sendall(get(target, method=method, extra="Connection: close\r\n"))
        response = stream.response(method)
        return Seen(response, sock.version(), sock.cipher()[0], sock.selected_alpn_protocol(),
                    sock.getpeercert(binary_form=True), sock.getsockname()[1])


def peer_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    """The certificate (DER) a new TLS connection to ``port`` is shown."""
    sock, _ = tls_connect(port, ctx)
    with sock:
        return sock.getpeercert(binary_form=True)


def suite_number(ctx: ssl.SSLContext, name: str) -> int:
    """The IANA number of the cipher suite ``name`` (OpenSSL's id is 0x0300xxxx)."""
    for cipher in ctx.get_ciphers():
        if cipher["name"] == name:
            return cipher["id"] & 0xFFFF
    raise AssertionError(f"unknown cipher {name}")


def assert_https_view(seen: Seen, interface: str, ctx: ssl.SSLContext,
                      client_cert: bytes | None = None) -> dict:
    """What the app saw of a TLS connection matches what the client negotiated;
    ``client_cert``: the PEM of the client certificate it gave (optional mode)."""
    body = seen.body
    assert body["interface"] == interface
    assert body["scheme"] == "https", body
    assert body["client"] == ["127.0.0.1", seen.port], body
    if interface == "wsgi":
        keys = body["ssl"]
        assert body["https"] == "on", body
        assert keys["SSL_PROTOCOL"] == seen.version, keys
        assert keys["SSL_CIPHER"] == seen.cipher, keys
        if client_cert is None:
            assert keys["SSL_CLIENT_VERIFY"] == "NONE", keys
            assert "SSL_CLIENT_CERT" not in keys and "SSL_CLIENT_S_DN" not in keys, keys
        else:
            assert keys["SSL_CLIENT_VERIFY"] == "SUCCESS", keys
            assert keys["SSL_CLIENT_S_DN"] == subject(client_cert), keys
            assert keys["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----"), keys
            assert der(keys["SSL_CLIENT_CERT"]) == der(client_cert)
    else:
        tls = body["tls"]
        assert "tls" in body["extensions"], body
        assert tls is not None, body
        assert set(tls) >= {"server_cert", "client_cert_chain", "client_cert_name",
                            "client_cert_error", "tls_version", "cipher_suite"}, tls
        assert tls["tls_version"] == {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303}[seen.version], tls
        assert tls["cipher_suite"] == suite_number(ctx, seen.cipher), tls
        assert tls["client_cert_error"] is None, tls
        assert tls["server_cert"] is None, tls
        if client_cert is None:
            assert tls["client_cert_chain"] == [] and tls["client_cert_name"] is None, tls
        else:
            assert tls["client_cert_name"] == subject(client_cert), tls
            assert len(tls["client_cert_chain"]) >= 1, tls
            assert der(tls["client_cert_chain"][0]) == der(client_cert)
    return body


def refusal(port: int, ctx: ssl.SSLContext) -> BaseException | None:
    """Try a request over TLS that the server must refuse: the handshake, or the
    first read after it (TLS 1.3 checks a client certificate after the
    client's side of the handshake ended), fails; no response ever comes.
    Returns the error (None: the server closed without a word)."""
    try:
        sock, _ = tls_connect(port, ctx)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return exc
    with sock:
        try:
            sock.sendall(get("/refused", extra="Connection: close\r\n"))
            data = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            return exc
    assert data == b"", f"the server answered a refused client: {data[:300]!r}"
    return None


def assert_still_serving(server: Server, before: tuple[list[int], int],
                         ctx: ssl.SSLContext) -> None:
    """The same workers (``before``: ``watch(server)`` at the start of the
    test), alive, the next good request is answered, and the log since has no
    traceback (a bad connection is no error of the server's)."""
    pids, mark = before
    seen = tls_once(server.tls_port, ctx, "/after")
    assert seen.body["path"] == "/after"
    assert server.worker_pids() == pids, (pids, server.worker_pids(), server.log)
    assert seen.body["pid"] in pids
    log = server.log[mark:]
    assert "Traceback" not in log, log


def watch(server: Server) -> tuple[list[int], int]:
    """The worker pids and the length of the log now (for assert_still_serving)."""
    return server.worker_pids(), len(server.log)


# ---------------------------------------------------------------- the HTTPS server

# One server per interface: a plain and a TLS listener, client certificates
# optional, client_timeout 1 s, keep_alive 5 s, a health path.


BIG_FILE = bytes(range(256)) * (3 * 4096 + 7)     # 3 MiB and a bit: more than a socket buffer


@pytest.fixture(scope="module", params=list(APPS))
def https(request, certs, tmp_path_factory):
    interface = request.param
    directory = tmp_path_factory.mktemp(f"https-{interface}")
    (directory / "public").mkdir()
    (directory / "public" / "big.bin").write_bytes(BIG_FILE)
    (directory / "public" / "hello.txt").write_bytes(b"hello static\n")
    server = start_tls(directory, APPS[interface], "--certfile", certs.cert_a,
                       "--keyfile", certs.key_a, "--ca-certs", certs.ca_pem,
                       "--client-certs", "optional", "--client-timeout", "1",
                       "--keep-alive", "5", "--health-path", "/healthz",
                       "--static", f"/files={directory / 'public'}",
                       "--access-log", str(directory / "access.log"),
                       interface=interface)
    server.access_log = directory / "access.log"
    server.interface = interface
    yield server
    stop_server(server)


def test_log_names_the_https_listener(https):
    wait_for(lambda: f"Listening at: https://127.0.0.1:{https.tls_port} (group main, 1 worker"
             in https.log, what=f"the https listener in the log:\n{https.log}")
    assert f"Listening at: http://127.0.0.1:{https.plain_port} " in https.log, https.log


def test_get_with_python_ssl_and_alpn(https, certs):
    ctx = context(certs, alpn=["h2", "http/1.1"])
    seen = tls_once(https.tls_port, ctx, "/hello?x=1")
    body = assert_https_view(seen, https.interface, ctx)
    assert (body["method"], body["path"], body["query"]) == ("GET", "/hello", "x=1")
    assert seen.alpn == "http/1.1"
    assert seen.version == "TLSv1.3"
    assert seen.peer == certs.der_a
    assert seen.response.header("content-type") == "application/json"


def test_tls_1_2_client(https, certs):
    ctx = context(certs, maximum=ssl.TLSVersion.TLSv1_2)
    seen = tls_once(https.tls_port, ctx, "/old")
    assert seen.version == "TLSv1.2"
    assert_https_view(seen, https.interface, ctx)


def test_with_and_without_sni_the_group_certificate_is_served(https, certs):
    """SNI is accepted: a client that sends server_name=localhost, and one that
    sends none (Python sends none for an IP address), get the group's certificate."""
    for name in ("localhost", "127.0.0.1"):
        ctx = context(certs)
        sock, stream = tls_connect(https.tls_port, ctx, server_hostname=name)
        with sock:
            sock.sendall(get("/sni", extra="Connection: close\r\n"))
            response = stream.response()
            assert response.status == 200, response
            assert sock.getpeercert(binary_form=True) == certs.der_a


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_cacert(https, certs, tmp_path):
    port = https.tls_port
    out = tmp_path / "body.json"
    for url, extra in ((f"https://127.0.0.1:{port}/curl?by=ip", []),
                       (f"https://localhost:{port}/curl?by=name",
                        ["--resolve", f"localhost:{port}:127.0.0.1"])):
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", certs.ca_pem, "-o", str(out),
             "-w", "%{http_code} %{http_version} %{scheme}", *extra, url],
            capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, (result.returncode, result.stderr)
        code, version, scheme = result.stdout.split()
        assert (code, version, scheme.lower()) == ("200", "1.1", "https"), result.stdout
        body = json.loads(out.read_text())
        assert body["scheme"] == "https" and body["path"] == "/curl", body
        if https.interface == "wsgi":
            assert body["https"] == "on" and body["ssl"]["SSL_PROTOCOL"].startswith("TLSv1.")
        else:
            assert body["tls"]["tls_version"] in (0x0303, 0x0304), body
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", certs.ca_pem, "-o", str(out),
         "-w", "%{http_code}", "--data-binary", "hello=curl",
         f"https://127.0.0.1:{port}/curl/post"],
        capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout) == (0, "200"), result.stderr
    body = json.loads(out.read_text())
    assert (body["method"], body["body"]) == ("POST", "hello=curl"), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_refuses_a_server_it_cannot_verify(https, certs):
    """The certificate really is checked: against another CA, curl fails."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", certs.other_ca_pem,
         f"https://127.0.0.1:{https.tls_port}/"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 60, (result.returncode, result.stdout, result.stderr)


def test_keep_alive_two_requests_on_one_connection(https, certs):
    ctx = context(certs)
    sock, stream = tls_connect(https.tls_port, ctx)
    with sock:
        port = sock.getsockname()[1]
        bodies = []
        for target in ("/one", "/two"):
            sock.sendall(get(target))
            response = stream.response()
            assert response.status == 200, response
            assert response.header("connection") != "close", response
            bodies.append(json.loads(response.body))
        sock.sendall(get("/three", extra="Connection: close\r\n"))
        last = stream.response()
        assert last.status == 200
        stream.assert_closed()
    assert [b["path"] for b in bodies] == ["/one", "/two"]
    assert {b["client"][1] for b in bodies} == {port}
    assert bodies[0]["pid"] == bodies[1]["pid"] == json.loads(last.body)["pid"]


def test_pipelined_requests_in_one_write(https, certs):
    sock, stream = tls_connect(https.tls_port, context(certs))
    body = b"pipelined \x00\xff body"
    with sock:
        sock.sendall(get("/p1") + post("/p2", body) + get("/p3?q=3")
                     + get("/p4", extra="Connection: close\r\n"))
        responses = [stream.response() for _ in range(4)]
        stream.assert_closed()
    seen = [json.loads(r.body) for r in responses]
    assert [r.status for r in responses] == [200] * 4
    assert [(s["method"], s["path"]) for s in seen] == [
        ("GET", "/p1"), ("POST", "/p2"), ("GET", "/p3"), ("GET", "/p4")]
    assert seen[1]["body"] == body.decode("latin-1")
    assert seen[2]["query"] == "q=3"
    assert all(s["scheme"] == "https" for s in seen)


def test_100_continue(https, certs):
    sock, stream = tls_connect(https.tls_port, context(certs))
    with sock:
        sock.sendall(b"POST /continue HTTP/1.1\r\nHost: test\r\nContent-Length: 11\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        interim = stream.head()
        assert (interim.status, interim.reason) == (100, b"Continue"), interim
        sock.sendall(b"hello world")
        response = stream.response()
        stream.assert_closed()
    assert response.status == 200, response
    assert json.loads(response.body)["body"] == "hello world"


def test_large_post_body(https, certs):
    body = os.urandom(700 * 1024)
    seen = tls_once(https.tls_port, context(certs), "/upload", "POST", body)
    assert seen.body["length"] == len(body)
    assert seen.body["sha256"] == hashlib.sha256(body).hexdigest()


def test_large_body_echoed_both_ways(https, certs):
    body = os.urandom(2 * 1024 * 1024 + 3)
    seen = tls_once(https.tls_port, context(certs), "/x/echo", "POST", body)
    assert seen.response.status == 200
    assert seen.response.body == body


def test_limits_answer_over_tls_as_over_plain(https, certs):
    """A request whose headers are too large gets the same answer on the TLS
    listener as on the plain one (an error status), and the connection ends."""
    request = get("/big-headers", extra="X-Big: " + "a" * 200_000 + "\r\n")
    with socket.create_connection(("127.0.0.1", https.plain_port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        plain = parse_responses(read_until_close(sock))
    sock, stream = tls_connect(https.tls_port, context(certs))
    with sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        tls = stream.responses()
    assert len(plain) == 1 and plain[0].status >= 400, plain
    assert [(r.status, r.body) for r in tls] == [(plain[0].status, plain[0].body)], tls


def test_health_path_over_tls(https, certs):
    seen = tls_once(https.tls_port, context(certs), "/healthz")
    assert (seen.response.status, seen.response.body) == (200, b"OK\n")


def test_static_files_over_tls(https, certs):
    """A static file larger than the socket buffers, then a small one and a HEAD,
    on one keep-alive TLS connection; the plain listener serves the same bytes."""
    sock, stream = tls_connect(https.tls_port, context(certs))
    with sock:
        sock.sendall(get("/files/big.bin"))
        big = stream.response()
        sock.sendall(get("/files/hello.txt"))
        small = stream.response()
        sock.sendall(get("/files/big.bin", method="HEAD", extra="Connection: close\r\n"))
        head = stream.response("HEAD")
        stream.assert_closed()
    assert big.status == 200 and big.header("content-length") == str(len(BIG_FILE)), big
    assert big.body == BIG_FILE
    assert (small.status, small.body) == (200, b"hello static\n")
    assert head.status == 200 and head.header("content-length") == str(len(BIG_FILE))
    assert head.header("etag") == big.header("etag") is not None
    assert fetch(https.plain_port, "/files/big.bin").body == BIG_FILE


def websocket_message(sock: socket.socket, stream, path: str) -> tuple[Response, dict]:
    """Open a WebSocket on ``path`` and read the app's one text message."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = stream.head()
    assert head.status == 101, head
    accept = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    assert head.header("sec-websocket-accept") == accept, head
    first, second = stream.exact(2)
    assert first == 0x81, hex(first)            # FIN, text
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", stream.exact(2))[0]
    return head, json.loads(stream.exact(length))


@pytest.mark.parametrize("https", ["asgi"], indirect=True)
def test_websocket_over_tls_has_scheme_wss(https, certs):
    sock, stream = tls_connect(https.tls_port, context(certs))
    with sock:
        _, message = websocket_message(sock, stream, "/ws")
    assert message == {"scheme": "wss", "tls": True, "path": "/ws",
                       "pid": https.worker_pids()[0]}, message
    plain_sock = socket.create_connection(("127.0.0.1", https.plain_port), timeout=10)
    with plain_sock:
        _, message = websocket_message(plain_sock, Stream(plain_sock), "/ws")
    assert (message["scheme"], message["tls"]) == ("ws", False), message


def test_access_log_over_tls(https, certs):
    tag = uuid.uuid4().hex
    seen = tls_once(https.tls_port, context(certs), f"/logged/{tag}?q=1")
    assert seen.response.status == 200
    line = wait_for(lambda: https.access_log.exists() and next(
        (line for line in https.access_log.read_text().splitlines() if tag in line), None),
        what="the access log line")
    assert line.startswith("127.0.0.1 "), line
    assert f'"GET /logged/{tag}?q=1 HTTP/1.1" 200 {len(seen.response.body)} ' in line, line


def test_plain_and_tls_listeners_of_one_group(https, certs):
    plain = fetch(https.plain_port, "/plain")
    assert plain.status == 200, plain
    body = json.loads(plain.body)
    assert body["scheme"] == "http", body
    if https.interface == "wsgi":
        assert body["https"] is None and body["ssl"] == {}, body
    else:
        assert body["tls"] is None, body
    seen = tls_once(https.tls_port, context(certs), "/tls")
    assert seen.body["scheme"] == "https"
    assert seen.body["pid"] == body["pid"]        # one group, one worker, both listeners
    # The plain listener does not speak TLS.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        tls_connect(https.plain_port, context(certs))[0].close()


# ---------------------------------------------------------------- client certificates


def test_optional_client_certificate_given(https, certs):
    ctx = context(certs, client_cert=certs.alice_chain)
    seen = tls_once(https.tls_port, ctx, "/me")
    assert_https_view(seen, https.interface, ctx, client_cert=certs.alice_pem)
    assert subject(certs.alice_pem).startswith("CN=alice")


def test_optional_client_certificate_not_given(https, certs):
    ctx = context(certs)
    assert_https_view(tls_once(https.tls_port, ctx, "/anon"), https.interface, ctx)


def test_optional_client_certificate_of_another_ca_is_refused(https, certs):
    before = watch(https)
    refusal(https.tls_port, context(certs, client_cert=certs.mallory_chain))
    assert_still_serving(https, before, context(certs))


@pytest.fixture(scope="module", params=list(APPS))
def required(request, certs, tmp_path_factory):
    """client_certs = required, and TLS only (--tls-bind without --bind)."""
    interface = request.param
    directory = tmp_path_factory.mktemp(f"required-{interface}")
    server = start_tls(directory, APPS[interface], "--certfile", certs.cert_a,
                       "--keyfile", certs.key_a, "--ca-certs", certs.ca_pem,
                       "--client-certs", "required", interface=interface, plain=False)
    server.interface = interface
    yield server
    stop_server(server)


def test_required_client_certificate(required, certs):
    ctx = context(certs, client_cert=certs.alice_chain)
    seen = tls_once(required.tls_port, ctx, "/me")
    assert_https_view(seen, required.interface, ctx, client_cert=certs.alice_pem)
    # TLS only: no plain listener in the log.
    assert f"Listening at: https://127.0.0.1:{required.tls_port} " in required.log
    assert "Listening at: http://" not in required.log, required.log


@pytest.mark.parametrize("who", ["no-certificate", "another-ca"])
def test_required_client_certificate_missing_or_foreign_is_refused(required, certs, who):
    before = watch(required)
    client_cert = None if who == "no-certificate" else certs.mallory_chain
    refusal(required.tls_port, context(certs, client_cert=client_cert))
    assert_still_serving(required, before, context(certs, client_cert=certs.alice_chain))


# ---------------------------------------------------------------- bad input


def test_plain_http_to_the_tls_port_gets_400(https, certs):
    before = watch(https)
    with socket.create_connection(("127.0.0.1", https.tls_port), timeout=10) as sock:
        sock.sendall(get("/plain-to-tls", extra="Connection: close\r\n"))
        data = read_until_close(sock, timeout=5)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data[:300]
    (response,) = parse_responses(data)
    assert response.status == 400
    assert b"HTTP" in response.body or b"https" in response.body.lower(), response.body
    assert_still_serving(https, before, context(certs))


@pytest.mark.parametrize("garbage", [
    bytes(range(64)),                                        # not a TLS record at all
    b"\x16\x03\x01\x00\x40" + b"\xfe" * 64,                   # a handshake record of junk
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # a truncated ClientHello body
], ids=["not-tls", "junk-handshake", "short-client-hello"])
def test_garbage_instead_of_a_client_hello(https, certs, garbage):
    before = watch(https)
    with socket.create_connection(("127.0.0.1", https.tls_port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(garbage)
        data = read_until_close(sock, timeout=5)
        took = time.monotonic() - start
    assert b"HTTP/1.1 200" not in data, data[:300]
    # Closed as soon as OpenSSL rejects it, not at client_timeout (1 s).
    assert took < 0.9, took
    assert_still_serving(https, before, context(certs))


def test_stalled_clients_close_at_client_timeout_and_block_nobody(https, certs):
    """A client that connects and sends nothing, and one that stops in the middle
    of its ClientHello: each is closed at client_timeout (1 s), and meanwhile
    the single worker answers other TLS clients at once."""
    before = watch(https)
    hello = client_hello(certs)
    silent = socket.create_connection(("127.0.0.1", https.tls_port), timeout=10)
    half = socket.create_connection(("127.0.0.1", https.tls_port), timeout=10)
    start = time.monotonic()
    with silent, half:
        half.sendall(hello[:len(hello) // 2])
        for i in range(3):
            started = time.monotonic()
            seen = tls_once(https.tls_port, context(certs), f"/meanwhile/{i}")
            assert seen.body["path"] == f"/meanwhile/{i}"
            assert time.monotonic() - started < 0.5, "a stalled handshake blocked the worker"
        assert time.monotonic() - start < 0.9, "the stalled clients must still be open"
        closed_at = []
        for sock in (silent, half):
            data = read_until_close(sock, timeout=5)
            closed_at.append(time.monotonic() - start)
            assert b"HTTP/1.1 200" not in data, data[:300]
    assert all(0.5 < t < 3.0 for t in closed_at), closed_at
    assert_still_serving(https, before, context(certs))


def test_reset_in_the_middle_of_a_handshake(https, certs):
    """Clients that send half a ClientHello, or a whole one, and reset (RST,
    SO_LINGER 0) before the server's answer: a burst of them, so that some
    resets reach the worker before it accepted the connection and some after."""
    before = watch(https)
    hello = client_hello(certs)
    for i in range(12):
        sock = socket.create_connection(("127.0.0.1", https.tls_port), timeout=10)
        sock.sendall(hello if i % 3 == 2 else hello[:len(hello) // 2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert_still_serving(https, before, context(certs))


def test_tls_1_2_renegotiation_attempt_ends_the_connection(https, certs):
    """Python's ssl module cannot renegotiate; ``openssl s_client`` can (its R
    command).  The server refuses: the connection ends well before keep_alive
    (5 s) would close it, and no response comes."""
    if shutil.which("openssl") is None:
        pytest.skip("the stdlib cannot start a renegotiation and openssl is not installed")
    before = watch(https)
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{https.tls_port}", "-tls1_2",
         "-CAfile", certs.ca_pem, "-servername", "localhost"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, b"")),
                              daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(b"Verify return code: 0" in line for line in output)
                 or proc.poll() is not None, timeout=10,
                 what="openssl s_client's handshake")
        assert proc.poll() is None, b"".join(output).decode(errors="replace")
        text = b"".join(output).decode(errors="replace")
        assert "Protocol  : TLSv1.2" in text or "TLSv1.2" in text, text
        start = time.monotonic()
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        proc.wait(timeout=10)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdin.close()
        reader.join(5)
        proc.stdout.close()
    text = b"".join(output).decode(errors="replace")
    assert "RENEGOTIATING" in text, text
    assert "HTTP/1.1" not in text, text
    assert took < 2.5, (took, text)
    assert_still_serving(https, before, context(certs))


# ---------------------------------------------------------------- other settings


def test_encrypted_key_with_its_password(certs, tmp_path):
    server = start_tls(tmp_path, APPS["wsgi"], "--certfile", certs.cert_a,
                       "--keyfile", certs.encrypted_key, "--keyfile-password", PASSWORD,
                       interface="wsgi", plain=False)
    try:
        seen = tls_once(server.tls_port, context(certs), "/locked")
        assert seen.peer == certs.der_a and seen.body["scheme"] == "https"
        assert PASSWORD not in server.log
    finally:
        stop_server(server)


@pytest.mark.parametrize("interface", list(APPS))
def test_tls_min_version_1_3_refuses_tls_1_2(certs, tmp_path, interface):
    server = start_tls(tmp_path, APPS[interface], "--certfile", certs.cert_a,
                       "--keyfile", certs.key_a, "--tls-min-version", "1.3",
                       interface=interface, plain=False)
    try:
        before = watch(server)
        with pytest.raises(ssl.SSLError):
            tls_connect(server.tls_port, context(certs, maximum=ssl.TLSVersion.TLSv1_2))
        assert tls_once(server.tls_port, context(certs), "/new").version == "TLSv1.3"
        assert_still_serving(server, before, context(certs))
    finally:
        stop_server(server)


def test_tls_ciphers_choose_the_tls_1_2_suite(certs, tmp_path):
    suite = "ECDHE-ECDSA-AES128-GCM-SHA256"     # the certificates' keys are ECDSA
    server = start_tls(tmp_path, APPS["wsgi"], "--certfile", certs.cert_a,
                       "--keyfile", certs.key_a, "--tls-ciphers", suite,
                       interface="wsgi", plain=False)
    try:
        ctx = context(certs, maximum=ssl.TLSVersion.TLSv1_2)
        seen = tls_once(server.tls_port, ctx, "/suite")
        assert (seen.version, seen.cipher) == ("TLSv1.2", suite)
        assert seen.body["ssl"]["SSL_CIPHER"] == suite, seen.body
        # A TLS 1.2 client that offers none of them is refused.
        other = context(certs, maximum=ssl.TLSVersion.TLSv1_2)
        other.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
        with pytest.raises(ssl.SSLError):
            tls_connect(server.tls_port, other)
    finally:
        stop_server(server)


def test_settings_from_the_environment(certs, tmp_path):
    """FASTPOOL_TLS_LISTEN, FASTPOOL_CERTFILE, FASTPOOL_KEYFILE, FASTPOOL_CA_CERTS
    and FASTPOOL_CLIENT_CERTS, as the settings table promises."""
    port = free_port()
    env = {"FASTPOOL_TLS_LISTEN": f"127.0.0.1:{port}", "FASTPOOL_CERTFILE": certs.cert_a,
           "FASTPOOL_KEYFILE": certs.key_a, "FASTPOOL_CA_CERTS": certs.ca_pem,
           "FASTPOOL_CLIENT_CERTS": "required"}
    server = Server([APPS["wsgi"], "--workers", "1", "--control-socket",
                     str(tmp_path / "env.sock")], port=port, workers=1, env=env,
                    cwd=tmp_path, log_path=tmp_path / "env.log")
    server.tls_port = port
    try:
        server.wait_ready()
        ctx = context(certs, client_cert=certs.alice_chain)
        seen = tls_once(port, ctx, "/env")
        assert seen.body["ssl"]["SSL_CLIENT_VERIFY"] == "SUCCESS", seen.body
        refusal(port, context(certs))
    finally:
        stop_server(server)


# ---------------------------------------------------------------- config errors

PORT = 18397   # never bound: every case fails before anything listens


def config_cases(certs: Certs, tmp: Path) -> dict[str, tuple[list[str], list[tuple[str, ...]]]]:
    """name: (serve arguments, [alternatives of which one must be in the error line])."""
    cert_a, key_a = ["--certfile", certs.cert_a], ["--keyfile", certs.key_a]
    return {
        "missing-certfile": (["--certfile", str(tmp / "nope.pem"), *key_a],
                             [(str(tmp / "nope.pem"),)]),
        "missing-keyfile": ([*cert_a, "--keyfile", str(tmp / "nope.key")],
                            [(str(tmp / "nope.key"),)]),
        "certfile-not-a-certificate": (["--certfile", certs.not_a_cert, *key_a],
                                       [(certs.not_a_cert,)]),
        "key-does-not-match": ([*cert_a, "--keyfile", certs.mismatched_key],
                               [(certs.mismatched_key, certs.cert_a)]),
        "wrong-password": ([*cert_a, "--keyfile", certs.encrypted_key,
                            "--keyfile-password", PASSWORD + "-wrong"],
                           [(certs.encrypted_key,), ("password",)]),
        "encrypted-key-without-password": ([*cert_a, "--keyfile", certs.encrypted_key],
                                           [(certs.encrypted_key,), ("password",)]),
        "tls-bind-without-certfile": ([], [("certfile",)]),
        "client-certs-required-without-ca-certs": (
            [*cert_a, *key_a, "--client-certs", "required"], [("ca_certs", "--ca-certs")]),
        "client-certs-optional-without-ca-certs": (
            [*cert_a, *key_a, "--client-certs", "optional"], [("ca_certs", "--ca-certs")]),
        "ca-certs-not-certificates": (
            [*cert_a, *key_a, "--client-certs", "required", "--ca-certs", certs.not_a_cert],
            [(certs.not_a_cert,)]),
    }


CONFIG_CASES = [
    "missing-certfile", "missing-keyfile", "certfile-not-a-certificate", "key-does-not-match",
    "wrong-password", "encrypted-key-without-password", "tls-bind-without-certfile",
    "client-certs-required-without-ca-certs", "client-certs-optional-without-ca-certs",
    "ca-certs-not-certificates"]


def assert_refused(result: subprocess.CompletedProcess[str],
                   parts: list[tuple[str, ...]]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, output
    for alternatives in parts:
        assert any(a in lines[0] for a in alternatives), (alternatives, lines[0])
    assert "Booting worker" not in output and "Listening at" not in output, output
    assert "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_tls_settings_are_refused_at_start(certs, tmp_path, case):
    args, parts = config_cases(certs, tmp_path)[case]
    result = fastpool("serve", APPS["wsgi"], "--tls-bind", f"127.0.0.1:{PORT}", *args,
                      cwd=tmp_path, timeout=30)
    assert_refused(result, parts)
    assert not can_connect(PORT)


def test_bad_certfile_in_a_config_file_is_refused_at_start(certs, tmp_path):
    config = tmp_path / "fastpool.toml"
    config.write_text(render(groups={"web": {
        "app": APPS["wsgi"], "tls_listen": [f"127.0.0.1:{PORT}"],
        "certfile": certs.not_a_cert, "keyfile": certs.key_a}}))
    result = fastpool("serve", "--config", str(config), cwd=tmp_path, timeout=30)
    line = assert_refused(result, [(certs.not_a_cert,)])
    assert "web" in line, line


# ---------------------------------------------------------------- rotation


@dataclass
class TlsLoad(Load):
    """clusters.Load over TLS (``ctx``): new connections and keep-alive ones."""

    ctx: ssl.SSLContext | None = None

    def _fresh_client(self) -> None:
        while self._running():
            started = time.monotonic()
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                               context=self.ctx)
            try:
                reply = fetch(conn, self.path)
            except (OSError, http.client.HTTPException) as exc:
                self._record(started, False, 0, f"new connection: {exc!r}")
                continue
            finally:
                conn.close()
            self._check(started, reply)

    def _keep_alive_client(self) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                           context=self.ctx)
        try:
            while self._running():
                started = time.monotonic()
                try:
                    reply = fetch(conn, self.path)
                except (OSError, http.client.HTTPException) as exc:
                    self._record(started, False, 0, f"keep-alive: {exc!r}")
                    conn.close()
                    continue
                self._check(started, reply)
        finally:
            conn.close()


def replace_file(path: Path, source: str | bytes) -> None:
    """``path`` gets new contents at once (a rename), as a deploy tool does."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    temporary = path.with_suffix(".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.mark.parametrize("interface", list(APPS))
def test_certificate_rotation_by_reload_under_load(clusters, certs, tmp_path, interface):
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    replace_file(live_cert, certs.cert_a)
    replace_file(live_key, certs.key_a)
    chosen = ports("web", "tls")
    text = render(groups={"web": {
        "app": APPS[interface], "interface": interface, "workers": 2,
        "listen": [f"127.0.0.1:{chosen['web']}"], "tls_listen": [f"127.0.0.1:{chosen['tls']}"],
        "certfile": str(live_cert), "keyfile": str(live_key)}})
    server = clusters.start(text, workers=2, ports=chosen)
    old = server.wait_group("web", 2)
    tls_port = chosen["tls"]
    ctx = context(certs)
    assert peer_certificate(tls_port, ctx) == certs.der_a
    with TlsLoad(tls_port, fresh=2, keep_alive=2, path="/r", limit=40, ctx=ctx) as load:
        wait_for(lambda: load.count_since(0) >= 20, what="the TLS load to run")
        replace_file(live_cert, certs.cert_b)
        replace_file(live_key, certs.key_b)
        # The files alone change nothing: the workers hold the certificate.
        assert peer_certificate(tls_port, ctx) == certs.der_a
        result = server.fastpool("reload")
        assert result.returncode == 0, result.stderr
        new = server.wait_group("web", 2, exclude=set(old))
        wait_for(lambda: not any(map(alive, old)), what="the old workers to exit")
        assert peer_cn(peer_certificate(tls_port, ctx)) == "server-b"
        assert {peer_certificate(tls_port, ctx) for _ in range(4)} == {certs.der_b}
        moment = time.monotonic()
        wait_for(lambda: load.count_since(moment) >= 20, what="TLS requests after the reload")
        assert load.pids_since(moment) <= set(new)
    assert load.failures() == [], load.failures()[:5]
    assert load.pids_since(0) & set(old), "the load never reached the old workers"

    # A broken certificate: the reload is refused, B goes on being served.
    replace_file(live_cert, certs.broken_pem)
    before = server.log.count("\n")
    server.proc.send_signal(signal.SIGHUP)

    def refused() -> list[str]:
        return [line for line in server.log.splitlines()[before:] if str(live_cert) in line]
    lines = wait_for(refused, what=f"a log line about the refused reload:\n{server.log}")
    assert any("reload" in line.lower() for line in lines), lines
    ctx = context(certs)
    with TlsLoad(tls_port, fresh=1, keep_alive=1, path="/after", limit=20, ctx=ctx) as load:
        wait_for(lambda: load.count_since(0) >= 10, what="requests after the refused reload")
    assert load.failures() == [], load.failures()[:5]
    assert load.pids_since(0) <= set(new)
    assert server.group_pids("web") == new and all(map(alive, new))
    assert peer_certificate(tls_port, ctx) == certs.der_b
    assert len(refused()) == 1, refused()
    assert server.proc.poll() is None


def holds_connection(pid: int, client_port: int, server_port: int) -> bool:
    """Whether ``pid`` has accepted the TCP connection from 127.0.0.1:``client_port``
    to ``server_port`` (its socket's inode, from /proc/net/tcp, is one of
    ``pid``'s descriptors)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)) == (
                server_port, client_port) and inode != "0":
            inodes.add(f"socket:[{inode}]")
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("interface", list(APPS))
def test_a_handshake_begun_before_a_reload_is_finished_and_served(certs, tmp_path, interface):
    """As a request begun on a plain connection before a reload is still served
    by the old worker: a client that sent half its ClientHello, and the rest
    once the worker has begun its graceful stop, is answered by it."""
    server = start_tls(tmp_path, APPS[interface], "--certfile", certs.cert_a,
                       "--keyfile", certs.key_a, interface=interface)
    control = Path(server.args[server.args.index("--control-socket") + 1])
    try:
        (old,) = server.worker_pids()
        client = BioClient(context(certs))
        hello = client.hello()
        with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as sock:
            sock.sendall(hello[:len(hello) // 2])
            port = sock.getsockname()[1]
            wait_for(lambda: holds_connection(old, port, server.tls_port),
                     what="the worker to accept the connection")
            server.proc.send_signal(signal.SIGHUP)

            def old_is_stopping() -> bool:
                workers = control_request(control, {"command": "status"})["groups"][0]["workers"]
                return not any(w["pid"] == old and w["state"] == "serving" for w in workers)
            wait_for(old_is_stopping, what=f"the old worker to begin its stop:\n{server.log}")
            sock.sendall(hello[len(hello) // 2:])
            try:
                stream = client.finish(sock)
            except (ssl.SSLError, EOFError, ConnectionResetError) as exc:
                raise AssertionError(f"the stopping worker dropped the handshake: {exc!r}\n"
                                     f"{server.log}") from None
            client.send(get("/late", extra="Connection: close\r\n"))
            response = stream.response()
        assert response.status == 200, response
        body = json.loads(response.body)
        assert (body["path"], body["pid"], body["scheme"]) == ("/late", old, "https"), body
        wait_for(lambda: not alive(old), what="the old worker to exit")
    finally:
        stop_server(server)


# ---------------------------------------------------------------- routes over TLS

# web (the listeners, plain and TLS, 1 worker, WSGI or ASGI: the worker that
# holds the TLS connection and relays), task (WSGI, /tast, 1 worker,
# max_pending 1, Retry-After 7: busy while it serves a slow request) and api
# (ASGI, /api, 1 worker).


@pytest.fixture(scope="module", params=list(APPS))
def routed(request, certs, tmp_path_factory):
    interface = request.param
    factory, directory = new_clusters(tmp_path_factory, f"tls-routed-{interface}")
    chosen = ports("web", "tls")
    text = render(
        server={"control_socket": str(directory / ".fastpool.sock")},
        groups={"web": {"app": WEB_APPS[interface], "workers": 1,
                        "listen": [f"127.0.0.1:{chosen['web']}"],
                        "tls_listen": [f"127.0.0.1:{chosen['tls']}"],
                        "certfile": certs.cert_a, "keyfile": certs.key_a},
                "task": routed_group(TASK_APP, ["/tast"], 1, max_pending=1, retry_after=7),
                "api": routed_group(API_APP, ["/api"], 1)})
    server = factory.start(text, workers=3, ports=chosen)
    try:
        server.web_pid = server.wait_group("web", 1)[0]
        server.task_pid = server.wait_group("task", 1)[0]
        server.api_pid = server.wait_group("api", 1)[0]
        server.tls_port = chosen["tls"]
        server.interface = interface
        yield server
    finally:
        factory.close()


def pending(server) -> int:
    for entry in server.status()["groups"]:
        if entry["name"] == "task":
            return entry["pending"]
    raise AssertionError("no task group")


def test_route_over_tls_is_answered_by_the_target_group(routed, certs):
    ctx = context(certs)
    task = tls_once(routed.tls_port, ctx, "/tast/x?y=1")
    api = tls_once(routed.tls_port, ctx, "/api/z")
    web = tls_once(routed.tls_port, ctx, "/")
    assert (task.body["group"], task.body["pid"]) == ("task", routed.task_pid), task.body
    assert (api.body["group"], api.body["pid"]) == ("api", routed.api_pid), api.body
    assert (web.body["group"], web.body["pid"]) == ("web", routed.web_pid), web.body
    assert len({routed.task_pid, routed.api_pid, routed.web_pid}) == 3
    assert (task.body["path"], task.body["query"]) == ("/tast/x", "y=1")
    for seen in (task, api, web):
        assert seen.body["scheme"] == "https", seen.body
        assert seen.body["client"] == ["127.0.0.1", seen.port], seen.body
        assert seen.peer == certs.der_a
    # A plain request for a route stays plain in the target group.
    plain = fetch(routed.ports["web"], "/tast/plain")
    assert json.loads(plain.body)["scheme"] == "http", plain


def test_keep_alive_alternates_between_groups_on_one_tls_connection(routed, certs):
    path = ["/", "/tast/a", "/b", "/tast/c", "/tast/d", "/api/e", "/tast/f", "/g"]
    sock, stream = tls_connect(routed.tls_port, context(certs))
    seen = []
    with sock:
        port = sock.getsockname()[1]
        for target in path:
            sock.sendall(get(target))
            response = stream.response()
            assert response.status == 200, (target, response)
            body = json.loads(response.body)
            assert body["path"] == target and body["scheme"] == "https", body
            assert body["client"] == ["127.0.0.1", port], body
            seen.append((body["group"], body["pid"]))
    web, task = ("web", routed.web_pid), ("task", routed.task_pid)
    api = ("api", routed.api_pid)
    assert seen == [web, task, web, task, task, api, task, web]


def test_pipelined_requests_across_groups_over_tls(routed, certs):
    sock, stream = tls_connect(routed.tls_port, context(certs))
    with sock:
        sock.sendall(get("/one") + post("/tast/two", b"second") + get("/three")
                     + get("/tast/four", extra="Connection: close\r\n"))
        bodies = [json.loads(stream.response().body) for _ in range(4)]
        stream.assert_closed()
    assert [(b["group"], b["path"]) for b in bodies] == [
        ("web", "/one"), ("task", "/tast/two"), ("web", "/three"), ("task", "/tast/four")]
    assert bodies[1]["body"] == "second"


@pytest.mark.parametrize("route", ["/tast", "/api"])
def test_large_bodies_cross_the_relay_both_ways(routed, certs, route):
    body = os.urandom(3 * 1024 * 1024 + 5)
    sock, stream = tls_connect(routed.tls_port, context(certs))
    with sock:
        sock.sendall(post(f"{route}/echo", body))
        echoed = stream.response()
        sock.sendall(get("/after"))
        after = json.loads(stream.response().body)
    assert echoed.status == 200 and len(echoed.body) == len(body)
    assert echoed.body == body
    assert int(echoed.header("x-pid")) == {"/tast": routed.task_pid, "/api": routed.api_pid}[route]
    assert (after["group"], after["pid"]) == ("web", routed.web_pid)


@pytest.mark.parametrize("interface", list(APPS))
def test_an_upload_relayed_right_after_boot(clusters, certs, interface):
    """The first request of a new server (as right after a deploy or a reload)
    is a 1 MiB upload over TLS for the routed WSGI group: relayed whole, and
    echoed whole."""
    chosen = ports("web", "tls")
    text = render(groups={
        "web": {"app": WEB_APPS[interface], "workers": 1,
                "listen": [f"127.0.0.1:{chosen['web']}"],
                "tls_listen": [f"127.0.0.1:{chosen['tls']}"],
                "certfile": certs.cert_a, "keyfile": certs.key_a},
        "task": routed_group(TASK_APP, ["/tast"], 1)})
    server = clusters.start(text, workers=2, ports=chosen)
    (task,) = server.wait_group("task", 1)
    body = os.urandom(1024 * 1024)
    sock, stream = tls_connect(chosen["tls"], context(certs))
    with sock:
        try:
            sock.sendall(post("/tast/echo", body))
            response = stream.response()
        except (ssl.SSLError, EOFError, ConnectionResetError) as exc:
            raise AssertionError(f"the upload was cut: {exc!r}\n{server.log}") from None
    assert response.status == 200, (response.status, response.body[:300])
    assert int(response.header("x-pid")) == task
    assert response.body == body


def slow_request_holder(routed, sock: socket.socket, send, server_port: int) -> set[str]:
    """Send a slow /tast request with ``send`` and, while the task group sleeps
    on it, say which groups' workers hold the client's TCP connection."""
    tag = uuid.uuid4().hex
    send(get(f"/tast/slow?s=0.6&tag={tag}"))
    wait_for(lambda: f"sleeping {tag}" in routed.log, what="the task group to sleep")
    port = sock.getsockname()[1]
    return {name for name, pid in (("web", routed.web_pid), ("task", routed.task_pid))
            if holds_connection(pid, port, server_port)}


def test_the_relay_keeps_the_tls_connection_in_the_web_worker(routed, certs):
    """Without kernel TLS a TLS connection cannot move: while the task group
    serves it, the web worker holds the TCP connection and the task worker
    does not (it has the other end of a socket pair).  A plain connection,
    handed over, is held by the task worker alone."""
    plain_sock = socket.create_connection(("127.0.0.1", routed.ports["web"]), timeout=10)
    with plain_sock:
        plain_stream = Stream(plain_sock)
        assert slow_request_holder(routed, plain_sock, plain_sock.sendall,
                                   routed.ports["web"]) == {"task"}
        assert json.loads(plain_stream.response().body)["group"] == "task"
    if ktls_missing() is None:
        pytest.skip("kernel TLS is available: TLS connections are handed over too")
    sock, stream = tls_connect(routed.tls_port, context(certs))
    with sock:
        assert slow_request_holder(routed, sock, sock.sendall, routed.tls_port) == {"web"}
        assert json.loads(stream.response().body)["group"] == "task"


def test_a_client_that_resets_during_a_relayed_request(routed, certs):
    """The client resets its TLS connection while the task group sleeps on its
    request: every worker stays, the task worker finishes, the next requests
    work."""
    before = {name: routed.group_pids(name) for name in ("web", "task", "api")}
    mark = len(routed.log)
    tag = uuid.uuid4().hex
    sock, _ = tls_connect(routed.tls_port, context(certs))
    sock.sendall(get(f"/tast/slow?s=0.5&tag={tag}"))
    wait_for(lambda: f"sleeping {tag}" in routed.log, what="the task group to sleep")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    ctx = context(certs)
    assert tls_once(routed.tls_port, ctx, "/web-meanwhile").body["group"] == "web"
    assert tls_once(routed.tls_port, ctx, "/tast/after", timeout=15).body["group"] == "task"
    assert {name: routed.group_pids(name) for name in before} == before
    wait_for(lambda: pending(routed) == 0, what="an empty task queue")
    assert "Traceback" not in routed.log[mark:], routed.log[mark:]


def start_slow(pool: ThreadPoolExecutor, server, ctx: ssl.SSLContext, route: str,
               seconds: float):
    """A slow request over TLS on its own thread, returned once the app sleeps."""
    tag = uuid.uuid4().hex
    future = pool.submit(tls_once, server.tls_port, ctx, f"{route}/slow?s={seconds}&tag={tag}",
                         timeout=seconds + 15)
    wait_for(lambda: f"sleeping {tag}" in server.log or future.done(), timeout=10,
             what=f"the app to start sleeping:\n{server.log}")
    assert not future.done(), future.result()
    return future


def test_max_pending_answers_503_over_tls(routed, certs):
    ctx = context(certs)
    with ThreadPoolExecutor(2) as pool:
        busy = start_slow(pool, routed, ctx, "/tast", 2.0)
        queued = pool.submit(tls_once, routed.tls_port, ctx, "/tast/queued", timeout=20)
        wait_for(lambda: pending(routed) == 1, what="one handoff waiting for the task group")
        shed = [tls_once(routed.tls_port, ctx, "/tast/more") for _ in range(3)]
        web = [tls_once(routed.tls_port, ctx, "/") for _ in range(2)]
        assert not busy.done() and not queued.done(), "the slow request ended too early"
        slow, late = busy.result(timeout=20), queued.result(timeout=20)
    for seen in shed:
        assert seen.response.status == 503, seen.response
        assert seen.response.header("retry-after") == "7", seen.response
        assert seen.response.header("connection") == "close", seen.response
    assert [s.body["group"] for s in web] == ["web", "web"]
    assert slow.body["group"] == late.body["group"] == "task"
    assert late.body["scheme"] == "https"
    wait_for(lambda: pending(routed) == 0, what="an empty task queue")


def test_a_flood_of_the_slow_group_leaves_the_web_group_fast(routed, certs):
    """Flooders keep sending slow /tast requests over TLS (each waits 0.1 s
    after a 503); meanwhile / over TLS, new connections and a keep-alive
    one, is answered at once by the web group."""
    ctx = context(certs)
    stop = threading.Event()
    statuses: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + 20

    def flood() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                seen = tls_once(routed.tls_port, ctx, "/tast/slow?s=0.6&tag=flood", timeout=15)
            except (OSError, EOFError) as exc:
                errors.append(repr(exc))
                continue
            statuses.append(seen.response.status)
            if seen.response.status == 503:
                stop.wait(0.1)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: 200 in statuses and 503 in statuses, what="the flood to run")
        latencies = []
        sock, stream = tls_connect(routed.tls_port, ctx)
        with sock:
            for i in range(6):
                start = time.monotonic()
                fresh = tls_once(routed.tls_port, ctx, f"/fast/{i}")
                sock.sendall(get(f"/fast-keep-alive/{i}"))
                kept = stream.response()
                latencies.append(time.monotonic() - start)
                assert fresh.body["group"] == "web"
                assert json.loads(kept.body)["group"] == "web"
        busy = [w["current_request_s"] for w in routed.group_status("task")["workers"]]
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert errors == [], errors[:5]
    assert set(statuses) <= {200, 503}, statuses
    assert busy != [None], "the task group was not busy while / was measured"
    assert max(latencies) < 0.5, [round(t, 3) for t in latencies]
    wait_for(lambda: pending(routed) == 0, what="an empty task queue")


# ---------------------------------------------------------------- kernel TLS


def test_check_says_whether_kernel_tls_is_available(certs, tmp_path):
    result = fastpool("check", APPS["wsgi"], "--tls-bind", f"127.0.0.1:{PORT}",
                      "--certfile", certs.cert_a, "--keyfile", certs.key_a, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "kernel tls" in line.lower()]
    assert len(lines) == 1, result.stdout
    if ktls_missing() is None:
        assert "not available" not in lines[0], lines[0]
    else:
        assert "not available" in lines[0], lines[0]
    assert f"127.0.0.1:{PORT}" in result.stdout, result.stdout


def test_status_says_whether_kernel_tls_is_used(routed):
    """Issue 14: ``fastpool status`` says, for a group with TLS listeners,
    whether kernel TLS is used; a group without them says nothing of it."""
    result = routed.fastpool("status")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "kernel tls" in line.lower()]
    assert len(lines) == 1, result.stdout
    if ktls_missing() is not None:
        assert "not available" in lines[0], lines[0]


def test_kernel_tls_routes_where_available(clusters, certs):
    """Where the kernel and Python can do kernel TLS: a TLS connection is
    offloaded, the route to another group works (plain fd handoff), and
    ``fastpool check`` says kernel TLS is available."""
    why = ktls_missing()
    if why is not None:
        pytest.skip(f"kernel TLS is not available here: {why}")
    chosen = ports("web", "tls")
    text = render(groups={
        "web": {"app": WEB_APPS["wsgi"], "workers": 1, "ktls": True,
                "listen": [f"127.0.0.1:{chosen['web']}"],
                "tls_listen": [f"127.0.0.1:{chosen['tls']}"],
                "certfile": certs.cert_a, "keyfile": certs.key_a},
        "task": routed_group(TASK_APP, ["/tast"], 1)})
    server = clusters.start(text, workers=2, ports=chosen)
    (web,) = server.wait_group("web", 1)
    (task,) = server.wait_group("task", 1)
    ctx = context(certs)
    sock, stream = tls_connect(chosen["tls"], ctx)
    with sock:
        for target, group, pid in (("/", "web", web), ("/tast/k", "task", task),
                                   ("/back", "web", web)):
            sock.sendall(get(target))
            body = json.loads(stream.response().body)
            assert (body["group"], body["pid"], body["scheme"]) == (group, pid, "https")
        # The plain fd handoff: the task worker holds the TCP connection itself.
        server.web_pid, server.task_pid = web, task
        assert slow_request_holder(server, sock, sock.sendall, chosen["tls"]) == {"task"}
        assert json.loads(stream.response().body)["group"] == "task"
    check = server.fastpool("check")
    assert check.returncode == 0, check.stderr
    assert "kernel TLS: available" in check.stdout, check.stdout


# ---------------------------------------------------------------- graceful stop


@pytest.mark.parametrize("interface", list(APPS))
def test_sigterm_stops_a_tls_server_cleanly(certs, tmp_path, interface):
    """An idle keep-alive TLS connection does not hold up a graceful stop: it
    is closed, and the master exits 0."""
    server = start_tls(tmp_path, APPS[interface], "--certfile", certs.cert_a,
                       "--keyfile", certs.key_a, "--graceful-timeout", "10",
                       interface=interface, plain=False)
    try:
        sock, stream = tls_connect(server.tls_port, context(certs))
        with sock:
            sock.sendall(get("/idle"))
            assert stream.response().status == 200
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            stream.assert_closed(timeout=5)
            assert server.proc.wait(DEADLINE) == 0, server.log
            assert time.monotonic() - start < 5, server.log
    finally:
        stop_server(server)

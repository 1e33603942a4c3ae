"""HTTPS on tls_listen addresses (issue 14), through the real CLI, for WSGI and
ASGI: what the app sees, keep-alive and pipelining, client certificates,
bad handshakes that end one connection only, bad certificate files refused
at start, certificate rotation under load, routes over TLS (the relay), and
kernel TLS where the machine has it.

Certificates are made per module with trustme (tls_client.Certs); clients are
Python's ssl module and, where installed, curl.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clusters import fastpool, ports, render, routed_group
from conftest import DEADLINE, Server, child_env, free_port, stop_server, wait_for
from tls_client import Certs, connect, exchange, get, seen

from fastpool import tls

APPS = {"wsgi": "apps_tls:app", "asgi": "apps_tls:asgi"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


def tls_args(certs: Certs, tls_port: int, *more: str) -> list[str]:
    return ["--tls-bind", f"127.0.0.1:{tls_port}", "--certfile", certs["server_cert"],
            "--keyfile", certs["server_key"], *more]


def start(directory: Path, app: str, args: list[str], plain_port: int) -> Server:
    server = Server([app, "--bind", f"127.0.0.1:{plain_port}", "--workers", "1", *args],
                    port=plain_port, workers=1, env=None, cwd=directory,
                    log_path=directory / f"server-{time.monotonic_ns()}.log")
    try:
        return server.wait_ready()
    except BaseException:
        server.kill()
        raise


def serve_config(directory: Path, text: str, port: int, workers: int) -> Server:
    """``fastpool serve --config`` on ``text`` (written to directory/fastpool.toml),
    waited for until ``port`` accepts."""
    config = directory / "fastpool.toml"
    config.write_text(text)
    server = Server(["--config", str(config)], port=port, workers=workers, env=None,
                    cwd=directory, log_path=directory / f"server-{time.monotonic_ns()}.log")
    try:
        return server.wait_ready()
    except BaseException:
        server.kill()
        raise


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def served(request, certs, tmp_path_factory):
    """One server per interface: a plain and a TLS listener, client
    certificates optional, client_timeout 2 s, static files under /files."""
    directory = tmp_path_factory.mktemp(f"tls-{request.param}")
    (directory / "public").mkdir()
    (directory / "public" / "big.bin").write_bytes(bytes(range(256)) * 2048)   # 512 KiB
    plain, secure = free_port(), free_port()
    server = start(directory, APPS[request.param], tls_args(
        certs, secure, "--ca-certs", certs["client_ca"], "--client-certs", "optional",
        "--client-timeout", "2", "--health-path", "/healthz",
        "--static", f"/files={directory / 'public'}"), plain)
    server.secure = secure
    server.interface = request.param
    try:
        yield server
    finally:
        stop_server(server)


# ---------------------------------------------------------------- what the app sees


def test_an_https_request_and_what_the_app_sees(served, certs):
    with connect(served.secure, certs.context()) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
        version = sock.version()
        assert version in ("TLSv1.3", "TLSv1.2")
        app = seen(exchange(sock, get("/hello"))[0])
    assert app["scheme"] == "https"
    assert app["remote"] == "127.0.0.1"
    if served.interface == "wsgi":
        assert app["https"] == "on"
        assert app["ssl"]["SSL_PROTOCOL"] == version
        assert app["ssl"]["SSL_CIPHER"]
        assert app["ssl"]["SSL_CLIENT_VERIFY"] == "NONE"     # optional, none given
    else:
        assert app["tls"]["tls_version"] == {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303}[version]
        assert isinstance(app["tls"]["cipher_suite"], int)
        assert app["tls"]["client_cert_chain"] == []
        assert app["tls"]["client_cert_name"] is None


def test_the_plain_listener_of_the_same_group_stays_plain(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        app = seen(exchange(sock, get("/plain"))[0])
    assert app["scheme"] == "http"
    if served.interface == "wsgi":
        assert app["https"] is None and app["ssl"] == {}


def test_keep_alive_and_pipelining_over_tls(served, certs):
    with connect(served.secure, certs.context()) as sock:
        responses = exchange(sock, get("/a") + get("/b") + get("/c"), 3)
        assert [seen(r)["path"] for r in responses] == ["/a", "/b", "/c"]
        assert len({seen(r)["pid"] for r in responses}) == 1
        # the same connection goes on
        assert seen(exchange(sock, get("/d"))[0])["path"] == "/d"


def test_a_post_body_and_100_continue_over_tls(served, certs):
    body = b"x" * 300_000
    with connect(served.secure, certs.context()) as sock:
        assert seen(exchange(sock, get("/echo", method="POST", body=body))[0])["body"] == \
            body.decode()
        sock.sendall(get("/echo", method="POST", extra="Expect: 100-continue\r\n")[:-2]
                     .replace(b"Content-Length: 0", b"Content-Length: 5") + b"\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(b"hello")
        buffer = bytearray()
        from tls_client import read_response
        assert seen(read_response(sock, buffer))["body"] == "hello"


def test_health_path_and_a_static_file_over_tls(served, certs):
    with connect(served.secure, certs.context()) as sock:
        status, _, body = exchange(sock, get("/healthz"))[0]
        assert (status, body) == (200, b"OK\n")
        status, headers, body = exchange(sock, get("/files/big.bin"))[0]
    assert status == 200
    assert body == bytes(range(256)) * 2048
    assert headers["content-length"] == str(len(body))


def test_curl_with_cacert(served, certs):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    result = subprocess.run([curl, "-sS", "--cacert", certs["ca"],
                             f"https://localhost:{served.secure}/via-curl"],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    assert '"scheme": "https"' in result.stdout and "/via-curl" in result.stdout


# ---------------------------------------------------------------- client certificates


def test_a_client_certificate_is_verified_and_given_to_the_app(served, certs):
    with connect(served.secure, certs.context(client="client")) as sock:
        app = seen(exchange(sock, get("/who"))[0])
    if served.interface == "wsgi":
        assert app["ssl"]["SSL_CLIENT_VERIFY"] == "SUCCESS"
        assert app["ssl"]["SSL_CLIENT_S_DN"].startswith("CN=alice,")
        assert app["ssl"]["SSL_CLIENT_S_DN"].endswith(",O=Example")
        assert app["ssl"]["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    else:
        assert app["tls"]["client_cert_name"].startswith("CN=alice,")
        assert len(app["tls"]["client_cert_chain"]) == 1
        assert app["tls"]["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")


def test_a_client_certificate_of_another_ca_is_refused(served, certs):
    pids = served.worker_pids()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with connect(served.secure, certs.context(client="stranger")) as sock:
            exchange(sock, get("/who"))
    with connect(served.secure, certs.context()) as sock:
        seen(exchange(sock, get("/after"))[0])
    assert served.worker_pids() == pids


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_required_client_certificates(interface, certs, tmp_path):
    plain, secure = free_port(), free_port()
    server = start(tmp_path, APPS[interface], tls_args(
        certs, secure, "--ca-certs", certs["client_ca"], "--client-certs", "required"), plain)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with connect(secure, certs.context()) as sock:
                exchange(sock, get("/anonymous"))
        with connect(secure, certs.context(client="client")) as sock:
            app = seen(exchange(sock, get("/alice"))[0])
        assert app["path"] == "/alice"
    finally:
        stop_server(server)


# ---------------------------------------------------------------- bad handshakes


def test_plain_http_on_the_tls_port_gets_400(served):
    with socket.create_connection(("127.0.0.1", served.secure), timeout=10) as sock:
        sock.sendall(get("/plain-on-tls"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
    assert b"The plain HTTP request was sent to HTTPS port" in data


def test_bad_handshakes_end_their_connection_only(served, certs):
    pids = served.worker_pids()
    # garbage where a ClientHello belongs
    with socket.create_connection(("127.0.0.1", served.secure), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05garbage" * 20)
        try:     # a TLS alert at most, then the end (or a reset: input was left unread)
            while sock.recv(100):
                pass
        except ConnectionResetError:
            pass
    # half a ClientHello, then a reset
    raw = socket.create_connection(("127.0.0.1", served.secure), timeout=10)
    tls_object = certs.context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                          server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls_object.do_handshake()
    hello = outgoing.read()
    raw.sendall(hello[:len(hello) // 2])
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    # a client that connects and never sends: closed after client_timeout (2 s)
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.secure), timeout=10) as idle:
        assert idle.recv(100) == b""
    assert 1.5 < time.monotonic() - began < 6
    with connect(served.secure, certs.context()) as sock:
        seen(exchange(sock, get("/still-fine"))[0])
    assert served.worker_pids() == pids
    assert "Traceback" not in served.log


def test_tls_1_2_renegotiation_is_refused_without_harm(served, certs):
    """Python's client cannot start a renegotiation; a TLS 1.2 connection
    checks at least that 1.2 works and that the server refuses nothing else."""
    context = certs.context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with connect(served.secure, context) as sock:
        assert sock.version() == "TLSv1.2"
        assert seen(exchange(sock, get("/tls12"))[0])["scheme"] == "https"


def test_a_websocket_over_tls_is_wss(served, certs):
    if served.interface != "asgi":
        pytest.skip("WebSocket is ASGI's")
    import asyncio

    from websockets.asyncio.client import connect as ws_connect

    async def talk() -> str:
        async with ws_connect(f"wss://127.0.0.1:{served.secure}/ws",
                              ssl=certs.context()) as ws:
            await ws.send("hi")
            return await ws.recv()

    assert asyncio.run(talk()) == "wss:hi"


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("case,args,message", [
    ("no certfile", [], "tls_listen needs certfile"),
    ("missing file", ["--certfile", "nope.pem"], "certfile {dir}/nope.pem: no such file"),
    ("not a certificate", ["--certfile", "{client_ca}", "--keyfile", "{server_key}"],
     None),
    ("not a certificate at all", ["--certfile", "{junk}"], "not a PEM certificate"),
    ("key of another certificate", ["--certfile", "{server_cert}", "--keyfile",
                                    "{rotated_key}"], "is not the key of certfile"),
    ("encrypted key, no password", ["--certfile", "{enc_cert}", "--keyfile", "{enc_key}"],
     "the key is encrypted; set keyfile_password"),
    ("wrong password", ["--certfile", "{enc_cert}", "--keyfile", "{enc_key}",
                        "--keyfile-password", "wrong"], "wrong password"),
    ("client certs without CA", ["--certfile", "{server_cert}", "--keyfile", "{server_key}",
                                 "--client-certs", "required"], "needs ca_certs"),
])
def test_bad_certificate_settings_are_one_line_and_exit_2(case, args, message, certs,
                                                           tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (to make an encrypted key)")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-passout", "pass:pw",
                    "-keyout", str(tmp_path / "enc_key.pem"), "-out",
                    str(tmp_path / "enc_cert.pem"), "-subj", "/CN=x", "-days", "2"],
                   check=True, capture_output=True)
    names = {"dir": str(tmp_path), "junk": str(tmp_path / "junk.pem"),
             "enc_cert": str(tmp_path / "enc_cert.pem"), "enc_key": str(tmp_path / "enc_key.pem"),
             **{k: str(v) for k, v in certs.files.items()}}
    argv = [a.format(**names) for a in args]
    for command in ("check", "serve"):
        result = fastpool(command, "apps_tls:app", "--tls-bind", f"127.0.0.1:{free_port()}",
                          *argv, cwd=tmp_path, env={"PYTHONPATH": str(Path(__file__).parent)})
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: group main: "), lines
        if message is not None:
            assert message.format(**names) in lines[0], lines


def test_check_says_whether_kernel_tls_is_available(certs, tmp_path):
    result = fastpool("check", "apps_tls:app", *tls_args(certs, free_port()), cwd=tmp_path,
                      env={"PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr
    available, why = tls.kernel_tls()
    line = next(line for line in result.stdout.splitlines() if line.startswith("kernel TLS: "))
    assert why in line
    assert ("not available" in line) is not available


def test_kernel_tls_hands_the_socket_over_where_the_machine_has_it(certs, tmp_path):
    available, why = tls.kernel_tls()
    if not available:
        pytest.skip(f"kernel TLS is not available here: {why}")
    # With kernel TLS both ways, a static file goes out with sendfile and a
    # route hands the descriptor itself over: the task group sees the peer's
    # own TCP socket (its client port), not a socket pair.
    chosen = ports("web")
    secure = free_port()
    text = render(groups={
        "web": {"app": "apps_tls:web", "listen": [f"127.0.0.1:{chosen['web']}"],
                "tls_listen": [f"127.0.0.1:{secure}"], "certfile": certs["server_cert"],
                "keyfile": certs["server_key"], "tls_min_version": "1.2"},
        "task": routed_group("apps_tls:task", ["/tast"])})
    server = serve_config(tmp_path, text, chosen["web"], 2)
    try:
        context = certs.context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with connect(secure, context) as sock:
            assert seen(exchange(sock, get("/tast/k"))[0])["group"] == "task"
    finally:
        stop_server(server)


# ---------------------------------------------------------------- rotation


def test_certificate_rotation_under_load(certs, tmp_path):
    """fastpool reload reads the certificate files again: new connections get
    the new certificate, no request fails meanwhile; a broken certificate
    refuses the reload and the workers go on with the last good one."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(certs["server_cert"], cert)
    shutil.copy(certs["server_key"], key)
    plain, secure = free_port(), free_port()
    server = start(tmp_path, APPS["wsgi"], ["--workers", "2", "--tls-bind",
                                            f"127.0.0.1:{secure}", "--certfile", str(cert),
                                            "--keyfile", str(key)], plain)
    context = certs.context()

    def serial() -> int:
        with connect(secure, context) as sock:
            der = sock.getpeercert(binary_form=True)
            seen(exchange(sock, get("/serial", close=True))[0])
        return hash(der)

    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def load(keep_alive: bool) -> None:
        nonlocal done
        sock = None
        while not stop.is_set():
            try:
                if sock is None:
                    sock = connect(secure, context)
                response = exchange(sock, get("/load", close=not keep_alive))[0]
                seen(response)
                done += 1
                # (a reloaded worker answers a keep-alive request with
                # Connection: close: the client then reconnects)
                if not keep_alive or response[1].get("connection") == "close":
                    sock.close()
                    sock = None
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))
                sock = None

    try:
        before = serial()
        shutil.copy(certs["rotated_cert"], cert)
        shutil.copy(certs["rotated_key"], key)
        with ThreadPoolExecutor(3) as pool:
            clients = [pool.submit(load, keep_alive) for keep_alive in (True, False, False)]
            wait_for(lambda: done > 20, what="the load to start")
            result = fastpool("reload", "--control-socket", str(tmp_path / ".fastpool.sock"),
                              cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            after = wait_for(lambda: (s := serial()) != before and s, what="the new certificate")
            count = done
            wait_for(lambda: done > count + 20, what="requests after the reload")
            stop.set()
            for client in clients:
                client.result(timeout=DEADLINE)
        assert not failures, failures[:5]
        # A broken certificate: refused, and the last good one stays.
        cert.write_text("broken\n")
        result = fastpool("reload", "--control-socket", str(tmp_path / ".fastpool.sock"),
                          cwd=tmp_path)
        assert result.returncode == 1
        assert "not a PEM certificate" in result.stderr
        wait_for(lambda: "Reload refused (nothing changed): group main: certfile" in server.log,
                 what="the refused reload in the log")
        assert serial() == after
    finally:
        stop.set()
        stop_server(server)


# ---------------------------------------------------------------- routes over TLS


@pytest.fixture(scope="module")
def routed(certs, tmp_path_factory):
    """web (WSGI, one TLS listener, 1 worker); task (/tast, 1 worker,
    max_pending 2, Retry-After 4)."""
    directory = tmp_path_factory.mktemp("tls-routes")
    secure = free_port()
    text = render(groups={
        "web": {"app": "apps_tls:web", "tls_listen": [f"127.0.0.1:{secure}"],
                "certfile": certs["server_cert"], "keyfile": certs["server_key"],
                "workers": 1},
        "task": routed_group("apps_tls:task", ["/tast"], 1, max_pending=2, retry_after=4)})
    server = serve_config(directory, text, secure, 2)
    server.secure = secure
    try:
        yield server
    finally:
        stop_server(server)


def test_a_route_over_tls_is_served_by_its_group(routed, certs):
    with connect(routed.secure, certs.context()) as sock:
        responses = [seen(exchange(sock, get(path))[0])
                     for path in ("/", "/tast/a", "/", "/tast/b", "/c")]
    assert [r["group"] for r in responses] == ["web", "task", "web", "task", "web"]
    for response in responses:
        assert response["scheme"] == "https"
        assert response["remote"] == "127.0.0.1"
    assert responses[1]["pid"] != responses[0]["pid"]


def test_pipelined_requests_across_groups_over_tls_stay_in_order(routed, certs):
    with connect(routed.secure, certs.context()) as sock:
        responses = exchange(sock, get("/1") + get("/tast/2") + get("/3") + get("/tast/4"), 4)
    assert [(seen(r)["group"], seen(r)["path"]) for r in responses] == [
        ("web", "/1"), ("task", "/tast/2"), ("web", "/3"), ("task", "/tast/4")]


def test_a_flood_of_slow_routed_requests_over_tls_leaves_the_fast_path_fast(routed, certs):
    context = certs.context()

    def slow() -> int:
        with connect(routed.secure, context, timeout=DEADLINE) as sock:
            return exchange(sock, get("/tast/slow", close=True))[0][0]

    with ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(slow) for _ in range(8)]
        wait_for(lambda: sum(f.running() for f in flood) >= 4, what="the flood")
        fast = []
        for _ in range(10):
            began = time.monotonic()
            with connect(routed.secure, context) as sock:
                assert seen(exchange(sock, get("/fast"))[0])["group"] == "web"
            fast.append(time.monotonic() - began)
        statuses = [f.result(timeout=DEADLINE) for f in flood]
    # max_pending 2 on one worker of 0.3 s requests: most of the flood is shed.
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    assert 200 in statuses, statuses
    assert max(fast) < 0.25, sorted(fast)


def test_a_full_routed_group_answers_503_over_tls(routed, certs):
    context = certs.context()

    def slow() -> tuple[int, dict, bytes]:
        with connect(routed.secure, context, timeout=DEADLINE) as sock:
            return exchange(sock, get("/tast/slow", close=True))[0]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: slow(), range(6)))
    shed = [a for a in answers if a[0] == 503]
    assert shed, [a[0] for a in answers]
    assert all(a[1].get("retry-after") == "4" for a in shed)


def test_routes_over_tls_in_an_asgi_group(certs, tmp_path):
    """ASGI holds the TLS connection and relays to a WSGI group, and the
    relayed connection comes back to the ASGI group for its next request."""
    secure = free_port()
    text = render(groups={
        "web": {"app": "apps_tls:asgi", "tls_listen": [f"127.0.0.1:{secure}"],
                "certfile": certs["server_cert"], "keyfile": certs["server_key"]},
        "task": routed_group("apps_tls:task", ["/tast"])})
    server = serve_config(tmp_path, text, secure, 2)
    try:
        with connect(secure, certs.context()) as sock:
            answers = [seen(exchange(sock, get(path))[0]) for path in ("/", "/tast/x", "/y")]
        assert [a["group"] for a in answers] == ["main", "task", "main"]
        assert all(a["scheme"] == "https" for a in answers)
    finally:
        stop_server(server)


def test_the_tls_client_module_is_importable_without_the_server():
    # (guards the helper itself: trustme is a test dependency)
    assert subprocess.run([sys.executable, "-c", "import trustme"], env=child_env(),
                          capture_output=True).returncode == 0

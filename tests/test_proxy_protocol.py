"""The PROXY protocol (``proxy_protocol``): a group's connections begin with
HAProxy's PROXY header, v1 (text) or v2 (binary); from a peer in
forwarded_allow_ips its addresses become the client and server the app sees
(and the access log), from any other peer it is consumed and ignored (one
warning per worker); a connection without a valid header gets 400.

Black-box over raw sockets against both interfaces (the ``interface``
fixture), a routed server (the proxied client reaches the other group) and a
tls_listen socket (the header comes before the ClientHello).
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest
from client import Stream, exchange, get, raw_request
from clusters import group, new_clusters, ports, render, routed_group
from conftest import HTTP_APPS, Server, free_port, start_http_server, stop_server, wait_for
from tls_client import Certs

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT4, SERVER4 = ("203.0.113.7", 40123), ("198.51.100.2", 8443)
CLIENT6, SERVER6 = ("2001:db8::7", 40124), ("2001:db8::2", 443)
# A split is seen by the server as two reads only if the parts arrive apart:
# this pause separates them (it waits for no state of the server).
SPLIT_PAUSE = 0.005


def v1(client=CLIENT4, server=SERVER4, family: str = "TCP4") -> bytes:
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode()


def v2(client=CLIENT4, server=SERVER4, *, command: int = 0x21, tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY (0x21) or LOCAL (0x20) over TCP/IPv4 or TCP/IPv6."""
    if ":" in client[0]:
        family, kind = socket.AF_INET6, 0x21
    else:
        family, kind = socket.AF_INET, 0x11
    body = (socket.inet_pton(family, client[0]) + socket.inet_pton(family, server[0])
            + struct.pack("!HH", client[1], server[1]) + tlvs) if command == 0x21 else tlvs
    return V2_SIGNATURE + bytes([command, kind if command == 0x21 else 0]) + \
        struct.pack("!H", len(body)) + body


# Two TLVs (PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY) the server must skip.
TLVS = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com"
PEER = get("/peer")


def peer_of(reply) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client, server) of a /peer response, ports as ints (None when absent)."""
    shown = reply.json()
    client = (shown["client"][0], int(shown["client"][1]) if shown["client"][1] else None)
    server = (shown["server"][0], int(shown["server"][1]))
    return client, server


def ask(port: int, *parts: bytes) -> tuple[socket.socket, Stream]:
    """A connection to ``port`` with ``parts`` sent one after the other."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for index, part in enumerate(parts):
        if index:
            time.sleep(SPLIT_PAUSE)
        sock.sendall(part)
    return sock, Stream(sock)


def once(port: int, *parts: bytes):
    sock, stream = ask(port, *parts)
    with sock:
        return stream.response()


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def proxied(interface, tmp_path_factory):
    """proxy_protocol on; 127.0.0.1 trusted (forwarded_allow_ips' default)."""
    directory = tmp_path_factory.mktemp(f"proxied-{interface}")
    server = start_http_server(interface, directory, "--proxy-protocol",
                               "--client-timeout", "2", "--access-log", "-")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def untrusted(interface, tmp_path_factory):
    """proxy_protocol on; the test client's 127.0.0.1 not trusted."""
    directory = tmp_path_factory.mktemp(f"untrusted-{interface}")
    server = start_http_server(interface, directory, "--proxy-protocol",
                               "--forwarded-allow-ips", "192.0.2.1")
    yield server
    stop_server(server)


# ---------------------------------------------------------------- trusted peer


@pytest.mark.parametrize(("header", "client", "server"), [
    (v1(), CLIENT4, SERVER4),
    (v1(CLIENT6, SERVER6, "TCP6"), CLIENT6, SERVER6),
    (v2(tlvs=TLVS), CLIENT4, SERVER4),
    (v2(CLIENT6, SERVER6, tlvs=TLVS), CLIENT6, SERVER6),
], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4-tlvs", "v2-tcp6-tlvs"])
def test_header_sets_client_and_server(proxied, header, client, server):
    reply = once(proxied.port, header + PEER)
    assert reply.status == 200
    assert peer_of(reply) == (client, server)


@pytest.mark.parametrize("header", [v1(family="UNKNOWN"), b"PROXY UNKNOWN\r\n",
                                    v2(command=0x20), v2(command=0x20, tlvs=TLVS)],
                         ids=["v1-unknown-full", "v1-unknown", "v2-local", "v2-local-tlvs"])
def test_local_and_unknown_keep_the_socket_addresses(proxied, header):
    sock, stream = ask(proxied.port, header + PEER)
    with sock:
        reply = stream.response()
        mine = sock.getsockname()
    assert reply.status == 200
    client, server = peer_of(reply)
    assert client == ("127.0.0.1", mine[1])
    assert server[1] == proxied.port


@pytest.mark.parametrize("header", [v1(), v2(CLIENT6, SERVER6, tlvs=TLVS)], ids=["v1", "v2"])
def test_header_split_at_every_byte(proxied, header):
    """The header in two reads at each of its offsets (and the request in
    the second), then the header alone before the request."""
    for cut in range(1, len(header)):
        reply = once(proxied.port, header[:cut], header[cut:] + PEER)
        assert reply.status == 200, cut
        assert peer_of(reply)[0] == (CLIENT4 if header.startswith(b"PROXY") else CLIENT6), cut
    reply = once(proxied.port, header, PEER)
    assert reply.status == 200


def test_keep_alive_keeps_the_proxied_client(proxied):
    sock, stream = ask(proxied.port, v2() + PEER)
    with sock:
        assert peer_of(stream.response())[0] == CLIENT4
        sock.sendall(PEER + PEER)
        assert peer_of(stream.response())[0] == CLIENT4
        assert peer_of(stream.response())[0] == CLIENT4


def test_forwarded_for_applies_on_top(proxied):
    reply = once(proxied.port, v1() + get("/peer", extra="X-Forwarded-For: 192.0.2.99\r\n"))
    assert peer_of(reply)[0][0] == "192.0.2.99"


def test_access_log_has_the_proxied_client(proxied):
    once(proxied.port, v1(("192.0.2.55", 1234)) + get("/peer?logged"))
    wait_for(lambda: '192.0.2.55 - - [' in proxied.log and "/peer?logged" in proxied.log)


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize("data", [
    PEER,                                                        # no header at all
    b"garbage\r\n\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n" + PEER,                # unknown protocol
    b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n" + PEER,              # bad address
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n" + PEER,            # bad port
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n" + PEER,                # v4 address as TCP6
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + PEER,                  # bare LF
    b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n" + PEER,             # v1 too long
    V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + bytes(12) + PEER,   # bad signature
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12) + PEER,      # version 1 in a v2 header
    V2_SIGNATURE + b"\x2f\x11\x00\x0c" + bytes(12) + PEER,      # unknown command
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4) + PEER,       # addresses cut short
], ids=["none", "garbage", "v1-protocol", "v1-address", "v1-port", "v1-family", "v1-lf",
        "v1-long", "v2-signature", "v2-version", "v2-command", "v2-short"])
def test_invalid_header_is_400(proxied, data):
    replies = exchange(proxied.port, data)
    assert [r.status for r in replies] == [400]
    assert b"/peer" not in replies[0].body


def test_stalled_header_is_closed_at_client_timeout(proxied):
    sock, stream = ask(proxied.port, b"PROXY TCP4 1.2.3.4")
    with sock:
        started = time.monotonic()
        assert stream.until_eof() == b""
        assert 1 < time.monotonic() - started < 8


def test_without_proxy_protocol_the_header_is_a_bad_request(interface, tmp_path):
    server = start_http_server(interface, tmp_path)
    try:
        replies = exchange(server.port, v1() + PEER)
        assert [r.status for r in replies] == [400]
    finally:
        stop_server(server)


def test_unix_listener(interface, serve):
    """On a unix socket (its peers trusted only with '*')."""
    directory = Path(tempfile.mkdtemp(prefix="fp-pp-"))     # (short: sun_path's limit)
    path = directory / "s"
    try:
        serve(HTTP_APPS[interface], "--interface", interface, "--bind", f"unix:{path}",
              "--proxy-protocol", "--forwarded-allow-ips", "*")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(v2(CLIENT6, SERVER6) + PEER)
            reply = Stream(sock).response()
        assert peer_of(reply) == (CLIENT6, SERVER6)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(PEER)
            assert Stream(sock).response().status == 400
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- untrusted peer


def test_untrusted_peer_header_is_consumed_and_ignored(untrusted):
    for header in (v1(), v2(tlvs=TLVS), v2(CLIENT6, SERVER6)):
        sock, stream = ask(untrusted.port, header + PEER)
        with sock:
            reply = stream.response()
            mine = sock.getsockname()
        assert reply.status == 200
        client, server = peer_of(reply)
        assert client == ("127.0.0.1", mine[1])
        assert server[1] == untrusted.port
    wait_for(lambda: "PROXY protocol header from 127.0.0.1 ignored" in untrusted.log)
    assert untrusted.log.count("PROXY protocol header from") == 1     # once per worker
    assert [r.status for r in exchange(untrusted.port, PEER)] == [400]   # still required


# ---------------------------------------------------------------- routes


def test_routed_connection_keeps_the_proxied_client(tmp_path_factory):
    """web (WSGI, proxy_protocol) hands /tast to task (WSGI) and /api to api
    (ASGI): both see the header's client, on later requests too."""
    factory, directory = new_clusters(tmp_path_factory, "proxied-routes")
    chosen = ports("web")
    text = render(groups={
        "web": group(chosen["web"], 1, app="apps_routes:web", proxy_protocol=True),
        "task": routed_group("apps_routes:task", ["/tast"], 1),
        "api": routed_group("apps_routes:api", ["/api"], 1)})
    server = factory.start(text, workers=3, ports=chosen)
    try:
        server.wait_group("task", 1)
        server.wait_group("api", 1)
        sock, stream = ask(chosen["web"], v1() + get("/tast/a"))
        with sock:
            seen = [stream.response().json()]
            for target in ("/api/b", "/c", "/tast/d"):
                sock.sendall(get(target))
                seen.append(stream.response().json())
        assert [s["group"] for s in seen] == ["task", "api", "web", "task"]
        assert {(s["client_host"], s["client_port"]) for s in seen} == {CLIENT4}
    finally:
        factory.close()


# ---------------------------------------------------------------- TLS


def test_tls_listener_header_before_client_hello(interface, tmp_path):
    certs = Certs(tmp_path)
    port = free_port()
    server = Server([HTTP_APPS[interface], "--interface", interface, "--proxy-protocol",
                     "--tls-bind", f"127.0.0.1:{port}", "--certfile", certs["server_cert"],
                     "--keyfile", certs["server_key"]],
                    port=None, workers=1, env=None, cwd=tmp_path, log_path=tmp_path / "log")
    try:
        server.wait_ready()     # (the master listens before its workers boot)
        for header, client in ((v1(), CLIENT4), (v2(CLIENT6, SERVER6, tlvs=TLVS), CLIENT6)):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.sendall(header)
            with certs.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(PEER)
                reply = Stream(tls).response()
            assert reply.status == 200
            assert peer_of(reply)[0] == client
        # A ClientHello without the header: 400 (in plain text), no handshake.
        data = raw_request(port, b"\x16\x03\x01\x00\x05hello")
        assert data.startswith(b"HTTP/1.1 400 ")
    finally:
        stop_server(server)


def test_parser_directly():
    """The compiled parse (both workers' one function): need more, length and
    addresses, error."""
    from fastpool._http import parse_proxy_header

    assert parse_proxy_header(b"PROXY TCP4 1.2") == (0, None, None)
    assert parse_proxy_header(v1() + b"GET") == (len(v1()), CLIENT4, SERVER4)
    assert parse_proxy_header(v2(tlvs=TLVS))[0] == len(v2(tlvs=TLVS))
    assert parse_proxy_header(b"GET / HTTP/1.1\r\n")[0] == -1
    header = v2(CLIENT6, SERVER6, tlvs=TLVS)
    assert all(parse_proxy_header(header[:cut]) == (0, None, None)
               for cut in range(len(header)))
    assert parse_proxy_header(Path(__file__).read_bytes()[:200])[0] == -1

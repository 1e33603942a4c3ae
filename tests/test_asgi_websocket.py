"""WebSocket in the ASGI worker, against the real ``fastpool serve``.

Two single-worker servers are shared by the module: ``apps_asgi:app`` (plain
ASGI 3) with a small ``--ws-max-size`` and quick server pings, and the
Starlette app with every WebSocket setting at its default.  The client is the
``websockets`` package's sync client (permessage-deflate off, its own keepalive
off, no proxy), or a raw socket where a test must see or withhold control
frames.  What the app received (its ``websocket.disconnect``) is a file it
writes in the server's working directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator

import pytest
from client import Response, Stream
from conftest import Server, record, start_server, stop_server, wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

MAX_SIZE = 65536            # --ws-max-size of the plain app's server
PING_INTERVAL = 0.5         # its --ws-ping-interval
PING_TIMEOUT = 1.0          # its --ws-ping-timeout
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server("apps_asgi:app", tmp_path_factory.mktemp("ws"),
                       "--ws-max-size", str(MAX_SIZE), "--ws-ping-interval", str(PING_INTERVAL),
                       "--ws-ping-timeout", str(PING_TIMEOUT))
    yield srv
    stop_server(srv)


@pytest.fixture(params=["plain", "starlette"])
def echo(request: pytest.FixtureRequest) -> tuple[Server, str]:
    """(server, path) of an echo endpoint: the plain ASGI app's or Starlette's."""
    if request.param == "plain":
        return request.getfixturevalue("ws_server"), "/ws/echo"
    return request.getfixturevalue("starlette_server"), "/ws"


# ---------------------------------------------------------------- helpers


def ws_connect(server: Server, path: str, **options) -> ClientConnection:
    settings = {"compression": None, "proxy": None, "ping_interval": None,
                "open_timeout": 10, "close_timeout": 5}
    settings.update(options)
    return connect(f"ws://{server.host}:{server.port}{path}", **settings)


def close_frame(ws: ClientConnection, timeout: float = 10.0):
    """Receive until the connection closes; the Close frame the server sent."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    assert info.value.rcvd is not None, f"closed without a Close frame: {info.value!r}"
    return info.value.rcvd


def send_then_close_frame(ws: ClientConnection, message) -> object:
    """Send ``message``, which the server refuses; the Close frame it sent.  The
    refusal may come while the client is still sending (a fragmented message)."""
    try:
        ws.send(message)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, f"closed without a Close frame: {exc!r}"
        return exc.rcvd
    return close_frame(ws)


def assert_worker_still_serves(server: Server, log_from: int = 0) -> None:
    """The worker is the one that booted, it answers a new session, and the log
    (from ``log_from``) has no error."""
    with ws_connect(server, "/ws/echo") as ws:
        ws.send("still serving")
        assert ws.recv(timeout=5) == "still serving"
    assert len(server.booted_workers()) == 1, server.log
    assert server.proc.poll() is None
    log = server.log[log_from:]
    for bad in ("Traceback", "[ERROR]", "Exception", "Fatal error"):
        assert bad not in log, log


class RawWebSocket:
    """A WebSocket client on a plain socket: it sends and sees every frame as it is."""

    def __init__(self, server: Server, path: str, timeout: float = 10.0, *,
                 extra_headers: str = "", early: bytes = b"", wait: bool = True) -> None:
        """``extra_headers``: header lines (each ending in CRLF) for the handshake;
        ``early``: bytes sent in the same write as the handshake; ``wait=False``:
        return without reading the 101 (call ``handshake`` later)."""
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.sock = server.connect(timeout)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra_headers}\r\n".encode() + early)
        self.stream = Stream(self.sock, timeout)
        if wait:
            self.handshake()

    def handshake(self) -> Response:
        head = self.stream.head()
        assert head.status == 101, head
        expected = base64.b64encode(hashlib.sha1((self.key + GUID).encode()).digest()).decode()
        assert head.header("sec-websocket-accept") == expected
        self.head = head
        return head

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # also ends a sendall blocked in a thread
        except OSError:
            pass
        self.sock.close()

    def frame(self, timeout: float) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame; EOFError when the server has closed."""
        first, payload = self.frame_with_flags(timeout)
        return first & 0x0F, payload

    def frame_with_flags(self, timeout: float) -> tuple[int, bytes]:
        """(first byte: FIN, RSV1-3 and opcode; payload) of the next frame."""
        self.sock.settimeout(timeout)
        first, second = self.stream.exact(2)
        assert not second & 0x80, "a server frame must not be masked"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self.stream.exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self.stream.exact(8))
        return first, self.stream.exact(length)

    def next_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame that is not one of the server's keepalive pings."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.frame_with_flags(max(0.01, deadline - time.monotonic()))
            if frame[0] & 0x0F != PING:
                return frame

    def close_code(self, timeout: float = 10.0) -> int | None:
        """The code of the server's Close frame (None for a close without one),
        once the server has also closed the TCP connection."""
        deadline = time.monotonic() + timeout
        code = None
        try:
            while True:
                first, payload = self.next_frame(max(0.01, deadline - time.monotonic()))
                assert first & 0x0F == CLOSE, f"a frame other than Close: {first:#x} {payload!r}"
                assert code is None, "a second Close frame"
                code = struct.unpack("!H", payload[:2])[0]
        except (EOFError, ConnectionResetError):
            return code

    @staticmethod
    def encode(opcode: int, payload: bytes, length: int | None = None) -> bytes:
        """A masked client frame; ``length`` may claim more than ``payload`` holds."""
        return RawWebSocket.build(0x80 | opcode, payload, length)

    @staticmethod
    def build(first: int, payload: bytes, length: int | None = None,
              masked: bool = True) -> bytes:
        """A client frame with ``first`` as its first byte (FIN, RSV1-3, opcode)."""
        length = len(payload) if length is None else length
        mask_bit = 0x80 if masked else 0
        if length < 126:
            head = struct.pack("!BB", first, mask_bit | length)
        elif length < 65536:
            head = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, length)
        if not masked:
            return head + payload
        mask = os.urandom(4)
        size = len(payload)
        key = (mask * (size // 4 + 1))[:size]
        masked_payload = (int.from_bytes(payload, "big")
                          ^ int.from_bytes(key, "big")).to_bytes(size, "big")
        return head + mask + masked_payload

    def send(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(self.encode(opcode, payload))


PING, PONG, TEXT, CLOSE = 0x9, 0xA, 0x1, 0x8


# ---------------------------------------------------------------- echo and scope


def test_echo_text_and_binary(echo):
    server, path = echo
    with ws_connect(server, path) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send("héllo ✓ wörld")
        assert ws.recv(timeout=5) == "héllo ✓ wörld"
        ws.send(b"\x00\x01\xffbinary")
        assert ws.recv(timeout=5) == b"\x00\x01\xffbinary"
        big = os.urandom(60000)
        ws.send(big)
        assert ws.recv(timeout=5) == big
        # Several messages in flight at once come back in order, each with its type.
        messages = [f"text {i}" if i % 2 else f"bytes {i}".encode() for i in range(20)]
        for message in messages:
            ws.send(message)
        assert [ws.recv(timeout=5) for _ in messages] == messages


def test_websocket_scope(ws_server):
    sock = ws_server.connect()
    client_port = sock.getsockname()[1]   # before the app's close can close the socket
    with ws_connect(ws_server, "/ws/scope?x=1", sock=sock) as ws:
        scope = json.loads(ws.recv(timeout=5))
        assert close_frame(ws).code == 1000
    assert scope["type"] == "websocket"
    assert scope["asgi"]["version"] == "3.0"
    assert scope["http_version"] == "1.1"
    assert scope["scheme"] == "ws"
    assert scope["path"] == "/ws/scope"
    assert scope["raw_path"] == {"bytes": "/ws/scope"}
    assert scope["query_string"] == {"bytes": "x=1"}
    assert scope["root_path"] == ""
    assert scope["subprotocols"] == []
    assert scope["client"] == ["127.0.0.1", client_port]
    assert scope["server"] == ["127.0.0.1", ws_server.port]
    names = [name["bytes"] for name, _ in scope["headers"]]
    assert "host" in names and "sec-websocket-key" in names, names


@pytest.mark.parametrize(("offered", "chosen"), [
    (["chat.v1", "chat.v2"], "chat.v2"),
    (["chat.v1"], "chat.v1"),
    ([], None),
])
def test_subprotocol_negotiation(ws_server, offered, chosen):
    with ws_connect(ws_server, "/ws/subprotocol", subprotocols=offered or None) as ws:
        assert ws.subprotocol == chosen
        assert json.loads(ws.recv(timeout=5)) == offered


# ---------------------------------------------------------------- closing


def test_app_closes_with_a_code_and_reason(ws_server):
    with ws_connect(ws_server, "/ws/close?code=4001&reason=bye+now") as ws:
        frame = close_frame(ws)
    assert (frame.code, frame.reason) == (4001, "bye now")


def test_app_closing_before_accept_is_a_403(ws_server):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_server, "/ws/reject")
    assert info.value.response.status_code == 403


@pytest.mark.parametrize("code", [1000, 4321])
def test_client_close_reaches_the_app_with_its_code(ws_server, code):
    tag = uuid.uuid4().hex
    with ws_connect(ws_server, f"/ws/echo?tag={tag}") as ws:
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
        ws.close(code=code, reason="client done")
    assert record(ws_server, f"ws-disconnect-{tag}")["code"] == code


def test_sigterm_closes_an_open_websocket_with_1012(serve):
    server = serve("apps_asgi:app")
    with ws_connect(server, "/ws/echo") as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        server.proc.send_signal(signal.SIGTERM)
        frame = close_frame(ws, timeout=10)
    assert frame.code == 1012
    code = server.proc.wait(15)
    assert code == 0, server.log


# ---------------------------------------------------------------- size limit


def test_message_at_the_size_limit_is_echoed(ws_server):
    with ws_connect(ws_server, "/ws/echo") as ws:
        data = os.urandom(MAX_SIZE)
        ws.send(data)
        assert ws.recv(timeout=5) == data


@pytest.mark.parametrize("kind", ["bytes", "text"])
def test_message_over_the_size_limit_closes_with_1009(ws_server, kind):
    with ws_connect(ws_server, "/ws/echo") as ws:
        ws.send("small")
        assert ws.recv(timeout=5) == "small"
        big = b"b" * (MAX_SIZE + 1) if kind == "bytes" else "t" * (MAX_SIZE + 1)
        assert send_then_close_frame(ws, big).code == 1009


def test_fragmented_message_over_the_size_limit_closes_with_1009(ws_server):
    """The limit is on the message, not on each frame of it."""
    with ws_connect(ws_server, "/ws/echo") as ws:
        third = MAX_SIZE // 3 + 1
        fragments = [b"x" * third, b"y" * third, b"z" * third]   # one message
        assert send_then_close_frame(ws, fragments).code == 1009


def test_default_size_limit_is_16_mib(starlette_server):
    with ws_connect(starlette_server, "/ws", max_size=None) as ws:
        data = os.urandom(2 * 1024 * 1024)
        ws.send(data)
        assert ws.recv(timeout=10) == data
    # One frame that claims 16 MiB + 1: sent from a thread (the server may stop
    # reading it) while this one waits for the Close frame.
    raw = RawWebSocket(starlette_server, "/ws")
    payload = b"p" * (DEFAULT_MAX_SIZE + 1)

    def send_all() -> None:
        try:
            raw.sock.sendall(RawWebSocket.encode(0x2, payload))
        except OSError:
            pass

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            opcode, body = raw.frame(timeout=max(0.01, deadline - time.monotonic()))
            if opcode == CLOSE:
                break
        assert struct.unpack("!H", body[:2])[0] == 1009
    finally:
        raw.close()
        sender.join(10)


# ---------------------------------------------------------------- ping and pong


def test_client_ping_gets_a_pong(echo):
    server, path = echo
    with ws_connect(server, path) as ws:
        assert ws.ping(b"are you there").wait(5), "no pong within 5s"
        ws.send("after the ping")
        assert ws.recv(timeout=5) == "after the ping"


def test_server_pings_an_idle_client(ws_server):
    raw = RawWebSocket(ws_server, "/ws/echo")
    try:
        started = time.monotonic()
        opcode, payload = raw.frame(timeout=5)
        first_at = time.monotonic() - started
        assert opcode == PING, (opcode, payload)
        assert first_at < 3 * PING_INTERVAL + 1, f"first ping after {first_at:.2f}s"
        raw.send(PONG, payload)
        raw.send(TEXT, b"still here")
        frames = []
        while True:
            opcode, data = raw.frame(timeout=5)
            frames.append(opcode)
            if opcode == TEXT:
                assert data == b"still here"
                break
            assert opcode == PING, frames
        # Answered pings keep coming and keep the connection open.
        while (frame := raw.frame(timeout=5))[0] != PING:
            assert frame[0] == TEXT, frame
        raw.send(PONG, frame[1])
    finally:
        raw.close()


def test_client_that_never_answers_pings_is_disconnected(ws_server):
    raw = RawWebSocket(ws_server, "/ws/echo")
    try:
        started = time.monotonic()
        opcodes = []
        while True:
            try:
                opcode, _ = raw.frame(timeout=10)
            except (EOFError, ConnectionResetError):
                break
            opcodes.append(opcode)
            if opcode == CLOSE:
                break
        gone_after = time.monotonic() - started
    finally:
        raw.close()
    assert PING in opcodes
    assert 0.8 * PING_TIMEOUT < gone_after < PING_INTERVAL + PING_TIMEOUT + 4, (
        f"an unanswered client was dropped after {gone_after:.2f}s "
        f"(--ws-ping-interval {PING_INTERVAL}, --ws-ping-timeout {PING_TIMEOUT})")


def test_idle_client_that_answers_pings_stays_connected(ws_server):
    # The client sends no pings of its own; it answers the server's.
    with ws_connect(ws_server, "/ws/echo") as ws:
        with pytest.raises(TimeoutError):
            ws.recv(timeout=2.0)
        ws.send("still open")
        assert ws.recv(timeout=5) == "still open"


def test_plain_socket_upgrade_and_frames(ws_server):
    """The handshake and one echo, byte by byte on the wire (no client library)."""
    raw = RawWebSocket(ws_server, "/ws/echo")
    try:
        raw.send(TEXT, b"raw hello")
        while (frame := raw.frame(timeout=5))[0] == PING:
            raw.send(PONG, frame[1])
        assert frame == (TEXT, b"raw hello")
        raw.send(CLOSE, struct.pack("!H", 1000))
        while (frame := raw.frame(timeout=5))[0] == PING:
            pass
        assert frame[0] == CLOSE and struct.unpack("!H", frame[1][:2])[0] == 1000
    finally:
        raw.close()


# ---------------------------------------------------------------- access log

ACCESS_LINE = re.compile(
    r'^127\.0\.0\.1 - - \[[^\]]+\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$', re.M)


def access_lines(server: Server) -> list[dict[str, str]]:
    return [m.groupdict() for m in ACCESS_LINE.finditer(server.log)]


def test_access_log_has_one_line_per_websocket_session(serve):
    server = serve("apps_asgi:app", "--access-log", "-")
    with ws_connect(server, "/ws/echo?room=1", user_agent_header="ws-agent/1.0",
                    additional_headers={"Referer": "http://example.test/chat"}) as ws:
        # The line is written when the handshake is answered, while the session is open.
        line = wait_for(lambda: access_lines(server), what=f"an access log line:\n{server.log}")
        assert line == [{"request": "GET /ws/echo?room=1 HTTP/1.1", "status": "101",
                         "size": "-", "referer": "http://example.test/chat",
                         "agent": "ws-agent/1.0"}]
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    # Closed before the accept: the 403 and its body's size.
    with pytest.raises(InvalidStatus) as info:
        ws_connect(server, "/ws/reject", user_agent_header="rejected-agent")
    body = info.value.response.body
    # A handshake websockets refuses (no Sec-WebSocket-Key): the 400 it sends.
    with server.connect() as sock:
        sock.sendall(b"GET /ws/echo?bad HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
        refused = Stream(sock).response()
    assert refused.status == 400
    lines = wait_for(lambda: len(access_lines(server)) >= 3 and access_lines(server),
                     what=f"3 access log lines:\n{server.log}")
    assert lines[1] == {"request": "GET /ws/reject HTTP/1.1", "status": "403",
                        "size": str(len(body)), "referer": "-", "agent": "rejected-agent"}
    assert lines[2]["request"] == "GET /ws/echo?bad HTTP/1.1"
    assert (lines[2]["status"], lines[2]["size"]) == ("400", str(len(refused.body)))
    assert server.stop() == 0
    assert len(access_lines(server)) == 3, server.log   # nothing more when sessions end


# ---------------------------------------------------------------- permessage-deflate

# Without client_max_window_bits: this client compresses with 15-bit windows.
DEFLATE_OFFER = "Sec-WebSocket-Extensions: permessage-deflate\r\n"


def deflate(data: bytes) -> bytes:
    """A message's payload compressed as RFC 7692 says (no trailing 00 00 ff ff)."""
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")


def test_permessage_deflate_is_negotiated_by_default(ws_server):
    with ws_connect(ws_server, "/ws/echo", compression="deflate") as ws:
        offered = ws.response.headers.get("Sec-WebSocket-Extensions") or ""
        assert offered.startswith("permessage-deflate"), ws.response.headers
        text = "fastpool compresses this line. " * 2000          # ~60 KB, repetitive
        ws.send(text)
        assert ws.recv(timeout=5) == text
        # The limit applies to the decompressed size: at the limit still passes.
        at_limit = b"z" * MAX_SIZE
        ws.send(at_limit)
        assert ws.recv(timeout=5) == at_limit
        ws.send(b"\x00\x01 binary too")
        assert ws.recv(timeout=5) == b"\x00\x01 binary too"


def test_messages_are_compressed_on_the_wire(ws_server):
    """Byte by byte: a compressed frame (RSV1) in, a compressed echo out."""
    raw = RawWebSocket(ws_server, "/ws/echo", extra_headers=DEFLATE_OFFER)
    try:
        assert (raw.head.header("sec-websocket-extensions") or "").startswith(
            "permessage-deflate"), raw.head
        text = ("the same words again and again " * 1500).encode()
        payload = deflate(text)
        assert len(payload) < len(text) // 20
        raw.sock.sendall(RawWebSocket.build(0x80 | 0x40 | TEXT, payload))
        first, echoed = raw.next_frame()
        assert first & 0x0F == TEXT and first & 0x80, hex(first)
        assert first & 0x40, "the echo is not compressed (RSV1 clear)"
        assert len(echoed) < len(text) // 20
        assert inflate(echoed) == text
        raw.send(CLOSE, struct.pack("!H", 1000))
        assert raw.close_code() == 1000
    finally:
        raw.close()


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_permessage_deflate_can_be_turned_off(serve, how):
    if how == "flag":
        server = serve("apps_asgi:app", "--no-ws-per-message-deflate")
    else:
        server = serve("apps_asgi:app", env={"FASTPOOL_WS_PER_MESSAGE_DEFLATE": "false"})
    with ws_connect(server, "/ws/echo", compression="deflate") as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers, ws.response.headers
        text = "not compressed " * 1000
        ws.send(text)
        assert ws.recv(timeout=5) == text
    # A frame with RSV1 set is then a protocol error.
    raw = RawWebSocket(server, "/ws/echo", extra_headers=DEFLATE_OFFER)
    try:
        assert raw.head.header("sec-websocket-extensions") is None, raw.head
        raw.sock.sendall(RawWebSocket.build(0x80 | 0x40 | TEXT, deflate(b"x" * 100)))
        assert raw.close_code() == 1002
    finally:
        raw.close()


def test_compressed_message_that_inflates_past_the_limit_closes_with_1009(ws_server):
    raw = RawWebSocket(ws_server, "/ws/echo", extra_headers=DEFLATE_OFFER)
    try:
        bomb = deflate(b"\x00" * (8 * MAX_SIZE))
        assert len(bomb) < MAX_SIZE // 100         # the frame itself is small
        raw.sock.sendall(RawWebSocket.build(0x80 | 0x40 | 0x2, bomb))
        assert raw.close_code() == 1009
    finally:
        raw.close()
    assert_worker_still_serves(ws_server)


# ---------------------------------------------------------------- malformed frames


def frame(first: int, payload: bytes = b"", **options) -> bytes:
    return RawWebSocket.build(first, payload, **options)


FIN = 0x80
MALFORMED = {
    # name: (bytes after the handshake, the Close code the server sends)
    "reserved opcode 0x3": (frame(FIN | 0x3, b"x"), 1002),
    "reserved control opcode 0xB": (frame(FIN | 0xB, b"x"), 1002),
    "unmasked client frame": (frame(FIN | TEXT, b"hello", masked=False), 1002),
    "RSV1 without an extension": (frame(FIN | 0x40 | TEXT, b"hello"), 1002),
    "RSV2 set": (frame(FIN | 0x20 | 0x2, b"hello"), 1002),
    "control frame over 125 bytes": (frame(FIN | PING, b"p" * 126), 1002),
    "fragmented control frame": (frame(PING, b"p"), 1002),
    "continuation without a first frame": (frame(FIN | 0x0, b"x"), 1002),
    "new message inside a fragmented one": (frame(TEXT, b"a") + frame(FIN | TEXT, b"b"), 1002),
    "close frame with a 1-byte payload": (frame(FIN | CLOSE, b"\x03"), 1002),
    "close frame with code 1005": (frame(FIN | CLOSE, struct.pack("!H", 1005)), 1002),
    "close frame with code 999": (frame(FIN | CLOSE, struct.pack("!H", 999)), 1002),
    "close reason not UTF-8": (frame(FIN | CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    "text not UTF-8": (frame(FIN | TEXT, b"ok \xff\xfe"), 1007),
    "fragmented text not UTF-8": (frame(TEXT, b"\xe2\x82") + frame(FIN, b"\x28"), 1007),
    # Only the head: the claimed length alone is refused.
    "frame over ws_max_size": (frame(FIN | 0x2, b"", length=MAX_SIZE + 1), 1009),
    "64-bit length with the top bit set": (
        struct.pack("!BBQ", FIN | 0x2, 0x80 | 127, 1 << 63) + os.urandom(4), 1009),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_frame_fails_the_connection(ws_server, case):
    data, code = MALFORMED[case]
    log_from = len(ws_server.log)
    tag = uuid.uuid4().hex
    raw = RawWebSocket(ws_server, f"/ws/echo?tag={tag}")
    try:
        raw.sock.sendall(data)
        assert raw.close_code() == code
    finally:
        raw.close()
    assert record(ws_server, f"ws-disconnect-{tag}")["code"] == code
    assert_worker_still_serves(ws_server, log_from)


def test_malformed_frame_sent_with_the_handshake(ws_server):
    """Frames that arrive with the handshake are checked once the app accepts."""
    log_from = len(ws_server.log)
    raw = RawWebSocket(ws_server, "/ws/echo", early=frame(FIN | 0x3, b"x"))
    try:
        assert raw.close_code() == 1002
    finally:
        raw.close()
    assert_worker_still_serves(ws_server, log_from)


def test_nothing_after_a_failing_frame_reaches_the_app(ws_server):
    """A bad frame fails the connection: a message after it in the same packet
    is not delivered (nor echoed)."""
    log_from = len(ws_server.log)
    tag = uuid.uuid4().hex
    raw = RawWebSocket(ws_server, f"/ws/echo?tag={tag}")
    try:
        raw.sock.sendall(frame(FIN | TEXT, b"first") + frame(FIN | TEXT, b"\xff bad")
                         + frame(FIN | TEXT, b"after the bad one"))
        while (frame_ := raw.next_frame())[0] & 0x0F == TEXT:
            assert frame_[1] == b"first"      # the echo may beat the Close frame, or not
        assert frame_[0] & 0x0F == CLOSE and struct.unpack("!H", frame_[1][:2])[0] == 1007
        assert raw.close_code() is None       # then the end of the stream
    finally:
        raw.close()
    seen = record(ws_server, f"ws-disconnect-{tag}")
    assert seen["code"] == 1007
    assert seen["received"] == ["'first'"]
    assert_worker_still_serves(ws_server, log_from)


def test_truncated_frame_then_eof_is_a_plain_close(ws_server):
    log_from = len(ws_server.log)
    tag = uuid.uuid4().hex
    raw = RawWebSocket(ws_server, f"/ws/echo?tag={tag}")
    try:
        # A head that claims 100 bytes, 10 of them, then the client's EOF.
        raw.sock.sendall(frame(FIN | 0x2, b"0123456789", length=100)[:2 + 4 + 10])
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.close_code() is None     # no Close frame: the stream just ends
    finally:
        raw.close()
    assert record(ws_server, f"ws-disconnect-{tag}")["code"] == 1006
    assert_worker_still_serves(ws_server, log_from)


@pytest.mark.parametrize("when", ["same packet", "after the echo"])
def test_garbage_after_the_close_frame_is_ignored(ws_server, when):
    log_from = len(ws_server.log)
    tag = uuid.uuid4().hex
    raw = RawWebSocket(ws_server, f"/ws/echo?tag={tag}")
    garbage = b"\xff\x00 not a frame " * 50
    try:
        close = frame(FIN | CLOSE, struct.pack("!H", 1000) + b"bye")
        if when == "same packet":
            raw.sock.sendall(close + garbage)
        else:
            raw.sock.sendall(close)
            first, payload = raw.next_frame()
            assert first & 0x0F == CLOSE and payload == struct.pack("!H", 1000) + b"bye"
            try:
                raw.sock.sendall(garbage)
            except OSError:
                pass                         # the server may have closed already
        code = raw.close_code()
        assert code == (1000 if when == "same packet" else None)
    finally:
        raw.close()
    assert record(ws_server, f"ws-disconnect-{tag}")["code"] == 1000
    assert_worker_still_serves(ws_server, log_from)


def test_bytes_sent_before_the_accept_are_bounded(ws_server):
    """A client that sends frames before the 101 (the app has not accepted yet)
    is not read without limit: the server stops reading until the accept."""
    tag = uuid.uuid4().hex
    release = ws_server.log_path.parent / f"release-{tag}"
    raw = RawWebSocket(ws_server, f"/ws/accept-on-release?tag={tag}", wait=False)
    total = 64 * 1024 * 1024
    chunk = RawWebSocket.encode(0x2, b"e" * 65536)   # within MAX_SIZE, each echoed later
    sent = [0]
    stop = threading.Event()

    def flood() -> None:
        raw.sock.settimeout(0.2)
        view, position = memoryview(chunk), 0
        while sent[0] < total and not stop.is_set():
            try:
                count = raw.sock.send(view[position:])
            except TimeoutError:
                continue
            except OSError:
                return
            sent[0] += count
            position = (position + count) % len(chunk)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        # Wait until the sender stalls: the server no longer reads.
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + 20
        while time.monotonic() - still_since < 1.0:
            assert sent[0] < total, "the server read 64 MiB sent before its 101"
            assert time.monotonic() < deadline, f"the sender never stalled ({sent[0]} bytes)"
            if sent[0] != last:
                last, still_since = sent[0], time.monotonic()
            time.sleep(0.05)
        assert sent[0] < 32 * 1024 * 1024, sent[0]
        stop.set()
        sender.join(10)
        # Once the app accepts, the frames it held back are served in order.
        release.write_text("")
        raw.sock.settimeout(10)
        raw.handshake()
        for _ in range(3):
            first, payload = raw.next_frame()
            assert (first & 0x0F, payload) == (0x2, b"e" * 65536)
    finally:
        release.write_text("")     # (the app waits for it whatever happened)
        stop.set()
        raw.close()
        sender.join(10)
    assert_worker_still_serves(ws_server)

"""Requests over sockets: every client helper of the tests, once.

What it holds:

* request bytes: ``get``, ``post``, ``chunked``, ``chunked_post``;
* the suite's own strict reader of HTTP/1.x responses: ``Stream`` (reads
  responses one by one from a socket that may stay open, or from bytes already
  read) and the ``Response`` it returns;
* raw connections: ``connect`` (a socket and its ``Stream``), ``Client`` (one
  keep-alive connection, requests one at a time; ``Client.once``: one request
  with ``Connection: close``), ``raw_request``/``read_until_close`` (all the
  bytes until the server closes), ``parse_responses`` and ``exchange`` (those
  bytes as responses);
* requests through the standard library's ``http.client``: ``fetch`` (one
  request on a new connection, or on an open ``HTTPConnection``) and the
  ``Reply`` it returns, ``fetch_json``, ``worker_pid``, ``start_sleeper``;
* ``timed``: how long a call took.

Rules: ``where`` is a ``Server`` (its host and port) or a port on 127.0.0.1.
Every read has a timeout (10 s unless told) and every wait is a deadline
(``conftest.wait_for``), never a fixed sleep: a server that does not answer or
close in time fails the test, it never hangs it.  ``Stream`` never guesses:
it reads a body by its framing and fails on anything that is not HTTP/1.x.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from conftest import Server, wait_for

Where = Server | int
T = TypeVar("T")


def address(where: Where) -> tuple[str, int]:
    if isinstance(where, int):
        return "127.0.0.1", where
    return where.host, where.port


# ---------------------------------------------------------------- request bytes


def get(path: str, version: str = "1.1", method: str = "GET", extra: str = "") -> bytes:
    """A request without a body; ``extra``: more header lines, each ending in CRLF."""
    return f"{method} {path} HTTP/{version}\r\nHost: test\r\n{extra}\r\n".encode("latin-1")


def post(path: str, body: bytes, extra: str = "", method: str = "POST") -> bytes:
    """A request with a Content-Length body."""
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra}"
            "\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    """``parts`` in the chunked transfer coding (an empty part is left out), then
    the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


def chunked_post(path: str, *parts: bytes) -> bytes:
    """A POST whose body is ``parts``, chunked."""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .encode("latin-1") + chunked(*parts))


# ---------------------------------------------------------------- the strict reader


@dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[str, str]]          # names lower-cased, in the order sent
    body: bytes = b""
    chunks: list[int] = field(default_factory=list)   # the chunk sizes, when chunked
    complete: bool = True     # False: the server closed in the middle of the body

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return ", ".join(values) if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class Stream:
    """Reads responses one by one from a socket that may stay open (or, made with
    ``Stream.of``, from bytes already read from a connection that has closed)."""

    def __init__(self, sock: socket.socket | None, timeout: float = 10.0, *,
                 data: bytes = b"") -> None:
        self.sock = sock
        if sock is not None:
            sock.settimeout(timeout)
        self.buf = bytearray(data)
        self.eof = False

    @classmethod
    def of(cls, data: bytes) -> Stream:
        """A stream of ``data``, everything a server sent before it closed."""
        return cls(None, data=data)

    def _more(self) -> None:
        data = self.sock.recv(262144) if self.sock is not None else b""
        if not data:
            self.eof = True
            raise EOFError(f"server closed the connection; unparsed: {bytes(self.buf)[:200]!r}")
        self.buf += data

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._more()
        out = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return out

    def exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._more()
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def until_eof(self) -> bytes:
        try:
            while True:
                self._more()
        except (EOFError, ConnectionResetError):
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def at_end(self) -> bool:
        """Nothing is left to read and the server has closed (waits for the
        server's next bytes or its close when nothing is buffered)."""
        if self.buf:
            return False
        if self.eof:
            return True
        try:
            self._more()
        except (EOFError, ConnectionResetError):
            return True
        return False

    def head(self) -> Response:
        version, status, reason = (self.line().split(b" ", 2) + [b""])[:3]
        assert version.startswith(b"HTTP/1."), f"not a status line: {version!r}"
        headers = []
        while line := self.line():
            name, colon, value = line.partition(b":")
            assert colon, f"malformed header line {line!r}"
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        return Response(version, int(status), reason, headers)

    def response(self, method: str = "GET", *, cut_ok: bool = False) -> Response:
        """The next response, its body read by its framing.  ``cut_ok``: the server
        may close in the middle of the body (a response it could not finish); the
        body is then what arrived of it, and ``complete`` is False."""
        response = self.head()
        if method == "HEAD" or response.status < 200 or response.status in (204, 304):
            return response
        parts: list[bytes] = []
        in_data = False     # a close now cuts the body's own bytes (not a size line or CRLF)
        try:
            if (response.header("transfer-encoding") or "").lower() == "chunked":
                while size := int(self.line().split(b";")[0], 16):
                    in_data = True
                    parts.append(self.exact(size))
                    in_data = False
                    response.chunks.append(size)
                    assert self.exact(2) == b"\r\n", "chunk not followed by CRLF"
                while self.line():   # trailers
                    pass
            elif (length := response.header("content-length")) is not None:
                in_data = True
                parts.append(self.exact(int(length)))
            else:
                parts.append(self.until_eof())
        except EOFError:
            if not cut_ok:
                raise
            response.complete = False
            if in_data:
                parts.append(bytes(self.buf))
            self.buf.clear()
        response.body = b"".join(parts)
        return response

    def responses(self, method: str = "GET") -> list[Response]:
        """Every response until the server closes; the last may be cut short."""
        found = []
        while not self.at_end():
            found.append(self.response(method, cut_ok=True))
        return found

    def assert_closed(self, timeout: float = 5.0) -> None:
        """The server closes the connection within ``timeout`` and sends nothing more."""
        assert not self.buf, f"unexpected bytes after the response: {bytes(self.buf)[:200]!r}"
        if self.eof:
            return
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s") from None
        assert data == b"", f"unexpected bytes after the response: {data[:200]!r}"

    def assert_open(self, quiet: float) -> None:
        """Nothing arrives and the connection stays open for ``quiet`` seconds."""
        assert not self.buf
        self.sock.settimeout(quiet)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        raise AssertionError(f"expected an idle open connection, got {data[:200]!r}")


# ---------------------------------------------------------------- raw connections


def connect(where: Where, timeout: float = 10.0) -> tuple[socket.socket, Stream]:
    """A new connection and the ``Stream`` that reads its responses."""
    sock = socket.create_connection(address(where), timeout=timeout)
    return sock, Stream(sock, timeout)


class Client:
    """One keep-alive connection: requests one at a time."""

    def __init__(self, where: Where, timeout: float = 10.0) -> None:
        self.sock, self.stream = connect(where, timeout)
        self.port = self.sock.getsockname()[1]      # the client's own port

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, target: str, method: str = "GET", body: bytes = b"",
             extra: str = "") -> Response:
        """One request (a Content-Length body when there is one, or for POST and
        PUT) and its response."""
        if body or method in ("POST", "PUT"):
            self.sock.sendall(post(target, body, extra, method))
        else:
            self.sock.sendall(get(target, method=method, extra=extra))
        return self.stream.response(method)

    @classmethod
    def once(cls, where: Where, target: str, method: str = "GET", body: bytes = b"",
             timeout: float = 10.0) -> Response:
        """One request with ``Connection: close`` on a new connection."""
        with cls(where, timeout) as client:
            return client.send(target, method, body, "Connection: close\r\n")


def read_until_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes; fails if it does not close."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(
                f"server did not close the connection; got {b''.join(chunks)[:300]!r}") from None
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def raw_request(where: Where, data: bytes, *, half_close: bool = True,
                timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection, half-close it (unless ``half_close`` is
    False), and return all the server sent until it closed."""
    with socket.create_connection(address(where), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return read_until_close(sock, timeout)


def parse_responses(data: bytes) -> list[Response]:
    """Everything a server sent on one connection, as responses (the last may be
    cut short: ``complete`` is False)."""
    return Stream.of(data).responses()


def exchange(where: Where, data: bytes, *, half_close: bool = True,
             timeout: float = 10.0) -> list[Response]:
    """``raw_request``'s answer as responses."""
    return parse_responses(raw_request(where, data, half_close=half_close, timeout=timeout))


# ---------------------------------------------------------------- through http.client


class Reply(NamedTuple):
    """What ``fetch`` returns: ``status, headers, body = fetch(...)``."""

    status: int
    headers: http.client.HTTPMessage    # case-insensitive; a missing header is None
    body: bytes

    @property
    def pid(self) -> int:
        """The ``X-Pid`` header (apps_groups.py, apps_routes.py), 0 without one."""
        return int(self.headers.get("X-Pid") or 0)


def fetch(where: Where | http.client.HTTPConnection, path: str, *, method: str = "GET",
          body: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 10.0) -> Reply:
    """One request through ``http.client``: on a new connection, closed after the
    response, or on ``where`` when it is an open ``HTTPConnection`` (left open)."""
    if isinstance(where, http.client.HTTPConnection):
        conn = where
    else:
        conn = http.client.HTTPConnection(*address(where), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        if conn is not where:
            conn.close()


def fetch_json(where: Where, path: str, **kwargs: Any) -> Any:
    """``fetch``'s body as JSON; the status must be 200."""
    status, _, body = fetch(where, path, **kwargs)
    assert status == 200, body
    return json.loads(body)


def worker_pid(where: Where) -> int:
    """The pid of the worker that answers ``/pid`` (every app of the tests has it)."""
    status, _, body = fetch(where, "/pid")
    assert status == 200, body
    return int(body)


def start_sleeper(pool: ThreadPoolExecutor, server: Server, seconds: float, *,
                  port: int | None = None, route: str = "/sleep") -> Future[Reply]:
    """A slow request, ``ROUTE?s=SECONDS&tag=TAG``, fetched on its own thread; returns
    its future once the app is inside it (the app writes ``sleeping TAG`` to the
    log first).  ``port``: where to send it when it is not ``server``'s own port
    (a group of a config-file server)."""
    tag = uuid.uuid4().hex
    future = pool.submit(fetch, server if port is None else port,
                         f"{route}?s={seconds}&tag={tag}", timeout=seconds + 15)
    wait_for(lambda: f"sleeping {tag}" in server.log or future.done(), timeout=10,
             what=f"the app to start sleeping:\n{server.log}")
    assert not future.done(), future.result()
    return future


def timed(call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """Seconds ``call(*args, **kwargs)`` took, and what it returned."""
    start = time.monotonic()
    result = call(*args, **kwargs)
    return time.monotonic() - start, result

"""Certificates and a TLS client for the TLS tests (test_tls.py).

``Certs`` makes, with trustme, a CA and a server certificate for 127.0.0.1 and
localhost, a client CA with a client certificate, a client certificate of
another CA, and a second server certificate (for rotation), as PEM files in a
directory.  ``connect`` opens a verified TLS connection; ``exchange`` sends
bytes on it and reads ``count`` HTTP/1.1 responses (Content-Length framed).
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Certs:
    directory: Path

    def __post_init__(self) -> None:
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.files: dict[str, Path] = {}
        self.issue("server", self.ca, "127.0.0.1", "localhost")
        self.issue("rotated", self.ca, "127.0.0.1", "localhost")
        self.issue("client", self.client_ca, "alice@example.com", common_name="alice",
                   organization_name="Example")
        self.issue("stranger", self.other_ca, "mallory@example.com", common_name="mallory")
        self.write("ca", self.ca.cert_pem.bytes())
        self.write("client_ca", self.client_ca.cert_pem.bytes())

    def write(self, name: str, data: bytes) -> Path:
        path = self.directory / f"{name}.pem"
        path.write_bytes(data)
        self.files[name] = path
        return path

    def issue(self, name: str, ca: trustme.CA, *identities: str, **names: str) -> None:
        cert = ca.issue_cert(*identities, **names)
        self.write(f"{name}_cert", b"".join(c.bytes() for c in cert.cert_chain_pems))
        self.write(f"{name}_key", cert.private_key_pem.bytes())
        self.write(f"{name}_both", cert.private_key_and_cert_chain_pem.bytes())

    def __getitem__(self, name: str) -> str:
        return str(self.files[name])

    def context(self, client: str | None = None) -> ssl.SSLContext:
        """A client context that trusts the CA (and presents ``client``'s certificate)."""
        context = ssl.create_default_context(cafile=self["ca"])
        context.set_alpn_protocols(["http/1.1"])
        if client is not None:
            context.load_cert_chain(self[f"{client}_both"])
        return context


def connect(port: int, context: ssl.SSLContext, timeout: float = 10.0) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def get(path: str, *, close: bool = False, body: bytes = b"", method: str = "GET",
        extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length framed response from ``sock`` (``buffer``: bytes
    read past the previous response)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {bytes(buffer)!r}")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in a response body")
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def exchange(sock: socket.socket, data: bytes, count: int = 1) -> list[tuple[int, dict, bytes]]:
    sock.sendall(data)
    buffer = bytearray()
    return [read_response(sock, buffer) for _ in range(count)]


def seen(response: tuple[int, dict, bytes]) -> dict:
    """The app's JSON (apps_tls) of a 200 response."""
    status, _, body = response
    assert status == 200, (status, body[:300])
    return json.loads(body)

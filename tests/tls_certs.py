"""Certificates for the TLS tests (test_tls_blackbox.py), made with trustme and
written to files, and the client side of TLS: contexts and connections.

What it holds:

* ``Certs``: a CA, the server certificate for 127.0.0.1/localhost (``A``), a
  second server certificate of the same CA with another CN and serial (``B``,
  for rotation), client certificates of the CA (alice) and of another CA
  (mallory), the server key encrypted with a password, a key that matches no
  certificate here, and a file that is not a certificate;
* ``context``: a client context that verifies the server against the CA,
  with a client certificate when asked;
* ``tls_connect``: a verified TLS connection and the ``client.Stream`` that
  reads its responses;
* ``client_hello``: the bytes of a real ClientHello (for the half-handshake
  tests), and ``BioClient``, a client whose handshake the test drives byte by
  byte;
* ``der``/``subject``/``peer_cn``: what a PEM certificate is, for comparisons.

Rules: every file lives in the directory given to ``Certs`` (a tmp path);
every connection has a timeout.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import trustme
from client import Stream
from cryptography import x509
from cryptography.hazmat.primitives import serialization

PASSWORD = "s3cret-pass"

# The IANA numbers of the TLS 1.3 cipher suites (what the ASGI TLS extension's
# cipher_suite is), by OpenSSL's name.
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256": 0x1301, "TLS_AES_256_GCM_SHA384": 0x1302,
                "TLS_CHACHA20_POLY1305_SHA256": 0x1303}


class Certs:
    """Every certificate and key file of the TLS tests, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA(organization_name="fastpool tests")
        self.other_ca = trustme.CA(organization_name="someone else")
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_pem = self._write("other-ca.pem", self.other_ca.cert_pem.bytes())

        a = self.ca.issue_cert("127.0.0.1", "localhost", common_name="server-a",
                               organization_name="Fastpool", organization_unit_name="A")
        b = self.ca.issue_cert("127.0.0.1", "localhost", common_name="server-b",
                               organization_name="Fastpool", organization_unit_name="B")
        self.cert_a, self.key_a = self._leaf("server-a", a)
        self.cert_b, self.key_b = self._leaf("server-b", b)
        self.der_a = der(a.cert_chain_pems[0].bytes())
        self.der_b = der(b.cert_chain_pems[0].bytes())

        alice = self.ca.issue_cert("alice@example.org", common_name="alice",
                                   organization_name="Example", organization_unit_name="QA")
        self.alice_pem = alice.cert_chain_pems[0].bytes()
        self.alice_chain = self._write(
            "alice.pem", alice.private_key_pem.bytes()
            + b"".join(pem.bytes() for pem in alice.cert_chain_pems))
        mallory = self.other_ca.issue_cert("mallory@example.org", common_name="mallory")
        self.mallory_chain = self._write(
            "mallory.pem", mallory.private_key_pem.bytes()
            + b"".join(pem.bytes() for pem in mallory.cert_chain_pems))

        key = serialization.load_pem_private_key(a.private_key_pem.bytes(), password=None)
        self.encrypted_key = self._write("server-a-encrypted.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSWORD.encode())))
        # The key of a certificate nobody serves: it matches neither A nor B.
        stray = self.ca.issue_cert("stray.example.org")
        self.mismatched_key = self._write("stray.key", stray.private_key_pem.bytes())
        self.not_a_cert = self._write("not-a-cert.pem", b"this is not a certificate\n")
        self.broken_pem = self._write(
            "broken.pem", b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n"
                          b"-----END CERTIFICATE-----\n")

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def _leaf(self, name: str, leaf: trustme.LeafCert) -> tuple[str, str]:
        chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems)
        return (self._write(f"{name}.pem", chain),
                self._write(f"{name}.key", leaf.private_key_pem.bytes()))


# ---------------------------------------------------------------- certificates


def der(pem: bytes | str) -> bytes:
    """The DER bytes of the first certificate of ``pem``."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    return x509.load_pem_x509_certificate(text.encode()).public_bytes(
        serialization.Encoding.DER)


def subject(pem: bytes | str) -> str:
    """The RFC 4514 subject of the first certificate of ``pem``."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    return x509.load_pem_x509_certificate(text.encode()).subject.rfc4514_string()


def peer_cn(der_bytes: bytes) -> str:
    cert = x509.load_der_x509_certificate(der_bytes)
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


# ---------------------------------------------------------------- the client side


def context(certs: Certs, client_cert: str | None = None,
            alpn: list[str] | None = None,
            maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against the tests' CA."""
    ctx = ssl.create_default_context(cafile=certs.ca_pem)
    if client_cert is not None:
        ctx.load_cert_chain(client_cert)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = 10.0,
                server_hostname: str = "localhost") -> tuple[ssl.SSLSocket, Stream]:
    """A TLS connection to 127.0.0.1:``port`` (handshake done) and its Stream."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise
    return sock, Stream(sock, timeout)


class BioClient:
    """A TLS client whose handshake the test drives byte by byte (a memory
    BIO): ``hello()`` is its ClientHello, ``finish(sock)`` completes the
    handshake over ``sock``, then ``stream`` reads responses and ``send``
    writes requests."""

    def __init__(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        self.sock: socket.socket | None = None

    def hello(self) -> bytes:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def finish(self, sock: socket.socket, timeout: float = 10.0) -> Stream:
        """Complete the handshake over ``sock``; the Stream of its responses."""
        self.sock = sock
        sock.settimeout(timeout)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill("during the handshake")
        self._flush()
        return Stream(self, timeout)     # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    # what Stream needs of a socket
    def settimeout(self, timeout: float) -> None:
        assert self.sock is not None
        self.sock.settimeout(timeout)

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.obj.read(size)
            except ssl.SSLWantReadError:
                if not self._fill(None):
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            assert self.sock is not None
            self.sock.sendall(data)

    def _fill(self, where: str | None) -> bool:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            if where is not None:
                raise EOFError(f"the server closed the connection {where}")
            return False
        self.incoming.write(data)
        return True


def client_hello(certs: Certs) -> bytes:
    """The bytes of a real ClientHello (a TLS record), made with a memory BIO."""
    hello = BioClient(context(certs)).hello()
    assert hello[:1] == b"\x16", hello[:10]
    return hello

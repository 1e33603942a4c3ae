"""TLS: a group's server context, what a connection's TLS tells the app, kernel TLS.

Rules of this module:

* A group with ``tls_listen`` addresses has one ``ssl.SSLContext``, built by the
  master from the group's settings (``context_for``) before any worker forks,
  and built again from the files on every reload: that is certificate
  rotation.  The workers inherit the context through ``fork``; no worker reads
  a certificate file.  A context that cannot be built refuses the reload and
  the old workers go on serving.
* Every problem with the files or settings is a ``ConfigError`` of one line
  naming the group, the setting, the file and the problem.  ``fastpool
  serve`` checks them before the master starts (exit code 2).  No password is
  ever asked for on a terminal: an encrypted key without ``keyfile_password``
  is an error.
* The context speaks TLS 1.2 (or ``tls_min_version``) and up, offers ALPN
  ``http/1.1``, accepts SNI, refuses renegotiation and compression, and asks
  for client certificates as ``client_certs`` says.
* Handshakes never block a worker: the WSGI worker runs them in its epoll
  loop, the ASGI worker in its event loop (both with ``client_timeout`` as the
  handshake's deadline).  What the app sees of a connection's TLS comes from
  here: ``wsgi_keys`` (mod_ssl's environ names) and ``asgi_extension`` (the
  ASGI TLS extension).
* Kernel TLS (``kernel_tls``): with Python's ``ssl.OP_ENABLE_KTLS``, an
  OpenSSL built with kTLS and the kernel's ``tls`` module, OpenSSL moves a
  connection's record keys into the kernel after the handshake.  When it did
  so both ways (``offloaded``), the socket reads and writes plaintext, so
  ``sendfile`` and the plain handoff between groups work on it unchanged;
  otherwise the worker keeps encrypting, and routes relay (see the workers).
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from typing import Any

from fastpool.settings import ConfigError, GroupConfig

# Linux's <linux/tls.h>: the socket option level of kernel TLS and its two
# directions; getsockopt succeeds on a direction the kernel encrypts.
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
ULP_LIST = "/proc/sys/net/ipv4/tcp_available_ulp"

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# The ASGI TLS extension gives the version as its protocol number.
VERSION_NUMBERS = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303, "TLSv1.1": 0x0302, "TLSv1": 0x0301}
VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                "required": ssl.CERT_REQUIRED}
# Short names of subject attributes in an RFC 4514 distinguished name.
DN_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "emailAddress",
}


# ---------------------------------------------------------------- the context

def context_for(group: GroupConfig) -> ssl.SSLContext | None:
    """The server context of ``group``'s TLS addresses; None without any."""
    if not group.tls_listen:
        return None
    where = f"group {group.name}"
    if not group.certfile:
        raise ConfigError(f"{where}: tls_listen needs certfile (and keyfile, unless the key "
                          "is in certfile): --certfile PATH --keyfile PATH")
    certfile = _readable(group.certfile, where, "certfile")
    keyfile = _readable(group.keyfile, where, "keyfile") if group.keyfile else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[group.tls_min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # A client may not renegotiate: a handshake it starts mid-connection
    # would cost the worker a handshake per request it cares to send.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.set_alpn_protocols(["http/1.1"])
    if group.ktls and kernel_tls()[0]:
        context.options |= ssl.OP_ENABLE_KTLS
    _load_chain(context, certfile, keyfile, group.keyfile_password, where)
    context.fastpool_loaded = (  # type: ignore[attr-defined]
        f"certfile {certfile}, read {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if group.client_certs != "none":
        if not group.ca_certs:
            raise ConfigError(f"{where}: client_certs = {group.client_certs} needs ca_certs "
                              "(the CA certificates client certificates are verified against)")
        try:
            context.load_verify_locations(_readable(group.ca_certs, where, "ca_certs"))
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}: ca_certs {group.ca_certs}: not PEM CA certificates "
                              f"({_reason(exc)})") from None
        context.verify_mode = VERIFY_MODES[group.client_certs]
    if group.tls_ciphers:
        try:
            context.set_ciphers(group.tls_ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{where}: tls_ciphers {group.tls_ciphers!r}: no cipher "
                              "matches") from None
    return context


def check(groups: list[GroupConfig]) -> None:
    """Build every group's context once: a problem is a ConfigError now,
    before the master starts."""
    for group in groups:
        context_for(group)


def _readable(path: str, where: str, setting: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"{where}: {setting} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: {setting} {path}: a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {setting} {path}: {exc.strerror}") from None
    return path


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None,
                password: str | None, where: str) -> None:
    """load_cert_chain, with its OpenSSL errors turned into what went wrong."""
    asked = []

    def give_password() -> bytes:
        # Called by OpenSSL for an encrypted key (never a terminal prompt).
        asked.append(True)
        if password is None:
            raise ConfigError(f"{where}: keyfile {keyfile or certfile}: the key is encrypted; "
                              "set keyfile_password")
        return password.encode()

    try:
        context.load_cert_chain(certfile, keyfile, password=give_password)
    except ssl.SSLError as exc:
        key = keyfile or certfile
        with open(certfile, "rb") as handle:
            if b"-----BEGIN CERTIFICATE-----" not in handle.read():
                raise ConfigError(f"{where}: certfile {certfile}: not a PEM "
                                  "certificate") from None
        with open(key, "rb") as handle:
            if b"PRIVATE KEY-----" not in handle.read():
                raise ConfigError(f"{where}: keyfile {key}: not a PEM private key") from None
        if asked and password is not None:
            raise ConfigError(f"{where}: keyfile {key}: cannot decrypt it with "
                              "keyfile_password (wrong password?)") from None
        # A readable key that OpenSSL refuses with this certificate.
        raise ConfigError(f"{where}: keyfile {key} is not the key of certfile {certfile} "
                          f"({_reason(exc)})") from None


def certificate_summary(context: ssl.SSLContext) -> str:
    """The loaded certificate for ``fastpool status``: its file, and when it
    was read (a reload reads it again: certificate rotation)."""
    return getattr(context, "fastpool_loaded", "certificate loaded")


# ---------------------------------------------------------------- what the app sees

def subject_text(certificate: dict[str, Any]) -> str | None:
    """The subject of a verified peer certificate (``getpeercert()``) as an
    RFC 4514 string, most specific attribute first: ``CN=alice,O=Example``."""
    rdns = certificate.get("subject")
    if not rdns:
        return None
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{DN_NAMES.get(name, name)}={_dn_escape(value)}"
                              for name, value in rdn))
    return ",".join(parts)


def _dn_escape(value: str) -> str:
    escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    return escaped


def peer_certificate(tls: Any) -> tuple[str | None, str | None]:
    """``(PEM, subject)`` of the client's verified certificate, or Nones."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        return None, None
    return ssl.DER_cert_to_PEM_cert(der), subject_text(tls.getpeercert() or {})


def wsgi_keys(tls: Any) -> dict[str, str]:
    """The environ keys of a TLS connection (``tls``: its SSLSocket or
    SSLObject after the handshake), named as mod_ssl and uWSGI name them."""
    keys = {"HTTPS": "on", "SSL_PROTOCOL": tls.version() or "",
            "SSL_CIPHER": (tls.cipher() or ("",))[0]}
    if tls.context.verify_mode != ssl.CERT_NONE:
        pem, subject = peer_certificate(tls)
        if pem is None:
            keys["SSL_CLIENT_VERIFY"] = "NONE"
        else:
            keys["SSL_CLIENT_VERIFY"] = "SUCCESS"
            keys["SSL_CLIENT_CERT"] = pem
            keys["SSL_CLIENT_S_DN"] = subject or ""
    return keys


_suite_ids: dict[str, int] = {}


def _suite_id(context: ssl.SSLContext, name: str) -> int | None:
    """The IANA number of a cipher suite: OpenSSL's cipher id is 0x0300xxxx."""
    if not _suite_ids:
        for cipher in context.get_ciphers():
            _suite_ids[cipher["name"]] = cipher["id"] & 0xFFFF
    return _suite_ids.get(name)


def asgi_extension(tls: Any) -> dict[str, Any]:
    """``scope["extensions"]["tls"]`` of the ASGI TLS extension (``tls``:
    the transport's SSLObject)."""
    chain: list[str] = []
    name = None
    if tls.context.verify_mode != ssl.CERT_NONE:
        pem, name = peer_certificate(tls)
        if pem is not None:
            chain = [pem]
    cipher = tls.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": VERSION_NUMBERS.get(tls.version() or ""),
        "cipher_suite": _suite_id(tls.context, cipher[0]) if cipher else None,
    }


# ---------------------------------------------------------------- kernel TLS

def kernel_tls() -> tuple[bool, str]:
    """Whether OpenSSL can move TLS records into the kernel here, and why not."""
    if not hasattr(ssl, "OP_ENABLE_KTLS"):
        return False, (f"Python {'.'.join(map(str, sys.version_info[:2]))} has no "
                       "ssl.OP_ENABLE_KTLS (3.12 or later has it)")
    try:
        with open(ULP_LIST) as handle:
            ulps = handle.read().split()
    except OSError:
        ulps = []
    if "tls" not in ulps:
        return False, ("the kernel's tls module is not loaded (modprobe tls; "
                       f"{ULP_LIST} lists {' '.join(ulps) or 'nothing'})")
    return True, f"available ({ssl.OPENSSL_VERSION})"


def offloaded(fd: int) -> bool:
    """Whether the kernel encrypts and decrypts this socket's records (both
    directions after the handshake): then it carries plaintext for us."""
    sock = socket.socket(fileno=fd)
    try:
        for direction in (TLS_TX, TLS_RX):
            try:
                sock.getsockopt(SOL_TLS, direction, 64)
            except OSError:
                return False
        return True
    finally:
        sock.detach()

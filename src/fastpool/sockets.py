"""Listening sockets: parsing ``--bind`` addresses and creating the sockets.

Rules of this module:

* The master creates every listening socket before it forks and holds it for
  its whole life.  A worker that exits therefore never takes a socket, and the
  connections queued on it, down with it: its replacement accepts them.
* With ``reuse_port`` (the default) each worker slot gets its own
  SO_REUSEPORT socket per TCP address, so the kernel spreads connections over
  the workers without a shared accept queue.  Unix sockets, inherited
  ``fd://N`` sockets, sockets passed by systemd (``systemd:NAME``, resolved
  to ``fd`` addresses by ``fastpool.systemd.assign``) and ``--no-reuse-port``
  use one socket shared by all workers (woken with EPOLLEXCLUSIVE); an
  inherited socket is used as it is, never rebound.
* An address that cannot be parsed or bound is a ``ConfigError`` naming it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpool.settings import ConfigError, GroupConfig, ServerConfig

log = logging.getLogger("fastpool.error")

WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


@dataclass(frozen=True)
class Address:
    kind: str           # "tcp", "unix", "fd" or "systemd" (not yet resolved to an fd)
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    tls: bool = False   # a tls_listen address: its connections start with a TLS handshake
    # systemd: the FileDescriptorName ("": every unclaimed socket); fd: the
    # systemd address it came from ("systemd:web"), "" for fd://N.
    name: str = ""

    def __str__(self) -> str:
        tls = " (TLS)" if self.tls else ""
        if self.kind == "unix":
            return f"unix:{self.path}{tls}"
        if self.kind == "fd":
            return f"{self.name} (fd {self.fd}){tls}" if self.name else f"fd://{self.fd}{tls}"
        if self.kind == "systemd":
            return f"systemd{':' if self.name else ''}{self.name}{tls}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def parse_address(text: str, source: str = "--bind", tls: bool = False) -> Address:
    """``HOST:PORT``, ``[IPV6]:PORT``, ``HOST`` (port 8000), ``unix:PATH``, ``fd://N``,
    ``systemd`` or ``systemd:NAME``."""
    text = text.strip()
    if text == "systemd" or text.startswith("systemd:"):
        name = text[8:]
        if text.startswith("systemd:") and not name:
            raise ConfigError(f"{source}: {text!r} has no name (expected systemd:NAME, the "
                              "FileDescriptorName= of the .socket unit, or systemd alone)")
        return Address("systemd", name=name, tls=tls)
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"{source}: {text!r} has no socket path (expected unix:/path)")
        return Address("unix", path=path, tls=tls)
    if text.startswith("fd://"):
        try:
            return Address("fd", fd=int(text[5:]), tls=tls)
        except ValueError:
            raise ConfigError(f"{source}: {text!r} is not fd://N with a number N") from None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{source}: {text!r} is not [IPV6]:PORT")
        port_text = rest[1:] if rest else "8000"
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" not in text:
        host, port_text = text, "8000"
    else:
        raise ConfigError(f"{source}: {text!r} is ambiguous; write IPv6 hosts as [HOST]:PORT")
    if not host:
        raise ConfigError(f"{source}: {text!r} has no host (expected HOST:PORT)")
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{source}: {text!r} has no valid port (expected 0-65535)") from None
    return Address("tcp", host=host, port=port, tls=tls)


def group_addresses(group: GroupConfig, path: Path | None) -> list[tuple[Address, str]]:
    """A group's addresses, plain (``listen``) then TLS (``tls_listen``), each
    with the text it was written as; ``path``: the config file, for messages."""
    found = []
    for key, tls, flag in (("listen", False, "--bind"), ("tls_listen", True, "--tls-bind")):
        where = f"[group.{group.name}] {key}"
        if path is not None:
            where = f"{path.name}: {where}"
        for text in getattr(group, key):
            found.append((parse_address(text, where if path is not None else flag, tls), text))
    return found


def _overlap(a: Address, b: Address) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "unix":
        return os.path.abspath(a.path) == os.path.abspath(b.path)
    if a.kind == "fd":
        return a.fd == b.fd
    if a.kind == "systemd":
        return a.name == b.name
    if a.port != b.port or a.port == 0:
        return False
    if a.family != b.family:
        return False
    return a.host == b.host or a.host in WILDCARD_HOSTS or b.host in WILDCARD_HOSTS


def check_addresses(config: ServerConfig,
                    assigned: Mapping[str, list[tuple[Address, str]]] | None = None) -> None:
    """Every listen address parses, and no two groups share one (the message
    says which groups, and why a group without listen has its address); nor
    does metrics_listen.  ``assigned``: the groups' addresses with systemd's
    sockets in place (``fastpool.systemd.assign``), when the config may have
    them."""
    seen: list[tuple[str, Address, str]] = []
    for name, group in config.groups.items():
        addresses = assigned[name] if assigned is not None else group_addresses(group,
                                                                                 config.path)
        for address, text in addresses:
            for other_name, other, other_text in seen:
                if other_name != name and _overlap(address, other):
                    raise ConfigError(_shared(config, (other_name, other_text), (name, text)))
            seen.append((name, address, text))
    if config.metrics_listen:
        metrics = parse_address(config.metrics_listen, "metrics_listen")
        if metrics.kind == "fd":
            raise ConfigError(f"metrics_listen: {config.metrics_listen!r}: expected HOST:PORT "
                              "or unix:PATH")
        for name, address, text in seen:
            if _overlap(metrics, address):
                raise ConfigError(f"metrics_listen: {config.metrics_listen!r} is also an "
                                  f"address of group {name!r} ({text!r})")


def _shared(config: ServerConfig, first: tuple[str, str], second: tuple[str, str]) -> str:
    """The message for two groups on one address: ``(group name, address text)`` each."""
    prefix = f"{config.path.name}: " if config.path is not None else ""
    rule = "two groups cannot listen on one address"
    sources = [config.groups[name].listen_source for name, _ in (first, second)]
    if sources == ["group", "group"]:
        name, text = second
        return (f"{prefix}[group.{name}] listen: {text!r} is also an address of group "
                f"{first[0]!r}; {rule}")
    if sources[0] == sources[1] and first[1] == second[1]:
        origin = "the default" if sources[0] == "default" else "[server] listen"
        return (f"{prefix}[group.{first[0]}] and [group.{second[0]}] set no listen, so both "
                f"get {origin} {second[1]!r}; {rule}: set listen in each group")

    def side(name: str, text: str, source: str) -> str:
        if source == "group":
            return f"[group.{name}] listens on {text!r}"
        origin = "the default" if source == "default" else "[server] listen"
        return f"[group.{name}] sets no listen, so it gets {origin} {text!r}"

    unset = " and ".join(f"[group.{name}]" for (name, _), source in zip(
        (first, second), sources, strict=True) if source != "group")
    return (f"{prefix}{side(*first, sources[0])} and {side(*second, sources[1])}; {rule}: "
            f"set listen in {unset}")


def migrate_req_enabled() -> bool | None:
    """Whether the kernel moves the queue of a closed SO_REUSEPORT socket to
    its siblings (net.ipv4.tcp_migrate_req); None when unknown."""
    try:
        with open(MIGRATE_REQ) as handle:
            return handle.read().strip() == "1"
    except OSError:
        return None


def _check_not_in_use(address: Address, port: int) -> None:
    """SO_REUSEPORT would let this server share a port with another program's
    SO_REUSEPORT listener, silently splitting its traffic.  Binding once
    without it first turns that into the usual "address already in use"."""
    probe = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((address.host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def _tcp_socket(address: Address, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)

    def options() -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)

    return _listening(sock, address, (address.host, port), backlog, options)


def _listening(sock: socket.socket, address: Address, target: Any, backlog: int,
               options: Callable[[], None] | None = None) -> socket.socket:
    """``sock`` with its ``options`` set, bound to ``target``, listening and
    non-blocking; closed, and one ConfigError line, when any step fails."""
    try:
        if options is not None:
            options()
        sock.bind(target)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def _unix_socket(address: Address, backlog: int) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.stat(address.path).st_mode):
            os.unlink(address.path)   # a stale socket left by an earlier run
    except FileNotFoundError:
        pass
    return _listening(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), address, address.path,
                      backlog)


@dataclass
class BoundSocket:
    sock: socket.socket
    address: Address
    shared: bool

    @property
    def is_tcp(self) -> bool:
        return self.sock.family in (socket.AF_INET, socket.AF_INET6)

    @property
    def server_name_port(self) -> tuple[str, str]:
        if self.is_tcp:
            host, port = self.sock.getsockname()[:2]
            return str(host), str(port)
        return str(self.sock.getsockname() or "localhost"), "0"


def bound_address(sock: socket.socket, tls: bool = False) -> str:
    """What an inherited socket is bound to: ``http://HOST:PORT``, ``unix:PATH``."""
    try:
        name = sock.getsockname()
    except OSError as exc:
        return f"(not a socket: {exc.strerror or exc})"
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return str(Address("tcp", host=str(name[0]), port=int(name[1]), tls=tls))
    if isinstance(name, bytes):
        name = "@" + name[1:].decode(errors="replace")   # an abstract unix socket
    return f"unix:{name}"


class Listeners:
    """Every listening socket of a server, by worker slot."""

    def __init__(self, addresses: list[Address], *, backlog: int, reuse_port: bool) -> None:
        self.addresses = addresses
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.shared: list[BoundSocket] = []
        self.per_slot: dict[int, list[BoundSocket]] = {}
        # For port 0: the port the kernel chose for the first socket, reused by
        # every later slot so that all slots share one address.
        self._ports: dict[Address, int] = {}
        try:
            for address in addresses:
                if address.kind == "unix":
                    self.shared.append(BoundSocket(_unix_socket(address, backlog), address, True))
                elif address.kind == "systemd":
                    raise ConfigError(f"cannot listen on {address}: systemd passed no such "
                                      "socket to this process")
                elif address.kind == "fd":
                    self.shared.append(BoundSocket(self._inherited(address), address, True))
                elif not reuse_port:
                    sock = _tcp_socket(address, address.port, backlog, False)
                    self.shared.append(BoundSocket(sock, address, True))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _inherited(address: Address) -> socket.socket:
        try:
            sock = socket.socket(fileno=address.fd)
        except OSError as exc:
            raise ConfigError(f"cannot use {address}: {exc.strerror or exc}") from None
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"cannot use {address}: not a stream socket")
        sock.setblocking(False)
        return sock

    def for_slot(self, slot: int) -> list[BoundSocket]:
        """The sockets worker ``slot`` accepts from (created on first use)."""
        if slot not in self.per_slot:
            own: list[BoundSocket] = []
            if self.reuse_port:
                for address in self.addresses:
                    if address.kind != "tcp":
                        continue
                    port = self._ports.get(address, address.port)
                    if address not in self._ports and port:
                        _check_not_in_use(address, port)
                    sock = _tcp_socket(address, port, self.backlog, True)
                    self._ports[address] = sock.getsockname()[1]
                    own.append(BoundSocket(sock, address, False))
            self.per_slot[slot] = own
        return self.per_slot[slot] + self.shared

    def close_slot(self, slot: int) -> None:
        """Give back a slot's own sockets after scaling down.  Connections still
        queued on a closed SO_REUSEPORT socket are reset unless the kernel
        migrates them; say so when it will not."""
        own = self.per_slot.pop(slot, [])
        if own and migrate_req_enabled() is False:
            log.warning(
                "closing the listening socket of worker slot %d after scaling down: "
                "connections queued on it are reset unless net.ipv4.tcp_migrate_req=1 "
                "(sysctl -w net.ipv4.tcp_migrate_req=1)", slot)
        for bound in own:
            bound.sock.close()

    def all_sockets(self) -> list[socket.socket]:
        socks = [b.sock for b in self.shared]
        for own in self.per_slot.values():
            socks.extend(b.sock for b in own)
        return socks

    def describe(self) -> list[str]:
        """One ``http://host:port`` / ``unix:path`` per address, with the real port;
        a socket from systemd as ``systemd:web (fd 3) http://0.0.0.0:8080``."""
        seen: list[str] = []
        bound = list(self.shared) + [b for own in self.per_slot.values() for b in own]
        for item in bound:
            text = self.describe_one(item)
            if text not in seen:
                seen.append(text)
        return seen

    @staticmethod
    def describe_one(item: BoundSocket) -> str:
        """One socket's address as ``describe`` writes it."""
        if item.is_tcp and item.address.kind == "tcp":
            host, port = item.sock.getsockname()[:2]
            return str(Address("tcp", host=str(host), port=int(port), tls=item.address.tls))
        if item.address.name:
            return f"{item.address} {bound_address(item.sock, item.address.tls)}"
        return str(item.address)

    def close(self) -> None:
        """Close every socket, but leave systemd's fds open: they are the
        server's for its whole life (a group that a later reload brings back
        takes them again), and systemd keeps their queues."""
        for bound in self.shared:
            if bound.address.kind == "fd" and bound.address.name:
                bound.sock.detach()
        for sock in self.all_sockets():
            sock.close()
        for address in self.addresses:
            if address.kind == "unix":
                try:
                    os.unlink(address.path)
                except OSError:
                    pass
        self.shared.clear()
        self.per_slot.clear()

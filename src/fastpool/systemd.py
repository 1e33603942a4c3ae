"""systemd: socket activation (``LISTEN_FDS``) and readiness notification (``sd_notify``).

Rules of this module (the protocols are systemd's ``sd_listen_fds(3)`` and
``sd_notify(3)``; no library, both are a few lines):

* Activated sockets are ours only when ``LISTEN_PID`` is this process's pid;
  they are fds 3 .. 3+``LISTEN_FDS``-1, named by ``LISTEN_FDNAMES`` (colon
  separated; "" where systemd gave no names).  ``take_activation`` reads them
  once, marks them close-on-exec and removes ``LISTEN_*`` from the
  environment (whoever they were for), so that apps and children never see
  them.
* A group listens on them by ``systemd:NAME`` (every socket of that
  FileDescriptorName) or ``systemd`` (every socket no ``systemd:NAME`` of the
  config claims).  A config with no ``systemd`` address gives every activated
  socket to its only listening group, in place of its plain addresses (as
  gunicorn ignores ``--bind`` then; its ``tls_listen`` stay); several
  listening groups are then a ``ConfigError`` asking which is which
  (``assign``).  An activated socket becomes an ``fd`` address
  (``sockets.Address``), so it is used as it is, never rebound, and shared by
  the group's workers.
* ``Notifier`` sends the master's state to ``NOTIFY_SOCKET`` (a path, or an
  abstract ``@name``) as one datagram per message; ``take_notifier`` removes
  ``NOTIFY_SOCKET`` and ``WATCHDOG_*`` from the environment, so that no child
  talks to systemd in the master's name.  A failed send is logged once and
  never stops the server.  Which messages are sent when is the master's
  business (``fastpool.master``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass

from fastpool.settings import ConfigError, ServerConfig
from fastpool.sockets import Address, bound_address, group_addresses

log = logging.getLogger("fastpool.error")

LISTEN_FDS_START = 3     # sd_listen_fds(3): the first passed fd, after stdin/stdout/stderr
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(frozen=True)
class Activated:
    """One socket systemd passed: its fd and its FileDescriptorName ("" when unnamed)."""

    fd: int
    name: str

    def label(self) -> str:
        return f"systemd:{self.name}" if self.name else "systemd"

    def __str__(self) -> str:
        return f"{self.name} (fd {self.fd})" if self.name else f"fd {self.fd}"


def take_activation(environ: MutableMapping[str, str] | None = None,
                    pid: int | None = None) -> list[Activated]:
    """The sockets systemd passed to this process (none: []), with ``LISTEN_*``
    removed from ``environ`` (``os.environ``) either way."""
    environ = os.environ if environ is None else environ
    values = {name: environ.pop(name, None) for name in LISTEN_VARIABLES}
    pid = os.getpid() if pid is None else pid
    try:
        if values["LISTEN_PID"] is None or int(values["LISTEN_PID"]) != pid:
            return []
        count = int(values["LISTEN_FDS"] or "0")
    except ValueError:
        log.warning("Ignoring LISTEN_PID=%r LISTEN_FDS=%r: not numbers", values["LISTEN_PID"],
                    values["LISTEN_FDS"])
        return []
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    found = []
    for index in range(max(0, count)):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)   # no exec'd child gets them
        except OSError:
            continue                        # not open after all: nothing to use
        found.append(Activated(fd, names[index] if index < len(names) else ""))
    return found


def close_activated(activated: list[Activated], keep: Collection[int] = ()) -> None:
    """Close systemd's sockets (but those in ``keep``): at exit, or in a child."""
    for item in activated:
        if item.fd not in keep:
            try:
                os.close(item.fd)
            except OSError:
                pass     # already closed with its socket object


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _claimed_names(config: ServerConfig) -> set[str]:
    return {address.name for group in config.groups.values()
            for address, _ in group_addresses(group, config.path)
            if address.kind == "systemd" and address.name}


def uses_systemd(config: ServerConfig) -> bool:
    """Whether any group of ``config`` names a ``systemd`` address."""
    return any(address.kind == "systemd" for group in config.groups.values()
               for address, _ in group_addresses(group, config.path))


def assign(config: ServerConfig, activated: list[Activated],
           strict: bool = True) -> dict[str, list[tuple[Address, str]]]:
    """Every group's addresses with ``text`` (``group_addresses``), its
    ``systemd`` ones replaced by the activated sockets they stand for.

    ``strict`` (``fastpool serve``): a ``systemd`` address with no socket
    behind it is a ``ConfigError``; otherwise (``fastpool check``, not started
    by systemd) it is kept as written."""
    result = {name: group_addresses(group, config.path) for name, group in config.groups.items()}
    prefix = f"{config.path.name}: " if config.path is not None else ""
    if not uses_systemd(config):
        if not activated:
            return result
        # Implicit: every socket goes to the only group that listens.
        listening = [name for name, group in config.groups.items() if group.listen]
        if len(listening) != 1:
            names = ", ".join(str(item.name or f"fd {item.fd}") for item in activated)
            raise ConfigError(
                f"{prefix}systemd passed {_count(len(activated), 'socket')} ({names}) and the "
                f"config has {_count(len(listening), 'group')}: say which group listens on "
                "which with listen = [\"systemd:NAME\"]")
        # In place of its plain addresses, as gunicorn ignores --bind then: they
        # are for running it without systemd (and one is often the same port).
        name = listening[0]
        kept = [(address, text) for address, text in result[name] if address.tls]
        result[name] = [(_fd_address(item, False), item.label()) for item in activated] + kept
        return result
    claimed = _claimed_names(config)
    passed = sorted({item.name for item in activated if item.name})
    for name, addresses in result.items():
        expanded: list[tuple[Address, str]] = []
        for address, text in addresses:
            if address.kind != "systemd":
                expanded.append((address, text))
                continue
            if address.name:
                matches = [item for item in activated if item.name == address.name]
            else:
                matches = [item for item in activated if item.name not in claimed]
            if not matches and strict:
                key = "tls_listen" if address.tls else "listen"
                where = (f"{prefix}[group.{name}] {key}" if config.path is not None
                         else "--tls-bind" if address.tls else "--bind")
                if not activated:
                    why = ("systemd passed no sockets to this process (LISTEN_PID/LISTEN_FDS "
                           "unset; start it from a .socket unit)")
                elif address.name:
                    why = (f"systemd passed no socket named {address.name!r} (it passed "
                           f"{', '.join(repr(n) for n in passed) or 'only unnamed ones'}; "
                           "FileDescriptorName= in the .socket unit names them)")
                else:
                    why = "every socket systemd passed is claimed by a systemd:NAME address"
                raise ConfigError(f"{where}: {text!r}: {why}")
            if not matches:
                expanded.append((address, text))
            expanded.extend((_fd_address(item, address.tls), text) for item in matches)
        result[name] = expanded
    return result


def bound_to(fd: int) -> str:
    """What the socket ``fd`` is bound to: ``http://HOST:PORT``, ``unix:PATH``."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        return f"(not a socket: {exc.strerror or exc})"
    with sock:
        return bound_address(sock)


def _fd_address(item: Activated, tls: bool) -> Address:
    return Address("fd", fd=item.fd, name=item.label(), tls=tls)


# ---------------------------------------------------------------- sd_notify


class Notifier:
    """Messages to systemd's ``NOTIFY_SOCKET``; a no-op without one."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.sock: socket.socket | None = None
        self.address: str | bytes = ""
        self.warned = False
        # Seconds between two WATCHDOG=1 (0: no watchdog): half of WatchdogSec,
        # as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = watchdog_usec / 2e6
        self.next_watchdog = 0.0
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> None:
        """One datagram of ``KEY=VALUE`` lines."""
        if self.sock is None:
            return
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            self.sock.sendto(data, self.address)
        except OSError as exc:
            if not self.warned and exc.errno != errno.EAGAIN:
                self.warned = True
                log.warning("Cannot notify systemd at NOTIFY_SOCKET %r: %s",
                            self.address.replace("\0", "@"), exc.strerror or exc)

    def watchdog_due(self, now: float) -> float | None:
        """When the next WATCHDOG=1 is due (None: no watchdog)."""
        return self.next_watchdog if self.watchdog_interval and self.enabled else None

    def ping_watchdog(self, now: float) -> None:
        """WATCHDOG=1 when it is due."""
        if self.watchdog_interval and self.enabled and now >= self.next_watchdog:
            self.send("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog_interval

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def take_notifier(environ: MutableMapping[str, str] | None = None,
                  pid: int | None = None) -> Notifier:
    """The ``Notifier`` of ``NOTIFY_SOCKET`` (with the watchdog when
    ``WATCHDOG_USEC`` is set for this pid), its variables removed from
    ``environ`` (``os.environ``)."""
    environ = os.environ if environ is None else environ
    values: Mapping[str, str | None] = {name: environ.pop(name, None)
                                        for name in NOTIFY_VARIABLES}
    pid = os.getpid() if pid is None else pid
    usec = 0
    try:
        if values["WATCHDOG_USEC"] and (not values["WATCHDOG_PID"]
                                        or int(values["WATCHDOG_PID"]) == pid):
            usec = max(0, int(values["WATCHDOG_USEC"]))
    except ValueError:
        log.warning("Ignoring WATCHDOG_USEC=%r WATCHDOG_PID=%r: not numbers",
                    values["WATCHDOG_USEC"], values["WATCHDOG_PID"])
    return Notifier(values["NOTIFY_SOCKET"], usec)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds (RELOADING=1's MONOTONIC_USEC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

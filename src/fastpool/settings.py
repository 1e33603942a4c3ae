"""The settings table: one row per setting, and everything derived from it.

Rules of this module:

* Every setting is one ``Setting`` row in ``SETTINGS``.  The command-line
  flags, the ``FASTPOOL_*`` environment variables, the config-file keys, the
  settings table in README.md and the typed attributes of the configs
  (``fastpool/settings_types.py``) are all generated from these rows; nothing
  else lists options.
* A row may have ``aliases``: former names that keep working everywhere the
  name does (flag, environment variable, config-file key, attribute).  Giving a
  setting under two of its names in one place (two flags, two environment
  variables, two keys of one table) is a ``ConfigError`` naming both.
* A row's ``scope`` says where it may be set in a config file: ``group`` rows
  in any ``[group.NAME]`` table or once in ``[server]`` as the default of every
  group; ``server`` rows only in ``[server]``; ``process`` rows only in
  ``[process.NAME]`` tables.
* A ``[process.NAME]`` runs a ``target`` or a ``command``, exactly one; the
  command's ``${VAR}`` are expanded and its program looked up (as execvp
  would) when the file is read (``_command``), and its ``cwd`` is resolved
  beside the file: a typo stops the start (or refuses the reload) with one
  line, never a respawn loop.  Table-valued rows (``env``, ``static``) are
  read as (key, value) pairs (``PAIR_TYPES``).
* Precedence, highest first: command-line flag, environment variable, the
  group's own table, ``[server]``, the row's default.
* Values are checked where they are read, and a bad one is a ``ConfigError``
  whose message names where it came from (``--workers``, ``FASTPOOL_WORKERS``,
  ``fastpool.toml: [group.task] workers``) and what was expected: one line for
  the operator, never a traceback.
* The result is plain, immutable data (``ServerConfig``, ``GroupConfig``,
  ``ProcessConfig``): frozen dataclasses whose ``values`` are read-only
  mappings of read-only values (lists become tuples).  A changed config is a
  new one (``with_values``), never an edit.  Loading apps and binding sockets
  happen in the master.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fastpool.log import GUNICORN_FORMAT, check_format
from fastpool.settings_types import GroupSettings, ProcessSettings, ServerSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_GROUP = "main"


class ConfigError(Exception):
    """A setting has a value fastpool cannot use; the message says which and why."""


# ---------------------------------------------------------------- value checks
# Each takes the typed value and returns it (possibly normalised) or raises
# ValueError with "expected ..." wording.


def at_least(minimum: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value < minimum:
            unit = "an integer" if isinstance(value, int) else "a number"
            raise ValueError(f"expected {unit} >= {minimum:g}, got {value!r}")
        return value
    return check


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port number from 0 to 65535, got {value!r}")
    return value


def _url_path(value: str) -> str:
    if not value.startswith("/") or "?" in value or " " in value:
        raise ValueError(f"expected a path starting with /, got {value!r}")
    return value


def prefix_key(prefix: str) -> str:
    """A URL prefix as routes and static mounts compare it: repeated and
    trailing slashes dropped (``/`` for the root)."""
    return "/" + "/".join(part for part in prefix.split("/") if part)


def _check_prefix(prefix: str) -> None:
    if not prefix.startswith("/") or "?" in prefix or " " in prefix:
        raise ValueError(f"expected path prefixes starting with /, got {prefix!r}")


def _routes(value: list[str]) -> list[str]:
    for prefix in value:
        _check_prefix(prefix)
    return value


def _pair(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (``PREFIX=DIR`` of a flag or an environment variable) as a pair."""
    prefix, equals, directory = text.partition("=")
    if not equals or not prefix.strip() or not directory.strip():
        raise ValueError
    return prefix.strip(), directory.strip()


def _mounts(value: list[tuple[str, str]]) -> list[tuple[str, str]]:
    prefixes = set()
    for prefix, directory in value:
        _check_prefix(prefix)
        key = prefix_key(prefix)
        if key in prefixes:
            raise ValueError(f"expected each URL prefix once, got {prefix!r} twice")
        prefixes.add(key)
        if not directory:
            raise ValueError(f"expected a directory for {prefix!r}")
    return value


def _nice(value: int) -> int:
    if not -20 <= value <= 19:
        raise ValueError(f"expected a niceness from -20 to 19, got {value!r}")
    return value


def _cpus(value: list[int]) -> list[int]:
    available = os.cpu_count() or 1
    for cpu in value:
        if not 0 <= cpu < available:
            raise ValueError(f"expected CPU numbers from 0 to {available - 1}, got {cpu!r}")
    return value


def _stop_signal(value: str) -> str:
    """A signal's name without ``SIG`` (``TERM``, ``INT``, ``QUIT``...), upper-cased."""
    name = value.upper().removeprefix("SIG")
    if f"SIG{name}" not in signal.Signals.__members__:
        raise ValueError(f"expected a signal name such as TERM, INT or QUIT, got {value!r}")
    return name


# An environment variable's name: what a shell would accept.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _environment(value: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for name, text in value:
        if not ENV_NAME.match(name):
            raise ValueError(f"expected environment variable names (letters, digits, _), "
                             f"got {name!r}")
        if "\0" in text:
            raise ValueError(f"expected values without NUL bytes, got one in {name}")
    return value


def choice(*options: str) -> Callable[[Any], Any]:
    def check(value: str) -> str:
        lowered = value.lower()
        if lowered not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return lowered
    return check


def _default_workers(environ: Mapping[str, str]) -> int:
    # gunicorn and uvicorn both honour WEB_CONCURRENCY; so do we (from the
    # environment the settings are read from: never from an env_file).
    raw = environ.get("WEB_CONCURRENCY")
    if raw is None:
        return 1
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"WEB_CONCURRENCY: expected an integer >= 1, got {raw!r}") from None
    return value


# ---------------------------------------------------------------- the table

TYPE_NAMES = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
    "list": "a list of strings", "ints": "a list of integers",
    "mounts": "URL prefixes with their directories (PREFIX=DIR)",
    "argv": "a list of strings (the program and its arguments)",
    "env": "a table of strings (NAME = \"value\")",
}
# The types written as a TOML table of strings, held as (key, value) pairs.
PAIR_TYPES = ("mounts", "env")


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    type: str                     # a key of TYPE_NAMES
    default: Any
    help: str
    scope: str = "group"          # "group", "server" or "process"
    flags: tuple[str, ...] = ()   # no flags: config file (and environment) only
    metavar: str | None = None
    check: Callable[[Any], Any] | None = None
    default_doc: str | None = None
    env_var: bool = True
    # Former names, accepted wherever the name is: each has its own flag
    # (--former-name, when the row has flags), environment variable and
    # config-file key, and reads as an attribute of the config.
    aliases: tuple[str, ...] = ()
    # load() always gives it a value (it is required, or derived when unset),
    # so its attribute is never None although its default is.
    always_set: bool = False

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def cli(self) -> str:
        """The long flag, which error messages name."""
        return self.flags[-1] if self.flags else ""

    @property
    def names(self) -> tuple[str, ...]:
        """The name, then the aliases."""
        return (self.name, *self.aliases)

    def flag_for(self, name: str) -> str:
        """The long flag of the name or alias ``name`` ("" without flags)."""
        if not self.flags:
            return ""
        return self.cli if name == self.name else alias_flag(name)

    def resolve_default(self, environ: Mapping[str, str] | None = None) -> Any:
        """The default; a callable one is given the environment settings are read from."""
        environ = os.environ if environ is None else environ
        value = self.default(environ) if callable(self.default) else self.default
        return list(value) if isinstance(value, list) else value

    # ---- reading values

    def from_text(self, text: str, source: str) -> Any:
        """A value given as text (a flag or an environment variable)."""
        try:
            if self.type == "int":
                value: Any = int(text)
            elif self.type == "float":
                value = float(text)
            elif self.type == "bool":
                lowered = text.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    value = True
                elif lowered in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ValueError
            elif self.type == "list":
                value = [part.strip() for part in text.split(",") if part.strip()]
            elif self.type == "ints":
                value = [int(part) for part in text.replace(",", " ").split()]
            elif self.type in PAIR_TYPES:
                value = [_pair(part.strip()) for part in text.split(",") if part.strip()]
            elif self.type == "argv":
                value = shlex.split(text)
                if not value:
                    raise ValueError
            else:
                value = text
        except ValueError:
            raise ConfigError(
                f"{source}: expected {TYPE_NAMES[self.type]}, got {text!r}") from None
        return self._checked(value, source)

    def from_file(self, value: Any, source: str) -> Any:
        """A value read from a TOML table, type-checked."""
        expected = TYPE_NAMES[self.type]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "ints": isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value),
            "mounts": isinstance(value, dict) and all(
                isinstance(v, str) for v in value.values()),
            "env": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
            "argv": isinstance(value, list) and bool(value) and all(
                isinstance(v, str) for v in value),
        }[self.type]
        if self.type == "list" and isinstance(value, str):
            value, ok = [value], True
        if not ok:
            raise ConfigError(f"{source}: expected {expected}, got {value!r}")
        if self.type == "float":
            value = float(value)
        if self.type in PAIR_TYPES:
            value = list(value.items())
        return self._checked(value, source)

    def _checked(self, value: Any, source: str) -> Any:
        if self.check is None:
            return value
        try:
            return self.check(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def env_name(name: str) -> str:
    """The environment variable of a setting's name or alias."""
    return "FASTPOOL_" + name.upper()


def alias_flag(name: str) -> str:
    """The flag of an alias: its name as a long option."""
    return "--" + name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    # ---- a group: what it serves and where
    Setting("app", "str", None,
            "The WSGI or ASGI app as MODULE:ATTRIBUTE or MODULE:FACTORY(...). On the command "
            "line it is the positional APP.", env_var=False, always_set=True),
    Setting("interface", "str", "auto",
            "How the app is called: wsgi, asgi, or auto (an ASGI 3 app is a coroutine "
            "function or has an async __call__; an ASGI 2 class is wrapped; anything else "
            "is WSGI).", flags=("--interface",), metavar="KIND",
            check=choice("auto", "wsgi", "asgi")),
    Setting("loop", "str", "auto",
            "ASGI event loop: asyncio, uvloop (pip install 'fastpool[uvloop]'), or auto "
            "(uvloop when installed).", flags=("--loop",), metavar="LOOP",
            check=choice("auto", "asyncio", "uvloop")),
    Setting("lifespan", "str", "auto",
            "ASGI lifespan events: on (a failing startup stops the server), off, or auto "
            "(used when the app supports them).", flags=("--lifespan",), metavar="MODE",
            check=choice("auto", "on", "off")),
    Setting("ws_max_size", "int", 16 * 1024 * 1024,
            "Largest WebSocket message in bytes (larger: closed with 1009).",
            flags=("--ws-max-size",), metavar="BYTES", check=at_least(1),
            default_doc="16 MiB"),
    Setting("ws_ping_interval", "float", 20.0,
            "Seconds of WebSocket silence after which the server pings the client (0: "
            "never).", flags=("--ws-ping-interval",), metavar="SECONDS", check=at_least(0)),
    Setting("ws_ping_timeout", "float", 20.0,
            "Seconds to wait for the pong before closing the WebSocket with 1011.",
            flags=("--ws-ping-timeout",), metavar="SECONDS", check=at_least(0)),
    Setting("ws_per_message_deflate", "bool", True,
            "Offer the permessage-deflate extension (compressed WebSocket messages) to "
            "clients that ask for it; ws_max_size applies to the decompressed message.",
            flags=("--ws-per-message-deflate",)),
    Setting("listen", "list", None,
            "Addresses to listen on: HOST:PORT, [IPV6]:PORT, unix:PATH, fd://N, or "
            "systemd:NAME / systemd (sockets passed by systemd socket activation, by "
            "FileDescriptorName or all of them; README \"systemd\"). On the command line: "
            "--bind (repeatable) or --host/--port. A group that sets none (and has no routes) "
            "listens on host:port; two such groups are a config error. With sockets from "
            "systemd and no systemd address in the config, the only group listens on them "
            "instead of its listen addresses.",
            flags=("-b", "--bind"), metavar="ADDRESS", default_doc="`127.0.0.1:8000`",
            always_set=True),
    Setting("tls_listen", "list", [],
            "Addresses that speak TLS (HTTPS), written as listen's; listen stays plain. Needs "
            "certfile (and keyfile). On the command line: --tls-bind (repeatable); a command "
            "line with --tls-bind and no --bind listens on TLS only.",
            flags=("--tls-bind",), metavar="ADDRESS"),
    Setting("host", "str", "127.0.0.1",
            "Host of the default listen address: of a group that sets no listen, or of the "
            "command line without --bind.", scope="server", flags=("--host",)),
    Setting("port", "int", 8000,
            "Port of the default listen address: of a group that sets no listen, or of the "
            "command line without --bind.", scope="server", flags=("--port",), check=_port),
    Setting("workers", "int", _default_workers, "Worker processes.",
            flags=("-w", "--workers"), metavar="N", check=at_least(1),
            default_doc="$WEB_CONCURRENCY or 1"),
    Setting("threads", "int", 1,
            "Threads per worker that run the app while the worker's compiled loop keeps "
            "accepting, reading and writing (for groups whose requests wait on I/O).",
            flags=("--threads",), metavar="N", check=at_least(1)),
    Setting("reuse_port", "bool", True,
            "One SO_REUSEPORT listening socket per worker (the kernel spreads connections); "
            "false: one socket shared by the group's workers.", flags=("--reuse-port",)),
    Setting("backlog", "int", 2048, "Listen queue length of each socket.",
            flags=("--backlog",), metavar="N", check=at_least(1)),
    Setting("preload", "bool", False,
            "Import the app in the master before forking (shared copy-on-write; a reload "
            "then keeps the old code, unless reload is on).", flags=("--preload",)),
    Setting("root_path", "str", "", "SCRIPT_NAME for the app (the prefix it is mounted under).",
            flags=("--root-path",), metavar="PATH"),
    # ---- a group: time
    Setting("timeout", "float", 30.0,
            "Seconds one request may run before its worker is aborted (SIGABRT, which dumps "
            "its Python stack, then SIGKILL) and replaced; for ASGI, seconds the event loop "
            "may stay blocked while requests run. 0 disables it.",
            flags=("-t", "--timeout"), metavar="SECONDS", check=at_least(0)),
    Setting("graceful_timeout", "float", 30.0,
            "Seconds in-flight requests get to finish on shutdown or reload before workers "
            "are killed (for a process: after its stop_signal, before KILL).",
            flags=("--graceful-timeout",), metavar="SECONDS", check=at_least(0)),
    Setting("keep_alive", "float", 5.0,
            "Seconds an idle keep-alive connection is kept open (0 disables keep-alive).",
            flags=("--keep-alive",), metavar="SECONDS", check=at_least(0)),
    Setting("client_timeout", "float", 30.0,
            "Seconds a new connection may wait before its first byte, a request's line and "
            "headers may take from its first byte, and a request body or a response may go "
            "without progress, before the connection is closed (slowloris guard). Formerly "
            "header_timeout: --header-timeout, FASTPOOL_HEADER_TIMEOUT and the key "
            "header_timeout still work; giving both names is an error.",
            flags=("--client-timeout",), metavar="SECONDS", check=at_least(0),
            aliases=("header_timeout",)),
    Setting("max_requests", "int", 0,
            "Requests a worker serves before it is replaced (0: never), like gunicorn.",
            flags=("--max-requests",), metavar="N", check=at_least(0)),
    Setting("max_requests_jitter", "int", 0,
            "A random 0..N added to max_requests per worker, so workers do not all restart "
            "at once.", flags=("--max-requests-jitter",), metavar="N", check=at_least(0)),
    Setting("max_rss", "int", 0,
            "Recycle a worker (gracefully: a new one starts first) whose resident memory "
            "passes this many MiB, checked once a second; 0: never. Counted as cause max_rss "
            "in fastpool_worker_restarts_total.", flags=("--max-rss",), metavar="MIB",
            check=at_least(0)),
    # ---- a group: limits
    Setting("limit_request_line", "int", 4094,
            "Largest request line in bytes (larger: 414). 0 means unlimited.",
            flags=("--limit-request-line",), metavar="BYTES", check=at_least(0)),
    Setting("limit_request_fields", "int", 100,
            "Most header fields in a request (more: 431). 0 means unlimited.",
            flags=("--limit-request-fields",), metavar="N", check=at_least(0)),
    Setting("limit_request_field_size", "int", 8190,
            "Largest header field (name, colon, value) in bytes (larger: 431). 0 means "
            "unlimited.", flags=("--limit-request-field-size",), metavar="BYTES",
            check=at_least(0)),
    Setting("limit_request_body", "int", 0,
            "Largest request body in bytes (larger: 413). 0 means unlimited.",
            flags=("--limit-request-body",), metavar="BYTES", check=at_least(0)),
    # ---- a group: processes
    Setting("nice", "int", 0,
            "Scheduling niceness of the group's workers, or of a process (-20..19; higher "
            "yields the CPU to other groups).", flags=("--nice",), metavar="N", check=_nice),
    Setting("cpus", "ints", [],
            "CPU numbers the group's workers, or a process, may run on (empty: any).",
            flags=("--cpus",), metavar="LIST", check=_cpus, default_doc="any"),
    Setting("crash_limit", "int", 5,
            "Worker deaths within 30 s of their boot, in a row, after which the group is "
            "declared crash-looping and stopped instead of respawned; for a process, failed "
            "exits (non-zero or by a signal) within 30 s of its start.",
            flags=("--crash-limit",), metavar="N", check=at_least(1)),
    Setting("on_crash_loop", "str", "stop-group",
            "What a crash-looping group or process does to the server: stop-group (only it "
            "stops; the others keep running) or stop-server.", flags=("--on-crash-loop",),
            metavar="ACTION", check=choice("stop-group", "stop-server")),
    Setting("routes", "list", [],
            "Path prefixes this group serves on every listener of the server: a worker of "
            "any group that reads such a request hands the connection to this group "
            "(longest prefix wins, whole path segments, on the decoded and normalised path). "
            "A group with routes needs no listener.", check=_routes, env_var=False),
    Setting("max_pending", "int", 0,
            "Connections that may wait for this group's workers, handed over by routes or "
            "queued on a listening socket of its own; past that, requests get 503 with "
            "Retry-After at once, without the app (0: no limit).",
            flags=("--max-pending",), metavar="N", check=at_least(0)),
    Setting("retry_after", "int", 5,
            "Seconds in the Retry-After header of a 503 from admission control (0: no "
            "header).", flags=("--retry-after",), metavar="SECONDS", check=at_least(0)),
    Setting("max_queue_wait", "float", 0.0,
            "Seconds a request may wait for this group's workers (handed over, or queued on "
            "its own listening socket, counted from when its bytes reached the kernel) before "
            "it gets 503 with Retry-After instead of the app (0: no limit).",
            flags=("--max-queue-wait",),
            metavar="SECONDS", check=at_least(0)),
    Setting("health_path", "str", None,
            "A path (e.g. /healthz) the server answers itself, without calling the app: 200, "
            "or 503 once a graceful stop has begun.", flags=("--health-path",), metavar="PATH",
            check=_url_path),
    Setting("forwarded_allow_ips", "list", ["127.0.0.1", "::1"],
            "Peers whose X-Forwarded-For / X-Forwarded-Proto set REMOTE_ADDR and "
            "wsgi.url_scheme ('*': any peer; unix-socket peers need '*').",
            flags=("--forwarded-allow-ips",), metavar="IPS",
            default_doc="`127.0.0.1,::1`"),
    Setting("proxy_protocol", "bool", False,
            "Every connection on this group's listeners (tls_listen too: before the TLS "
            "handshake) begins with a PROXY protocol header, v1 or v2 (HAProxy send-proxy, "
            "AWS NLB); a connection without a valid one gets 400. Its addresses become the "
            "client and server only from peers in forwarded_allow_ips.",
            flags=("--proxy-protocol",)),
    Setting("access_log", "str", None,
            "Write an access log line per request to this file ('-' is stdout). Off by "
            "default.", flags=("--access-log",), metavar="PATH"),
    Setting("access_log_format", "str", GUNICORN_FORMAT,
            "The access log line: a format of gunicorn's atoms (README, Logs), or 'json' "
            "(one JSON object per line). An unknown atom stops the start.",
            flags=("--access-log-format",), metavar="FORMAT", check=check_format),
    # ---- static files (fastpool._static)
    Setting("static", "mounts", [],
            "Static files served by the workers without calling the app: URL prefix = "
            "directory (config: a table; flag: --static /static=public/static, repeatable). "
            "GET and HEAD of a file under a mount are answered from it; anything else falls "
            "through to the app. Directories are relative to the config file's directory "
            "(or the current one, --chdir's when given).", flags=("--static",),
            metavar="PREFIX=DIR", check=_mounts),
    Setting("static_max_age", "int", 0,
            "Cache-Control: public, max-age=N on static files (0: no Cache-Control).",
            flags=("--static-max-age",), metavar="SECONDS", check=at_least(0)),
    Setting("static_precompressed", "bool", True,
            "Send NAME.br or NAME.gz beside a static file instead of it when the client's "
            "Accept-Encoding allows (with Content-Encoding and Vary: Accept-Encoding).",
            flags=("--static-precompressed",)),
    Setting("static_follow_symlinks", "bool", False,
            "Follow symlinks under a static directory that point outside it (by default "
            "they are refused and the request goes to the app).",
            flags=("--static-follow-symlinks",)),
    # ---- TLS (fastpool.tls)
    Setting("certfile", "str", None,
            "The TLS certificate (PEM; the chain may follow it) of tls_listen. Relative paths "
            "are relative to the config file's directory (or the current one).",
            flags=("--certfile",), metavar="PATH"),
    Setting("keyfile", "str", None,
            "The certificate's private key (PEM); unset: the key is in certfile.",
            flags=("--keyfile",), metavar="PATH"),
    Setting("keyfile_password", "str", None, "The password of an encrypted keyfile.",
            flags=("--keyfile-password",), metavar="PASSWORD"),
    Setting("ca_certs", "str", None,
            "CA certificates (PEM) that client certificates are verified against.",
            flags=("--ca-certs",), metavar="PATH"),
    Setting("client_certs", "str", "none",
            "Client certificates: none (not asked for), optional (verified when given) or "
            "required (the handshake fails without one). Needs ca_certs.",
            flags=("--client-certs",), metavar="MODE",
            check=choice("none", "optional", "required")),
    Setting("tls_ciphers", "str", None,
            "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's); unset: Python's "
            "default.", flags=("--tls-ciphers",), metavar="CIPHERS"),
    Setting("tls_min_version", "str", "1.2", "The oldest TLS version accepted: 1.2 or 1.3.",
            flags=("--tls-min-version",), metavar="VERSION", check=choice("1.2", "1.3")),
    Setting("ktls", "bool", True,
            "Hand the record encryption to the kernel after the handshake where Linux, OpenSSL "
            "and Python allow it (kernel TLS: sendfile and plain handoffs over TLS); "
            "fastpool check says whether they do.", flags=("--ktls",)),
    # ---- the server as a whole
    Setting("chdir", "str", None, "Change to this directory before loading the apps.",
            scope="server", flags=("--chdir",), metavar="DIR"),
    Setting("log_level", "str", "info", "Error log level: debug, info, warning, error, critical.",
            scope="server", flags=("--log-level",), metavar="LEVEL",
            check=choice("debug", "info", "warning", "error", "critical")),
    Setting("error_log", "str", "-",
            "The error log of the master and the workers: '-' is stderr, else a file "
            "(appended to; SIGUSR1 reopens it). Relative to the config file's directory "
            "(or the current one). Fixed at start.",
            scope="server", flags=("--error-log",), metavar="PATH"),
    Setting("log_config", "str", None,
            "A logging.config.dictConfig file (.json or .toml) applied after fastpool's "
            "defaults: loggers fastpool.error and fastpool.access (README, Logs). Relative "
            "to the config file's directory (or the current one). Fixed at start.",
            scope="server", flags=("--log-config",), metavar="PATH"),
    Setting("control_socket", "str", ".fastpool.sock",
            "The master's control socket (mode 0600) for fastpool status/reload/scale; "
            "relative paths are relative to the config file's directory (or the current one). "
            "A server refuses to start on a socket another running master listens on.",
            scope="server", flags=("--control-socket",), metavar="PATH"),
    Setting("metrics_listen", "str", None,
            "Serve Prometheus metrics (GET /metrics; OpenMetrics when the scraper asks) on "
            "this HOST:PORT or unix:PATH, from the master: per-group request counts, "
            "durations, workers, restarts, handoffs, listen queues, and the apps' own "
            "prometheus_client metrics (fastpool[metrics]) merged across workers. Off by "
            "default.", scope="server", flags=("--metrics-bind",), metavar="ADDRESS"),
    # ---- reload on code change, for development (fastpool.autoreload)
    Setting("reload", "bool", False,
            "Development only: reload (rolling, as SIGHUP does) when a watched file changes. "
            "Off by default; fastpool check says whether it is on.", scope="server",
            flags=("--reload",)),
    Setting("reload_dirs", "list", [],
            "Directories watched by reload, recursively (repeatable); relative ones are "
            "relative to the config file's directory (or the current one). The config file "
            "is always watched.", scope="server", flags=("--reload-dir",), metavar="DIR",
            default_doc="the current directory (after --chdir)"),
    Setting("reload_includes", "list", [],
            "Globs of file names whose change reloads (repeatable), added to `*.py`; they win "
            "over the default excludes.", scope="server", flags=("--reload-include",),
            metavar="GLOB", default_doc="`*.py`"),
    Setting("reload_excludes", "list", [],
            "Globs of file or directory names that never reload (repeatable), added to the "
            "defaults; they win over any include.", scope="server",
            flags=("--reload-exclude",), metavar="GLOB",
            default_doc="`.*`, `__pycache__`, `*.swp`, `*.swo`, `*~`, `.#*`, `4913`, `*.tmp`"),
    Setting("reload_watcher", "str", "auto",
            "How reload watches: watchfiles (pip install 'fastpool[reload]'), poll "
            "(modification times, every second), or auto (watchfiles when installed).",
            scope="server", flags=("--reload-watcher",), metavar="KIND",
            check=choice("auto", "watchfiles", "poll")),
    Setting("pid_file", "str", None,
            "Write the master's pid to this file at start and remove it at exit (relative "
            "paths: to the config file's directory, or the current one, --chdir's when "
            "given). A server refuses to "
            "start (exit 2) while the file names a running fastpool master; a stale file is "
            "overwritten.", scope="server", flags=("--pid",), metavar="FILE"),
    Setting("env_file", "str", None,
            "A dotenv file (NAME=value lines) the master loads into the environment before it "
            "imports the apps and forks, read again on every reload; variables already in the "
            "environment win. It is for the apps (and processes) only, as uvicorn's "
            "--env-file: fastpool's settings (FASTPOOL_*, WEB_CONCURRENCY) and the ${VAR} of "
            "commands are never read from it. Relative paths: to "
            "the config file's directory (or the current one, --chdir's when given). Needs "
            "python-dotenv (pip install 'fastpool[dotenv]').", scope="server",
            flags=("--env-file",), metavar="FILE"),
    # ---- [process.NAME] tables (fastpool.process)
    Setting("target", "str", None,
            "A supervised Python process: MODULE:CALLABLE called with no arguments in a forked "
            "child, respawned (with backoff) when it returns or dies. Give target or command.",
            scope="process", env_var=False),
    Setting("command", "argv", None,
            "A supervised program: its path or name (looked up on PATH) and its arguments, "
            "exec'd in a forked child in its own process group, never through a shell; "
            "${VAR} is replaced by the variable of fastpool's environment, ${VAR:-DEFAULT} by "
            "DEFAULT where it is unset or empty (unset without a default: a config "
            "error, as is a missing executable; $$ is a $). Its stdout and stderr lines go to the "
            "error log as [NAME INDEX] text. Give target or command.",
            scope="process", env_var=False),
    Setting("count", "int", 1, "How many copies of the process run.", scope="process",
            env_var=False, check=at_least(1)),
    Setting("env", "env", [],
            "Environment variables added to the process's environment (a table of strings); "
            "every copy also gets FASTPOOL_PROCESS_NAME and FASTPOOL_PROCESS_INDEX.",
            scope="process", env_var=False, check=_environment),
    Setting("cwd", "str", None,
            "The process's working directory, relative to the config file's directory "
            "(unset: the server's).", scope="process", env_var=False),
    Setting("stop_signal", "str", "TERM",
            "The signal a graceful stop sends (to a command's whole process group), by name "
            "without SIG; KILL follows after graceful_timeout.", scope="process",
            env_var=False, check=_stop_signal),
)
SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
GROUP_SETTINGS = tuple(s for s in SETTINGS if s.scope == "group")
SERVER_SETTINGS = tuple(s for s in SETTINGS if s.scope == "server")
# A process shares the group rows that make sense for any supervised child.
PROCESS_SETTINGS = tuple(s for s in SETTINGS if s.scope == "process") + tuple(
    SETTINGS_BY_NAME[n] for n in ("nice", "cpus", "graceful_timeout", "crash_limit",
                                  "on_crash_loop"))


# ---------------------------------------------------------------- resolved config

# Every alias, and the name it stands for.
ALIASES: dict[str, str] = {alias: s.name for s in SETTINGS for alias in s.aliases}


def _frozen(value: Any) -> Any:
    """A value nobody can change in place: lists become tuples."""
    if isinstance(value, list):
        return tuple(value)
    return value


def _read_only(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only mapping over a copy of ``values`` (already read-only: kept)."""
    if isinstance(values, MappingProxyType):
        return values
    return MappingProxyType({name: _frozen(value) for name, value in values.items()})


class _Values:
    """Settings readable as attributes (``group.workers``, or under an alias:
    ``group.header_timeout``) from the read-only ``values``.

    The attributes are declared, typed, by the generated ``*Settings`` base
    classes (fastpool/settings_types.py); their values live in ``values``."""

    values: Mapping[str, Any]

    if not TYPE_CHECKING:   # type checkers see the declared attributes, and only those
        def __getattr__(self, name: str) -> Any:
            try:
                values = self.__dict__["values"]
            except KeyError:
                raise AttributeError(name) from None
            try:
                return values[ALIASES.get(name, name)]
            except KeyError:
                raise AttributeError(name) from None

    def with_values(self, **changes: Any) -> Any:
        """A copy of this config with some values replaced (by name or alias)."""
        values = dict(self.values)
        for name, value in changes.items():
            name = ALIASES.get(name, name)
            if name not in values:
                raise KeyError(f"{type(self).__name__} has no setting {name!r}")
            values[name] = value
        return dataclasses.replace(self, values=values)   # type: ignore[type-var]

    def __reduce__(self) -> tuple[Any, ...]:
        # A read-only mapping does not pickle; the plain copy it was made from does.
        args = [getattr(self, f.name) for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        return type(self), tuple(dict(a) if isinstance(a, MappingProxyType) else a
                                 for a in args)


@dataclass(frozen=True)
class GroupConfig(GroupSettings, _Values):
    """The settings of one worker group.

    ``listen_source`` says where its listen addresses came from, for messages:
    ``group`` (its table, a flag or the environment), ``server`` (``[server]
    listen``) or ``default`` (none set: the server's host and port)."""

    name: str
    values: Mapping[str, Any]
    listen_source: str = "group"

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _read_only(self.values))


@dataclass(frozen=True)
class ProcessConfig(ProcessSettings, _Values):
    """The settings of one supervised process."""

    name: str
    values: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _read_only(self.values))

    @property
    def runs(self) -> str:
        """What it runs, in words: ``command rq worker``, ``target jobs:consume``."""
        if self.command is not None:
            return f"command {shlex.join(self.command)}"
        return f"target {self.target}"


@dataclass(frozen=True)
class ServerConfig(ServerSettings, _Values):
    """Everything ``fastpool serve`` runs: server settings, groups, processes."""

    values: Mapping[str, Any]
    groups: Mapping[str, GroupConfig] = field(default_factory=dict)
    processes: Mapping[str, ProcessConfig] = field(default_factory=dict)
    path: Path | None = None     # the config file, when there is one

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _read_only(self.values))
        for name in ("groups", "processes"):
            mapping = getattr(self, name)
            if not isinstance(mapping, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(mapping)))

    @property
    def control_path(self) -> Path:
        path = self._beside_config(self.values["control_socket"])
        assert path is not None
        return path

    @property
    def pid_path(self) -> Path | None:
        return self._beside_config(self.values["pid_file"])

    @property
    def env_path(self) -> Path | None:
        return self._beside_config(self.values["env_file"])

    def _beside_config(self, text: str | None) -> Path | None:
        """A path setting: relative ones start in the config file's directory
        (or the current one)."""
        if text is None:
            return None
        path = Path(text)
        if not path.is_absolute():
            base = self.path.parent if self.path is not None else Path.cwd()
            path = base / path
        return path


# ---------------------------------------------------------------- the command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting that has flags, and one per alias of it (its own
    ``dest``, so that ``load`` can tell which name was given).  Defaults stay
    ``None`` so that precedence can be applied in ``load``."""
    for setting in SETTINGS:
        if not setting.flags:
            continue
        for name in setting.names:
            flags = setting.flags if name == setting.name else (alias_flag(name),)
            text = setting.help if name == setting.name else (
                f"The former name of {setting.cli} (still accepted).")
            if setting.type == "bool":
                parser.add_argument(*flags, dest=name, default=None,
                                    action=argparse.BooleanOptionalAction, help=text)
            elif setting.type in ("list", *PAIR_TYPES):
                parser.add_argument(*flags, dest=name, default=None, action="append",
                                    metavar=setting.metavar, help=text)
            else:
                parser.add_argument(*flags, dest=name, default=None,
                                    metavar=setting.metavar, help=text)


def _one_name(setting: Setting, given: Sequence[str]) -> str | None:
    """The one name (of ``given``, as the operator wrote them) a setting was
    given under in one place, or None; two names is an error naming both."""
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]} are the same setting "
                          f"({setting.name}, formerly {' and '.join(setting.aliases)}): "
                          "give only one")
    return given[0] if given else None


def _given(setting: Setting, cli: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    """The flag's or the environment's value (under the name or an alias), or
    None when neither is set."""
    flags = {setting.flag_for(name): cli[name] for name in setting.names
             if cli.get(name) is not None}
    flag = _one_name(setting, list(flags))
    if flag is not None:
        raw = flags[flag]
        if setting.type == "bool":
            return bool(raw)
        if setting.type in ("list", *PAIR_TYPES):
            values = []
            for item in raw:
                values.extend(setting.from_text(item, flag))
            return values
        return setting.from_text(raw, flag)
    if not setting.env_var:
        return None
    env = _one_name(setting, [env_name(name) for name in setting.names
                              if env_name(name) in environ])
    if env is not None:
        return setting.from_text(environ[env], env)
    return None


# ---------------------------------------------------------------- the config file

def find_config(explicit: str | None) -> tuple[Path | None, dict[str, Any]]:
    """The config file and its fastpool table: ``--config F``, else
    ``[tool.fastpool]`` in ./pyproject.toml, else nothing."""
    if explicit is not None:
        path = Path(explicit)
        try:
            with path.open("rb") as handle:
                return path.resolve(), tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"--config: {explicit}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"--config: {explicit}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{explicit}: not valid TOML: {exc}") from None
    pyproject = Path("pyproject.toml")
    if pyproject.is_file():
        try:
            with pyproject.open("rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"pyproject.toml: not valid TOML: {exc}") from None
        table = data.get("tool", {}).get("fastpool")
        if table is not None:
            if not isinstance(table, dict):
                raise ConfigError("pyproject.toml: [tool.fastpool] must be a table")
            return pyproject.resolve(), table
    return None, {}


def _table(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    return data


def _read_table(table: dict[str, Any], allowed: Sequence[Setting], where: str) -> dict[str, Any]:
    """Type-check one TOML table against the rows allowed there; the values
    are keyed by the rows' names (a key may be an alias)."""
    by_name = {name: s for s in allowed for name in s.names}
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}     # the key each value was given under
    for key, raw in table.items():
        setting = by_name.get(key)
        if setting is None:
            known = ", ".join(sorted(s.name for s in allowed))
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {known})")
        if setting.name in keys:
            _one_name(setting, [f"{where} {keys[setting.name]}".strip(), key])
        keys[setting.name] = key
        values[setting.name] = setting.from_file(raw, f"{where} {key}")
    return values


def load(cli: Mapping[str, Any], environ: Mapping[str, str] | None = None,
         config: str | None = None, app: str | None = None) -> ServerConfig:
    """Resolve flags, environment and config file into a ``ServerConfig``.

    With a config file, groups and processes come from it (either may be
    absent, not both: a file of processes only is supervised, serving
    nothing); without one, the command line describes a single group named
    ``main``.
    """
    environ = os.environ if environ is None else environ
    path, data = find_config(config)
    label = _label(path)

    if path is None or (app is not None and config is None):
        # The command line alone (a pyproject table is ignored when APP is given).
        if app is None:
            raise ConfigError("no app given: fastpool serve APP, or --config FILE")
        path, data = None, {"group": {DEFAULT_GROUP: {"app": app}}}
    elif app is not None:
        raise ConfigError(f"give either APP or --config, not both (APP {app!r} with {label})")

    allowed_top = {"server", "group", "process"}
    for key, value in data.items():
        if key in allowed_top:
            continue
        if isinstance(value, dict):
            raise ConfigError(f"{label}: unknown table [{key}] (expected [server], "
                              "[group.NAME] or [process.NAME])")
        raise ConfigError(f"{label}: unknown key {key!r} at the top level (settings go in "
                          "[server] or a [group.NAME] table)")
    server, server_table = _server(cli, environ, path, data, label)
    values = server.values
    group_configs: dict[str, GroupConfig] = {}
    process_configs: dict[str, ProcessConfig] = {}

    groups = _table(data.get("group", {}), f"{label} [group]")
    processes = _table(data.get("process", {}), f"{label} [process]")
    if not groups and not processes:
        # Groups serve; processes alone are supervised. Neither: nothing to run.
        raise ConfigError(f"{label}: no [group.NAME] or [process.NAME] table: nothing to run")
    cli_listen = cli.get("listen")
    for name, table in groups.items():
        where = f"{label}: [group.{name}]" if path is not None else ""
        group_values = _read_table(_table(table, where or name), GROUP_SETTINGS, where)
        resolved: dict[str, Any] = {}
        for setting in GROUP_SETTINGS:
            if path is not None and setting.name == "listen" and cli_listen:
                raise ConfigError(f"--bind cannot be combined with {label}; "
                                  "set listen in the file")
            given = _given(setting, cli, environ)
            if given is None:
                given = group_values.get(setting.name, server_table.get(setting.name))
            resolved[setting.name] = (setting.resolve_default(environ) if given is None
                                      else given)
        if not resolved["app"]:
            raise ConfigError(f"{where}: no app (set app here or in [server])")
        source = "server" if "listen" not in group_values and "listen" in server_table \
            else "group"
        if not resolved["listen"] and resolved["routes"]:
            resolved["listen"] = []     # served through the other groups' listeners
        elif not resolved["listen"] and resolved["tls_listen"]:
            resolved["listen"] = []     # TLS only
        elif not resolved["listen"]:
            # The documented default: the server's host and port (127.0.0.1:8000).
            resolved["listen"] = [host_port(values["host"], values["port"])]
            source = "default"
        if resolved["static"]:
            resolved["static"] = _static_directories(resolved["static"], path, values["chdir"],
                                                     where)
        for key in ("certfile", "keyfile", "ca_certs"):
            if resolved[key]:
                resolved[key] = str((path.parent if path is not None
                                     else Path(values["chdir"] or ".")).resolve()
                                    / resolved[key])
        group_configs[name] = GroupConfig(name, resolved, source)
    _check_routes(group_configs, label)

    for name, table in processes.items():
        where = f"{label}: [process.{name}]"
        if name in group_configs:
            raise ConfigError(f"{where}: [group.{name}] has the same name; give the process "
                              "another one (fastpool scale and restart take either)")
        process_values = _read_table(_table(table, where), PROCESS_SETTINGS, where)
        if ("target" in process_values) == ("command" in process_values):
            raise ConfigError(
                f"{where}: give target or command, not both" if "target" in process_values
                else f"{where}: no target or command (expected target = \"module:callable\" "
                     "or command = [\"program\", \"argument\", ...])")
        resolved = {s.name: process_values.get(s.name, server_table.get(s.name))
                    for s in PROCESS_SETTINGS}
        for setting in PROCESS_SETTINGS:
            if resolved[setting.name] is None:
                resolved[setting.name] = setting.resolve_default(environ)
        if resolved["cwd"] is not None:
            resolved["cwd"] = _process_directory(resolved["cwd"], path, where)
        if resolved["command"] is not None:
            resolved["command"] = _command(resolved["command"], environ, resolved, values,
                                           where)
        process_configs[name] = ProcessConfig(name, resolved)
    return dataclasses.replace(server, groups=group_configs, processes=process_configs)


def load_server(cli: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                config: str | None = None) -> ServerConfig:
    """Only the server's own settings (no groups, no processes), with the same
    precedence as ``load``: what ``fastpool status/reload/scale`` need to find
    a running master's control socket."""
    environ = os.environ if environ is None else environ
    path, data = find_config(config)
    return _server(cli, environ, path, data, _label(path))[0]


def source_of(name: str, cli: Mapping[str, Any], environ: Mapping[str, str],
              path: Path | None) -> str:
    """Where the value of setting ``name`` came from, as messages name it (its
    flag, its environment variable, or its key in ``[server]``): for values
    checked after loading (``fastpool.autoreload.plan``)."""
    setting = SETTINGS_BY_NAME[name]
    for given in setting.names:
        if cli.get(given) is not None:
            return setting.flag_for(given) or given
    if setting.env_var:
        for given in setting.names:
            if env_name(given) in environ:
                return env_name(given)
    return f"{_label(path)}: [server] {name}" if path is not None else name


def _label(path: Path | None) -> str:
    """How messages name the config file."""
    if path is None:
        return ""
    return "pyproject.toml: [tool.fastpool]" if path.name == "pyproject.toml" else path.name


def _server(cli: Mapping[str, Any], environ: Mapping[str, str], path: Path | None,
            data: dict[str, Any], label: str) -> tuple[ServerConfig, dict[str, Any]]:
    """The server-scope settings, and the checked ``[server]`` table (whose
    group rows are the default of every group)."""
    server_table = _read_table(_table(data.get("server", {}), f"{label} [server]"),
                               SERVER_SETTINGS + GROUP_SETTINGS, f"{label}: [server]".strip(": "))
    values: dict[str, Any] = {}
    for setting in SERVER_SETTINGS:
        given = _given(setting, cli, environ)
        if given is None:
            given = server_table.get(setting.name)
        values[setting.name] = setting.resolve_default() if given is None else given
    base = path.parent if path is not None else Path.cwd()
    for key in ("error_log", "log_config"):
        if values[key] not in (None, "-"):
            values[key] = str(base / values[key])
        values[setting.name] = setting.resolve_default(environ) if given is None else given
    return ServerConfig(values=values, path=path), server_table


def _static_directories(mounts: Sequence[tuple[str, str]], path: Path | None,
                        chdir: str | None, where: str) -> list[tuple[str, str]]:
    """Each mount's directory as an absolute path, relative ones taken from the
    config file's directory (or the current one: --chdir's when it is given);
    each must be a directory."""
    base = path.parent if path is not None else Path(chdir or ".").resolve()
    resolved = []
    for prefix, directory in mounts:
        full = (base / directory).resolve()
        if not full.is_dir():
            what = "not a directory" if full.exists() else "no such directory"
            raise ConfigError(f"{where + ' ' if where else ''}static {prefix}: {directory}: "
                              f"{what} ({full})".lstrip())
        resolved.append((prefix, str(full)))
    return resolved


def _process_directory(cwd: str, path: Path | None, where: str) -> str:
    """A process's ``cwd`` as an absolute path (relative to the config file's
    directory), which must be a directory."""
    base = path.parent if path is not None else Path.cwd()
    full = (base / cwd).resolve()
    if not full.is_dir():
        raise ConfigError(f"{where} cwd: {cwd}: "
                          f"{'not a directory' if full.exists() else 'no such directory'} "
                          f"({full})")
    return str(full)


# ``${NAME}`` in a command: replaced by the variable of the environment;
# ``${NAME:-DEFAULT}`` by DEFAULT where it is unset or empty (the shell's
# rule); ``$$`` is a ``$`` (``$${NAME}`` reaches the program as ``${NAME}``).
COMMAND_VARIABLE = re.compile(r"\$(?:(\$)|\{([^}]*)\})")


def _command(argv: Sequence[str], environ: Mapping[str, str], process: Mapping[str, Any],
             server: Mapping[str, Any], where: str) -> list[str]:
    """A process's command with its ``${VAR}`` replaced from ``environ``; the
    program must exist (looked up on PATH as execvp does, the process's env
    included), so that a typo stops the server at start, not in a respawn loop."""
    def variable(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name, has_default, default = match.group(2).partition(":-")
        if has_default and not environ.get(name):
            return default
        if name not in environ:
            raise ConfigError(f"{where} command: ${{{name}}} is not set in the environment "
                              f"(${{{name}:-DEFAULT}} gives a default)")
        return environ[name]

    expanded = [COMMAND_VARIABLE.sub(variable, part) for part in argv]
    program = expanded[0]
    if "/" in program:
        # A path: relative ones start from the process's working directory.
        base = Path(process["cwd"] or server["chdir"] or ".")
        candidate = base / program
        found = candidate.is_file() and os.access(candidate, os.X_OK)
    else:
        search = dict(process["env"]).get("PATH", environ.get("PATH", os.defpath))
        found = shutil.which(program, path=search) is not None
    if not found:
        raise ConfigError(f"{where} command: {program!r}: no such executable"
                          + ("" if "/" in program else " on PATH"))
    return expanded


def _check_routes(groups: Mapping[str, GroupConfig], label: str) -> None:
    """Each prefix belongs to one group, and someone listens."""
    owners: dict[str, str] = {}
    for name, group in groups.items():
        for prefix in group.routes:
            key = prefix_key(prefix)
            if key in owners and owners[key] != name:
                raise ConfigError(f"{label}: route {prefix!r} is claimed by both "
                                  f"[group.{owners[key]}] and [group.{name}]".lstrip(": "))
            owners[key] = name
    if owners and not any(group.listen or group.tls_listen for group in groups.values()):
        raise ConfigError(f"{label}: no group has a listen address; routes need at least "
                          "one group that accepts connections".lstrip(": "))


def host_port(host: str, port: int) -> str:
    """--host and --port as one address (IPv6 hosts in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# ---------------------------------------------------------------- docs

def markdown_table(settings: Sequence[Setting] = SETTINGS) -> str:
    """The settings table of README.md (a test checks README is current)."""
    lines = [
        "| setting | where | flag | environment | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    where_text = {"group": "group, [server]", "server": "[server]", "process": "[process.NAME]"}
    for s in settings:
        if s.type == "bool" and s.flags:
            flag = f"`{s.cli}` / `--no-{s.cli[2:]}`"
        elif s.name == "app":
            flag = "APP"
        else:
            flag = " ".join(f"`{f}`" for f in s.flags) or "—"
        env = f"`{s.env}`" if s.env_var else "—"
        name = s.name
        if s.aliases:
            name += "".join(f" (alias {alias})" for alias in s.aliases)
            if s.flags:
                flag += "".join(f" (alias `{alias_flag(alias)}`)" for alias in s.aliases)
            if s.env_var:
                env += "".join(f" (alias `{env_name(alias)}`)" for alias in s.aliases)
        if s.default_doc is not None:
            default = s.default_doc
        elif s.default is None or s.default == []:
            default = "—"
        elif isinstance(s.default, bool):
            default = f"`{str(s.default).lower()}`"
        else:
            default = f"`{s.default!r}`" if isinstance(s.default, str) else f"`{s.default}`"
        lines.append(f"| {name} | {where_text[s.scope]} | {flag} | {env} | {default} | "
                     f"{s.help} |")
    return "\n".join(lines)


README_START = "<!-- settings-table:start -->"
README_END = "<!-- settings-table:end -->"


def update_readme(path: Path) -> None:
    """Replace the table between README's markers with the current one."""
    text = path.read_text()
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    path.write_text(f"{head}{README_START}\n{markdown_table()}\n{README_END}{tail}")


TYPES_PATH = Path(__file__).with_name("settings_types.py")
PYTHON_TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "str",
                "list": "tuple[str, ...]", "ints": "tuple[int, ...]",
                "mounts": "tuple[tuple[str, str], ...]", "argv": "tuple[str, ...]",
                "env": "tuple[tuple[str, str], ...]"}


def settings_types() -> str:
    """The text of fastpool/settings_types.py: each config's settings as typed
    attributes (a test checks the file is current)."""
    classes = (
        ("GroupSettings", "GroupConfig", GROUP_SETTINGS),
        ("ServerSettings", "ServerConfig", SERVER_SETTINGS),
        ("ProcessSettings", "ProcessConfig", PROCESS_SETTINGS),
    )
    lines = [
        '"""The settings as typed attributes of the configs, generated from the table.',
        "",
        "Do not edit: ``python -m fastpool.settings --write-types`` writes this file from",
        "the rows of ``fastpool.settings.SETTINGS`` (a test checks that it is current).",
        "Type checkers read these declarations; at run time each value comes from the",
        "config's read-only ``values``.",
        '"""',
        "",
        "from __future__ import annotations",
    ]
    for class_name, config_name, rows in classes:
        lines += ["", "", f"class {class_name}:",
                  f'    """Every {config_name} setting, as an attribute."""', ""]
        for row in rows:
            annotation = PYTHON_TYPES[row.type]
            if row.default is None and not row.always_set:
                annotation += " | None"
            lines.append(f"    {row.name}: {annotation}")
            for alias in row.aliases:
                lines.append(f"    {alias}: {annotation}    # alias of {row.name}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """``python -m fastpool.settings``: print the README table;
    ``--update-readme FILE``: rewrite it in FILE; ``--types``: print
    settings_types.py; ``--write-types``: rewrite it."""
    if len(argv) == 2 and argv[0] == "--update-readme":
        update_readme(Path(argv[1]))
    elif list(argv) == ["--types"]:
        print(settings_types(), end="")
    elif list(argv) == ["--write-types"]:
        TYPES_PATH.write_text(settings_types())
    elif not argv:
        print(markdown_table())
    else:
        print("usage: python -m fastpool.settings [--update-readme FILE | --types | "
              "--write-types]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The settings table: one row per setting, and everything derived from it.

Rules of this module:

* Every setting is one ``Setting`` row in ``SETTINGS``.  The command-line flags,
  the ``FASTPOOL_*`` environment variables and the settings table in README.md
  are all generated from these rows; nothing else lists options.
* Precedence, highest first: command-line flag, environment variable, default.
* Values are validated when they are read, and a bad value is a ``ConfigError``
  whose message names where it came from (``--workers``, ``FASTPOOL_WORKERS``)
  and what was expected, so the operator sees one line, not a traceback.
* ``Config`` holds plain values only; loading the app and binding sockets happen
  later, in the master (``Config`` stays cheap to build and to pickle).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """A setting has a value fastpool cannot use; the message says which and why."""


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port number from 0 to 65535, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _default_workers() -> int:
    # gunicorn and uvicorn both honour WEB_CONCURRENCY; so do we.
    raw = os.environ.get("WEB_CONCURRENCY")
    if raw is None:
        return 1
    try:
        return _positive_int(raw)
    except ValueError:
        raise ConfigError(f"WEB_CONCURRENCY: expected an integer >= 1, got {raw!r}") from None


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    # "flag": a boolean switch (--x / --no-x); "append": may be given several times.
    kind: str = "value"
    # Shown in the docs instead of the default value, when the default is computed.
    default_doc: str | None = None

    @property
    def env(self) -> str:
        return "FASTPOOL_" + self.name.upper()

    @property
    def cli(self) -> str:
        """The long flag, which error messages name."""
        return self.flags[-1] if self.flags else ""

    def resolve_default(self) -> Any:
        return self.default() if callable(self.default) else self.default


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "bind", str, None, "Address to listen on: HOST:PORT, [IPv6]:PORT or unix:PATH. "
        "May be given several times. Overrides --host/--port.",
        ("-b", "--bind"), "ADDRESS", kind="append", default_doc="HOST:PORT",
    ),
    Setting("host", str, "127.0.0.1", "Host to listen on when no --bind is given.", ("--host",)),
    Setting("port", _port, 8000, "Port to listen on when no --bind is given.",
            ("--port",)),
    Setting(
        "workers", _positive_int, _default_workers, "Number of worker processes.",
        ("-w", "--workers"), "N", default_doc="$WEB_CONCURRENCY or 1",
    ),
    Setting(
        "reuse_port", _to_bool, True,
        "One SO_REUSEPORT listening socket per worker (the kernel spreads connections); "
        "--no-reuse-port shares one socket among all workers.",
        ("--reuse-port",), kind="flag",
    ),
    Setting("backlog", _positive_int, 2048, "Listen queue length of each socket.",
            ("--backlog",), "N"),
    Setting("chdir", str, None, "Change to this directory before loading the app.",
            ("--chdir",), "DIR"),
    Setting(
        "preload", _to_bool, False,
        "Import the app in the master before forking (shared copy-on-write; "
        "a reload then needs a restart to pick up code changes).",
        ("--preload",), kind="flag",
    ),
    Setting("root_path", str, "", "SCRIPT_NAME for the app (the prefix it is mounted under).",
            ("--root-path",), "PATH"),
    Setting("keep_alive", _non_negative_float, 5.0,
            "Seconds an idle keep-alive connection is kept open (0 disables keep-alive).",
            ("--keep-alive",), "SECONDS"),
    Setting(
        "header_timeout", _non_negative_float, 30.0,
        "Seconds a client may take to send a request's line, headers and buffered body, "
        "or to accept a response's bytes, before the connection is closed (slowloris guard).",
        ("--header-timeout",), "SECONDS",
    ),
    Setting("graceful_timeout", _non_negative_float, 30.0,
            "Seconds in-flight requests get to finish on shutdown before workers are killed.",
            ("--graceful-timeout",), "SECONDS"),
    Setting("limit_request_line", _non_negative_int, 4094,
            "Largest request line in bytes (larger: 414). 0 means unlimited.",
            ("--limit-request-line",), "BYTES"),
    Setting("limit_request_fields", _non_negative_int, 100,
            "Most header fields in a request (more: 431). 0 means unlimited.",
            ("--limit-request-fields",), "N"),
    Setting("limit_request_field_size", _non_negative_int, 8190,
            "Largest header field (name, colon, value) in bytes (larger: 431). 0 means unlimited.",
            ("--limit-request-field-size",), "BYTES"),
    Setting("limit_request_body", _non_negative_int, 0,
            "Largest request body in bytes (larger: 413). 0 means unlimited.",
            ("--limit-request-body",), "BYTES"),
    Setting("access_log", str, None,
            "Write an access log line per request to this file ('-' is stdout). Off by default.",
            ("--access-log",), "PATH"),
    Setting("log_level", str.lower, "info",
            "Error log level: debug, info, warning, error or critical.",
            ("--log-level",), "LEVEL"),
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class Config:
    """The resolved settings of one ``fastpool serve`` run (plain, picklable values)."""

    app: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def binds(self) -> list[str]:
        return list(self.values["bind"] or [self.host_port])

    @property
    def host_port(self) -> str:
        """--host and --port as one address (IPv6 hosts in brackets)."""
        host = self.values["host"]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.values['port']}"

    @property
    def bind_source(self) -> str:
        """The flag an address error should name."""
        return "--bind" if self.values["bind"] else "--host"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting.  Defaults stay ``None`` so that precedence
    (flag, then environment, then default) can be applied in ``resolve``."""
    for setting in SETTINGS:
        if not setting.flags:
            continue
        dest = setting.name
        if setting.kind == "flag":
            parser.add_argument(
                *setting.flags, dest=dest, default=None,
                action=argparse.BooleanOptionalAction, help=setting.help,
            )
        elif setting.kind == "append":
            parser.add_argument(
                *setting.flags, dest=dest, default=None, action="append",
                metavar=setting.metavar, help=setting.help,
            )
        else:
            parser.add_argument(
                *setting.flags, dest=dest, default=None, metavar=setting.metavar,
                help=setting.help,
            )


def _parse(setting: Setting, raw: str, source: str) -> Any:
    try:
        return setting.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def resolve(app: str, cli_values: Mapping[str, Any],
            environ: Mapping[str, str] | None = None) -> Config:
    """Build a ``Config`` from parsed flags and the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        given = cli_values.get(setting.name)
        if given is not None:
            if setting.kind == "append":
                values[setting.name] = [_parse(setting, v, setting.cli) for v in given]
            elif setting.kind == "flag":
                values[setting.name] = bool(given)
            else:
                values[setting.name] = _parse(setting, given, setting.cli)
        elif setting.env in environ:
            raw = environ[setting.env]
            if setting.kind == "append":
                values[setting.name] = [
                    _parse(setting, part.strip(), setting.env)
                    for part in raw.split(",") if part.strip()
                ]
            else:
                values[setting.name] = _parse(setting, raw, setting.env)
        else:
            values[setting.name] = setting.resolve_default()
    if values["log_level"] not in LOG_LEVELS:
        raise ConfigError(
            f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {values['log_level']!r}"
        )
    return Config(app=app, values=values)


def markdown_table(settings: Sequence[Setting] = SETTINGS) -> str:
    """The settings table of README.md (a test checks README is current)."""
    lines = [
        "| setting | flag | environment | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in settings:
        if s.kind == "flag":
            flag = f"`{s.cli}` / `--no-{s.cli[2:]}`"
        else:
            flag = " ".join(f"`{f}`" for f in s.flags)
        if s.default_doc is not None:
            default = s.default_doc
        elif s.default is None:
            default = "—"
        else:
            default = f"`{s.default!r}`" if isinstance(s.default, str) else f"`{s.default}`"
        lines.append(f"| {s.name} | {flag} | `{s.env}` | {default} | {s.help} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fastpool.settings: print the README table
    print(markdown_table())

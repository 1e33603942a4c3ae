"""The ``fastpool`` command: serve, check, status, reload, scale, restart.

Rules: flags come from the settings table (``fastpool.settings``), never
written here; every operator error is one line on stderr starting with
``Error:`` and a non-zero exit (2 for bad usage or configuration, 1 when the
master cannot be reached).  A command whose stdout is closed early (``fastpool
status | head -1``) stops quietly with exit 141, as a tool killed by SIGPIPE
does in the shell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fastpool import __version__, autoreload, core, log, settings, systemd, tls
from fastpool.control import ControlError, format_status, format_watch, request
from fastpool.envfile import EnvFile
from fastpool.loading import AppLoadError, import_app, resolve_interface
from fastpool.sockets import Address, check_addresses


class _Parser(argparse.ArgumentParser):
    """argparse with operator errors as one ``Error:`` line (exit 2), not a usage dump;
    no abbreviated flags (``--work`` is not ``--workers``); an unknown flag of a
    subcommand points at that subcommand's help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.leftover: list[str] = []
        self.commands: dict[str, _Parser] = {}

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, extras = super().parse_known_args(args, namespace)
        self.leftover = list(extras)   # a subcommand's, read back by the top parser
        return namespace, extras

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(namespace, "command", None) or "")
            if command is not None and command.leftover:
                command.error(f"unrecognized arguments: {' '.join(command.leftover)}")
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {message} (see '{self.prog} --help')\n")


def _add_config_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="a fastpool.toml (default: [tool.fastpool] in ./pyproject.toml)")


def _add_control_target(parser: argparse.ArgumentParser) -> None:
    _add_config_source(parser)
    parser.add_argument("--control-socket", metavar="PATH", dest="control_socket",
                        help="the master's control socket (default: from the config, "
                             "else ./.fastpool.sock)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastpool",
        description="A compiled prefork HTTP/1.1 server for Python WSGI and ASGI apps, with "
                    "worker groups that keep slow endpoints from starving fast ones.",
    )
    parser.add_argument("--version", action="store_true",
                        help="print the version and whether the compiled core is loaded")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, text in (("serve", "serve a WSGI or ASGI app, or the groups of a config file"),
                       ("check", "validate the config, import every app and target, print "
                                 "the plan")):
        command = commands.add_parser(
            name, help=text, description=f"{text[0].upper()}{text[1:]}. Every flag can "
            "also be set with its FASTPOOL_* environment variable; flags override the file.")
        command.add_argument("app", metavar="APP", nargs="?",
                             help="the app as MODULE:ATTRIBUTE or MODULE:FACTORY() "
                                  "(e.g. fastpool.examples.hello:app); omit with --config")
        _add_config_source(command)
        settings.add_arguments(command)
    nginx = commands.add_parser(
        "nginx-config", help="print an nginx config for the same layout",
        description="Print an nginx config fragment (include it inside http { }) with an "
        "upstream per group and a location per route, for running several fastpool hosts "
        "behind nginx.")
    _add_config_source(nginx)
    nginx.add_argument("--upstream-hosts", metavar="H1,H2",
                       help="hosts that run this config (default: the listen addresses)")
    nginx.add_argument("--listen", metavar="PORT", default="80",
                       help="what nginx listens on (default 80)")
    status = commands.add_parser("status", help="show groups, workers and processes",
                                 description="Ask the running master for its state.")
    status.add_argument("--json", action="store_true", help="print the raw JSON reply")
    status.add_argument("--watch", action="store_true",
                        help="refresh in place once a second: per group workers by state, "
                             "requests per second, p50/p99, in flight, shed, pending "
                             "handoffs, listen queue (Ctrl-C ends it)")
    _add_control_target(status)
    reload = commands.add_parser("reload", help="rolling reload (like SIGHUP)",
                                 description="Re-read the config and replace every worker "
                                 "(or one group's) without dropping a request; restart the "
                                 "processes whose table changed.")
    reload.add_argument("--group", metavar="G", help="reload only this group")
    _add_control_target(reload)
    scale = commands.add_parser("scale", help="add or remove workers of a group (or copies of "
                                "a process)", description="Change a group's worker count, "
                                "or a [process.NAME]'s count of copies, by +N or -N.")
    scale.add_argument("group", metavar="NAME")
    scale.add_argument("delta", metavar="+N|-N")
    _add_control_target(scale)
    restart = commands.add_parser("restart", help="restart one process set",
                                  description="Stop every copy of one [process.NAME] (its "
                                  "stop_signal, then KILL after graceful_timeout) and start it "
                                  "again; the groups and other processes are not touched.")
    restart.add_argument("process", metavar="NAME")
    _add_control_target(restart)
    parser.commands = dict(commands.choices)
    return parser


def version_text() -> str:
    return (f"fastpool {__version__} (Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}); {core.describe()}")


def control_path(args: argparse.Namespace) -> Path:
    """Where the master listens: the ``control_socket`` setting, resolved as
    ``fastpool serve`` resolves it (flag, environment, config file, default;
    relative to the config file's directory, else the current one)."""
    return settings.load_server(vars(args), os.environ, args.config).control_path


def _listen(addresses: list[tuple[Address, str]]) -> str:
    """A group's plain addresses as ``fastpool check`` shows them: as written,
    a socket from systemd with its fd and what it is bound to."""
    shown = []
    for address, text in addresses:
        if address.tls:
            continue
        if address.kind == "fd" and address.name:
            shown.append(f"{address} {systemd.bound_to(address.fd)}")
        elif address.kind == "systemd":
            shown.append(f"{text} (a socket systemd passes at start)")
        else:
            shown.append(text)
    return ", ".join(shown) or "-"


def _plan(config: settings.ServerConfig, watch: autoreload.Plan | None,
          assigned: dict[str, list[tuple[Address, str]]] | None = None) -> str:
    assigned = assigned or systemd.assign(config, [], strict=False)
    lines = [f"config: {config.path or 'command line'}"]
    for name, group in config.groups.items():
        default = group.listen_source == "default" and any(
            address.kind == "tcp" for address, _ in assigned[name])
        lines.append(
            f"group {name}: app {group.app}, listen {_listen(assigned[name])}"
            f"{' (the default)' if default else ''}, "
            f"{group.workers} worker(s) x {group.threads} thread(s), timeout "
            f"{group.timeout:g} s, max_requests {group.max_requests or 'off'}, "
            f"nice {group.nice}, cpus {','.join(map(str, group.cpus)) or 'any'}, "
            f"interface {group.interface}"
            + (f", TLS {', '.join(group.tls_listen)} (certfile {group.certfile}, client "
               f"certificates {group.client_certs})" if group.tls_listen else "")
            + (f", routes {', '.join(group.routes)}" if group.routes else "")
            + (", static " + ", ".join(f"{prefix}={directory}" for prefix, directory
                                        in group.static) if group.static else ""))
    for name, process in config.processes.items():
        lines.append(f"process {name}: {process.runs} x {process.count}")
    if any(group.tls_listen for group in config.groups.values()):
        available, why = tls.kernel_tls()
        lines.append(f"kernel TLS: {why}" if available else
                     f"kernel TLS: not available, {why}; TLS routes relay through the worker")
    lines.append(f"control socket: {config.control_path}")
    # Listed always: a development setting must not reach production unseen.
    lines.append(watch.summary() if watch is not None else "reload on code change: off")
    if config.pid_path is not None:
        lines.append(f"pid file: {config.pid_path}")
    if config.env_path is not None:
        lines.append(f"env file: {config.env_path}")
    return "\n".join(lines)


def _check(config: settings.ServerConfig) -> None:
    """Import every app and process target, as the workers would."""
    if config.chdir:
        os.chdir(config.chdir)
    EnvFile(os.environ).apply(config.env_path)     # the apps import with it, as under serve
    for name, group in config.groups.items():
        try:
            resolve_interface(import_app(group.app), group.interface, group.app)
        except AppLoadError as exc:
            raise settings.ConfigError(f"group {name}: {exc}") from None
    for name, process in config.processes.items():
        if process.target is None:
            continue    # a command: its program was looked up when the file was read
        try:
            import_app(process.target, callable_kind="a process target")
        except AppLoadError as exc:
            raise settings.ConfigError(f"process {name}: {exc}") from None


# 128 + SIGPIPE: what the shell reports for a tool whose reader went away.
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()    # a reader that left shows here, not in the interpreter's exit
    except BrokenPipeError:
        # Nobody reads stdout any more: nothing to say, and nowhere to say it.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT
    return code


WATCH_INTERVAL = 1.0    # seconds between two frames of fastpool status --watch
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def _watch(path: Path) -> int:
    """``fastpool status --watch``: a frame a second, in place on a terminal
    (one after another, separated by a blank line, into a pipe)."""
    previous = None
    in_place = sys.stdout.isatty()
    try:
        while True:
            reply = request(path, {"command": "status"})
            frame = format_watch(previous, reply)
            print(CLEAR_SCREEN + frame if in_place else frame + "\n", flush=True)
            previous = reply
            time.sleep(WATCH_INTERVAL)
    except KeyboardInterrupt:
        return 0


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.command in ("serve", "check"):
        cli = vars(args)
        # First: the sockets systemd passed, and LISTEN_* out of the environment
        # (apps and children must not see them; settings never read them).
        activated = systemd.take_activation()
        environ = dict(os.environ)
        try:
            config = settings.load(cli, environ, args.config, args.app)
            assigned = systemd.assign(config, activated, strict=args.command == "serve")
            check_addresses(config, assigned)
            tls.check(list(config.groups.values()))
            # The server's current directory once --chdir is applied.
            watch = autoreload.plan(config, Path(config.chdir or ".").resolve(),
                                    settings.source_of("reload_dirs", cli, environ,
                                                       config.path))
            if args.command == "check":
                _check(config)
                if config.log_config:
                    log.read_log_config(config.log_config)
            else:
                # Before the master: a bad log_config stops the start with one line.
                log.setup_logs(config.log_level, config.error_log, config.log_config)
        except (settings.ConfigError, log.LogConfigError) as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 2
        if args.command == "check":
            print(_plan(config, watch, assigned))
            print("OK")
            return 0
        from fastpool import master

        return master.run(config, cli, args.config, args.app, environ=environ,
                          activated=activated)
    if args.command == "nginx-config":
        from fastpool import nginx

        try:
            config = settings.load({}, os.environ, args.config, None)
            hosts = [h.strip() for h in (args.upstream_hosts or "").split(",") if h.strip()]
            print(nginx.render(config, hosts or None, args.listen), end="")
        except (settings.ConfigError, ValueError) as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("status", "reload", "scale", "restart"):
        try:
            path = control_path(args)
            if args.command == "status" and args.watch:
                return _watch(path)
            if args.command == "status":
                reply = request(path, {"command": "status"})
                print(json.dumps(reply, indent=2) if args.json else format_status(reply))
            elif args.command == "reload":
                request(path, {"command": "reload", "group": args.group})
                print(f"reloading {('group ' + args.group) if args.group else 'the config'}")
            elif args.command == "restart":
                request(path, {"command": "restart", "process": args.process})
                print(f"restarting process {args.process}")
            else:
                try:
                    delta = int(args.delta)
                except ValueError:
                    raise ControlError(f"scale: expected +N or -N, got {args.delta!r}") from None
                reply = request(path, {"command": "scale", "group": args.group, "delta": delta})
                print(f"process {args.group}: {reply['copies']} cop(ies)" if "copies" in reply
                      else f"group {args.group}: {reply['workers']} worker(s)")
        except (ControlError, settings.ConfigError) as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 1
        return 0
    parser.print_help(sys.stderr)
    return 2

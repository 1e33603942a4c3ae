"""The ``fastpool`` command.

Rules: flags come from the settings table (``fastpool.settings``), never
written here; every operator error is one line on stderr starting with
``Error:`` and a non-zero exit (2 for bad usage or configuration).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from typing import NoReturn

from fastpool import __version__, core, settings
from fastpool.sockets import parse_address


class _Parser(argparse.ArgumentParser):
    """argparse with operator errors as one ``Error:`` line (exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastpool",
        description="A compiled prefork HTTP/1.1 server for Python WSGI apps.",
    )
    parser.add_argument("--version", action="store_true",
                        help="print the version and whether the compiled core is loaded")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = commands.add_parser(
        "serve", help="serve a WSGI app",
        description="Serve a WSGI app with a pool of prefork workers. Every flag can also "
                    "be set with its FASTPOOL_* environment variable.",
    )
    serve.add_argument("app", metavar="APP",
                       help="the app as MODULE:ATTRIBUTE or MODULE:FACTORY() "
                            "(e.g. fastpool.examples.hello:app)")
    settings.add_arguments(serve)
    return parser


def version_text() -> str:
    return (f"fastpool {__version__} (Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}); {core.describe()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    try:
        config = settings.resolve(args.app, vars(args))
        for text in config.binds:
            parse_address(text, config.bind_source)
    except settings.ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2

    from fastpool.master import Master

    return Master(config).run()

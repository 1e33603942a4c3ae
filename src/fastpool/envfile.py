"""``env_file``: a dotenv file loaded into the master's environment for the apps.

Rules of this module:

* The file is read with python-dotenv (an optional extra, ``fastpool[dotenv]``)
  into ``os.environ`` of the master, before it imports any app and forks any
  child, so apps, workers and processes inherit the variables; variables of
  the real environment win (python-dotenv's ``override=False``).
* It is for the apps only, as uvicorn's ``--env-file``: fastpool's own
  settings are read from the environment the master started with, never from
  the file (``FASTPOOL_*`` lines in it reach the apps, not the config).
* A reload reads the file again: variables it set before take their new
  values, and the ones no longer in the file are removed; a file that cannot
  be read refuses the reload like any other config error.
* A missing or unreadable file, or a missing python-dotenv, is a
  ``ConfigError`` of one line.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

from fastpool.settings import ConfigError

MISSING_DOTENV = "env_file needs python-dotenv: pip install 'fastpool[dotenv]'"


def read(path: Path) -> dict[str, str]:
    """The variables of the dotenv file at ``path`` (a name without a value is skipped)."""
    try:
        from dotenv import dotenv_values
    except ImportError:
        raise ConfigError(MISSING_DOTENV) from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"env_file {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"env_file {path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"env_file {path}: {exc.strerror or exc}") from None
    values = dotenv_values(stream=io.StringIO(text))
    return {name: value for name, value in values.items() if value is not None}


class EnvFile:
    """What the master loaded from its env file, so that a reload can redo it."""

    def __init__(self, original: Mapping[str, str]) -> None:
        # The environment before any env file: its variables always win.
        self.original = dict(original)
        self.loaded: set[str] = set()

    def apply(self, path: Path | None) -> None:
        """Load ``path`` (None: no env file) into ``os.environ``, replacing
        what an earlier ``apply`` loaded.  Nothing changes when it fails."""
        values = read(path) if path is not None else {}
        for name in self.loaded - values.keys():
            os.environ.pop(name, None)
        self.loaded = set()
        for name, value in values.items():
            if name in self.original:
                continue
            os.environ[name] = value
            self.loaded.add(name)

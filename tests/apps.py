"""WSGI apps the tests serve (importable as ``apps:NAME`` via PYTHONPATH=tests).

Every app is wrapped in ``wsgiref.validate.validator`` where PEP 3333 allows,
so the server is checked against the reference validator on every request.
"""

from __future__ import annotations

import json
import os
from wsgiref.validate import validator


def _hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello, World!\n"]


hello = validator(_hello)


def _environ(environ, start_response):
    """The environ as JSON (strings, numbers and booleans only)."""
    # wsgiref's validator insists on read(size); PEP 3333 allows read() too.
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    shown = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool, tuple))}
    shown["body"] = body.decode("latin-1")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(shown).encode()]


environ = validator(_environ)


def _pid(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


pid = validator(_pid)

"""WSGI apps for test_wsgi.py, test_master.py and test_cli.py.

``main`` routes on the first segment of PATH_INFO; every route is wrapped in
``wsgiref.validate.validator`` unless the route exists to do something the
validator forbids (``read()`` without a size, headers the validator would reject
before the server sees them, a ``wsgi.file_wrapper`` returned as it is so that
the server can use sendfile).  Unknown paths answer the environ as JSON.

Routes that prove ``close()`` was called record ``TAG`` (from the query string)
in a list of this process; ``/closed`` returns that list, so a test that runs
against a single worker can ask afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

CLOSED: list[str] = []


def _query(environ) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""),
                                         keep_blank_values=True).items()}


def _json(start_response, payload, status="200 OK"):
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def _text(start_response, text: str | bytes, status="200 OK"):
    body = text.encode() if isinstance(text, str) else text
    start_response(status, [("Content-Type", "text/plain")])
    return [body]


# ---------------------------------------------------------------- environ


def _environ(environ, start_response):
    """The environ as JSON: every str/int/bool/tuple value, and each key's type."""
    query = _query(environ)
    marker = query.get("errors")
    if marker:
        environ["wsgi.errors"].write(marker + "\n")
        environ["wsgi.errors"].flush()
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    shown = {k: (list(v) if isinstance(v, tuple) else v) for k, v in environ.items()
             if isinstance(v, (str, int, bool, tuple))}
    shown["types"] = {k: type(v).__name__ for k, v in environ.items()}
    shown["file_wrapper_callable"] = callable(environ.get("wsgi.file_wrapper"))
    shown["body"] = body.decode("latin-1")
    return _json(start_response, shown)


# ---------------------------------------------------------------- wsgi.input


def _input(environ, start_response):
    """Apply the comma-separated ``ops`` of the query string to wsgi.input.

    ``read:N`` read(N); ``readall`` read(); ``readline`` / ``readline:N``;
    ``readlines`` / ``readlines:HINT``; ``iter`` list(input); ``pieces:N`` read(N) until b"";
    ``digest:N`` the same, answering [length, sha256].
    """
    stream = environ["wsgi.input"]
    results = []
    for op in _query(environ).get("ops", "").split(","):
        name, _, arg = op.partition(":")
        if name == "read":
            results.append(stream.read(int(arg)).decode("latin-1"))
        elif name == "readall":
            results.append(stream.read().decode("latin-1"))
        elif name == "readline":
            line = stream.readline(int(arg)) if arg else stream.readline()
            results.append(line.decode("latin-1"))
        elif name == "readlines":
            lines = stream.readlines(int(arg)) if arg else stream.readlines()
            results.append([line.decode("latin-1") for line in lines])
        elif name == "iter":
            results.append([line.decode("latin-1") for line in stream])
        elif name == "pieces":
            pieces = []
            while True:
                piece = stream.read(int(arg))
                if not piece:
                    break
                pieces.append(piece.decode("latin-1"))
            results.append(pieces)
        elif name == "digest":
            digest = hashlib.sha256()
            total = 0
            while True:
                piece = stream.read(int(arg))
                if not piece:
                    break
                assert len(piece) <= int(arg), "read(n) returned more than n bytes"
                total += len(piece)
                digest.update(piece)
            results.append([total, digest.hexdigest()])
        elif name == "iterdigest":
            digest = hashlib.sha256()
            total = lines = 0
            for line in stream:
                assert line.endswith(b"\n") or not stream.read(1), "line split early"
                total += len(line)
                lines += 1
                digest.update(line)
            results.append([total, lines, digest.hexdigest()])
    return _json(start_response, results)


# ---------------------------------------------------------------- start_response


def _exc_before_body(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Original", "yes")])
    try:
        raise RuntimeError("replaced before the body")
    except RuntimeError:
        start_response("503 Service Unavailable",
                       [("Content-Type", "text/plain"), ("X-Replaced", "yes")],
                       sys.exc_info())
    return [b"replacement body"]


def _exc_after_body(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"partial body;")
    try:
        raise RuntimeError("boom-after-body " + "original")
    except RuntimeError:
        # PEP 3333: the headers are out, so this must re-raise the original error.
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                       sys.exc_info())
    return [b"must never be sent"]


def _start_twice(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    start_response("201 Created", [("Content-Type", "text/plain")])
    return [b"must never be sent"]


def _write_mix(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"one,")
    write(b"two,")
    return [b"three,", b"four"]


def _write_only(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    for part in (b"alpha;", b"beta;", b"gamma"):
        write(part)
    return []


# ---------------------------------------------------------------- close()


class Closing:
    """An iterable that records ``tag`` in CLOSED when closed; optionally fails."""

    def __init__(self, tag: str, parts: list[bytes], fail_at: int = -1,
                 chunk: bytes = b"") -> None:
        self.tag = tag
        self.parts = parts
        self.fail_at = fail_at
        self.chunk = chunk
        self.produced = 0

    def __iter__(self):
        for index, part in enumerate(self.parts):
            if index == self.fail_at:
                raise RuntimeError(f"iteration failed at part {index}")
            self.produced += 1
            yield part

    def close(self) -> None:
        CLOSED.append(f"{self.tag}:{self.produced}")


def _close_ok(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing(_query(environ)["tag"], [b"first;", b"second"])


def _close_error_early(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing(_query(environ)["tag"], [b"never"], fail_at=0)


def _close_error_late(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing(_query(environ)["tag"], [b"first part;", b"never"], fail_at=1)


STREAM_CHUNKS = 256


def _stream_forever(environ, start_response):
    """Up to 256 MiB in 1 MiB pieces; a client that hangs up stops it early."""
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return Closing(_query(environ)["tag"], [b"x" * (1 << 20)] * STREAM_CHUNKS)


def _closed(environ, start_response):
    return _json(start_response, CLOSED)


# ---------------------------------------------------------------- headers

BAD_HEADERS = {
    "cr": ("X-Bad", "a\rInjected: 1"),
    "lf": ("X-Bad", "a\nInjected: 1"),
    "crlf": ("X-Bad", "a\r\nInjected: 1"),
    "nul": ("X-Bad", "a\0Injected"),
    "name-space": ("X Bad", "v"),
    "name-colon": ("X-Bad:", "v"),
    "name-crlf": ("X-Bad\r\nInjected", "v"),
    "name-empty": ("", "Injected"),
    "name-nonascii": ("X-Bad\xe9", "v"),
}


def _bad_header(environ, start_response):
    name, value = BAD_HEADERS[_query(environ)["kind"]]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Good", "fine"),
                              (name, value)])
    return [b"must never be sent"]


# ---------------------------------------------------------------- file_wrapper


class TrackedFile(io.FileIO):
    tag = ""

    def close(self) -> None:
        if not self.closed:
            CLOSED.append(f"{self.tag}:file")
        super().close()


class TrackedBytesIO(io.BytesIO):
    tag = ""

    def close(self) -> None:
        if not self.closed:
            CLOSED.append(f"{self.tag}:bytesio")
        super().close()


def _file(environ, start_response):
    query = _query(environ)
    handle = TrackedFile(query["path"], "rb")
    handle.tag = query.get("tag", "")
    handle.seek(int(query.get("offset", "0")))   # served from the current position
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](handle, 65536)


def pattern(size: int) -> bytes:
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


def _file_bytesio(environ, start_response):
    query = _query(environ)
    handle = TrackedBytesIO(pattern(int(query["size"])))
    handle.tag = query.get("tag", "")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](handle, 4096)


# ---------------------------------------------------------------- processes


def _pid(environ, start_response):
    return _text(start_response, str(os.getpid()))


def _sleep(environ, start_response):
    """Sleep ``s`` seconds; says so on wsgi.errors first (``sleeping TAG``)."""
    query = _query(environ)
    environ["wsgi.errors"].write(f"sleeping {query.get('tag', '')}\n")
    environ["wsgi.errors"].flush()
    time.sleep(float(query.get("s", "1")))
    return _text(start_response, f"slept {os.getpid()}")


def _hello(environ, start_response):
    return _text(start_response, "Hello, WSGI!\n")


VALIDATED = {
    "input": _input,
    "exc-before-body": _exc_before_body,
    "exc-after-body": _exc_after_body,
    "start-twice": _start_twice,
    "write-mix": _write_mix,
    "write-only": _write_only,
    "close-ok": _close_ok,
    "close-error-early": _close_error_early,
    "close-error-late": _close_error_late,
    "stream-forever": _stream_forever,
    "closed": _closed,
    "pid": _pid,
    "sleep": _sleep,
    "hello": _hello,
}
RAW = {
    "input-raw": _input,
    "bad-header": _bad_header,
    "file": _file,
    "file-bytesio": _file_bytesio,
}
ROUTES = {name: validator(app) for name, app in VALIDATED.items()}
ROUTES.update(RAW)
_validated_environ = validator(_environ)


def main(environ, start_response):
    first = environ.get("PATH_INFO", "").lstrip("/").split("/", 1)[0]
    return ROUTES.get(first, _validated_environ)(environ, start_response)


hello = validator(_hello)


def create_app(greeting: str = "factory default"):
    """``apps_wsgi:create_app()`` / ``apps_wsgi:create_app('x')``."""

    def app(environ, start_response):
        return _text(start_response, f"greeting={greeting}")

    return validator(app)

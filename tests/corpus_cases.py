"""The request corpus under tests/requests (see its README.md): loading the
cases, and the known categories, limits and statuses.

Used by test_corpus_files.py (the consistency checks) and
test_corpus_sockets.py (the replay against a real server).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent / "requests"
KINDS = ("valid", "invalid")

# The limits every expectation is written for: the server's defaults, plus
# --limit-request-body 65536.
LIMIT_REQUEST_LINE = 4094
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190
LIMIT_REQUEST_BODY = 65536

CATEGORIES = {
    "method": "request methods: tokens, non-tokens, CONNECT",
    "target": "request-target forms and their errors, percent-encoding",
    "version": "HTTP versions",
    "empty": "empty lines before and between requests",
    "header": "field line syntax",
    "trim": "whitespace around field values",
    "host": "the Host field",
    "conn": "keep-alive and Connection",
    "cl": "Content-Length",
    "te": "Transfer-Encoding",
    "chunked": "chunked bodies: sizes, extensions, trailers, CRLF",
    "smuggle": "request smuggling: CL.TE, TE.CL, TE.TE and friends",
    "pipeline": "several requests on one connection",
    "upgrade": "upgrade requests",
    "limit": "request line, field count, field size and body limits",
}

STATUSES = (None, 400, 413, 414, 431, 501, 505)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str              # "valid" or "invalid"
    path: Path             # the .http file
    data: bytes            # its bytes
    expect: dict[str, Any]  # the parsed .json

    @property
    def category(self) -> str:
        return self.name.split("_", 1)[0]

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.expect["requests"]

    @property
    def status(self) -> int | None:
        """The status of the invalid request (None: the input just ends)."""
        return self.expect["status"]

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


def load_cases(root: Path = CORPUS) -> list[Case]:
    """Every case, valid ones first, each kind sorted by name."""
    cases = []
    for kind in KINDS:
        for path in sorted((root / kind).glob("*.http")):
            expect = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            cases.append(Case(path.stem, kind, path, path.read_bytes(), expect))
    return cases


def header_values(request: dict[str, Any], name: str) -> list[str]:
    """The values of the fields named ``name`` (any case) of an expected request."""
    return [value for field, value in request["headers"] if field.lower() == name]

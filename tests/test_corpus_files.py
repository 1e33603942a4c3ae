"""Consistency of the request corpus (tests/requests, see its README.md):
every file pair is well-formed, follows the expectation format, and agrees
with itself.  Fast, and needs no server.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from corpus_cases import CATEGORIES, CORPUS, KINDS, STATUSES, Case, header_values, load_cases

CASES = load_cases()
REQUEST_KEYS = {"method", "target", "version", "headers", "body", "keep_alive"}
NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def test_every_http_file_has_its_json_and_back():
    for kind in KINDS:
        folder = CORPUS / kind
        https = {p.stem for p in folder.glob("*.http")}
        jsons = {p.stem for p in folder.glob("*.json")}
        assert https - jsons == set(), f"{kind}: .http without .json"
        assert jsons - https == set(), f"{kind}: .json without .http"
        others = {p.name for p in folder.iterdir()} - {f"{s}.http" for s in https} - {
            f"{s}.json" for s in jsons}
        assert others == set(), f"{kind}: files that are not corpus cases"


def test_names_are_unique_and_categorised():
    counts = Counter(case.name for case in CASES)
    assert [name for name, count in counts.items() if count > 1] == []
    for case in CASES:
        assert NAME.match(case.name), case.name
        assert case.category in CATEGORIES, f"{case}: unknown category {case.category!r}"


def test_corpus_size_and_spread():
    assert len(CASES) >= 170
    per_category = Counter(case.category for case in CASES)
    for category in CATEGORIES:
        assert per_category[category] >= 5, f"only {per_category[category]} {category} cases"
    assert {case.kind for case in CASES} == set(KINDS)


def test_gitattributes_keeps_bytes():
    text = (CORPUS / ".gitattributes").read_text()
    assert "* -text" in text.splitlines()


def test_json_is_plain_ascii_utf8():
    for case in CASES:
        raw = case.path.with_suffix(".json").read_bytes()
        json.loads(raw.decode("utf-8"))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(case: Case):
    expect = case.expect
    keys = {"description", "requests"} | ({"status"} if case.kind == "invalid" else set())
    assert set(expect) == keys, f"keys {sorted(expect)}, expected {sorted(keys)}"
    description = expect["description"]
    assert isinstance(description, str) and description.strip(), "empty description"
    assert "\n" not in description, "the description is one line"
    if case.kind == "invalid":
        assert expect["status"] in STATUSES, f"unexpected status {expect['status']!r}"
    assert case.data, "empty .http file"
    requests = expect["requests"]
    assert isinstance(requests, list)
    if case.kind == "valid":
        assert requests, "a valid case lists at least one request"
    position = 0
    for index, request in enumerate(requests):
        where = f"request {index}"
        keys = set(request)
        assert REQUEST_KEYS <= keys <= REQUEST_KEYS | {"upgrade"}, f"{where}: keys {sorted(keys)}"
        assert isinstance(request["method"], str) and request["method"], where
        assert isinstance(request["target"], str) and request["target"], where
        assert request["version"] in ("1.0", "1.1"), where
        assert isinstance(request["keep_alive"], bool), where
        assert isinstance(request["body"], str), where
        assert all(ord(c) < 256 for c in request["body"]), f"{where}: body is not latin-1"
        headers = request["headers"]
        assert isinstance(headers, list), where
        for field in headers:
            assert isinstance(field, list) and len(field) == 2, f"{where}: field {field!r}"
            assert all(isinstance(part, str) and all(ord(c) < 256 for c in part)
                       for part in field), f"{where}: field {field!r}"
            name, value = field
            assert name and value == value.strip(" \t"), f"{where}: untrimmed field {field!r}"
        if "upgrade" in request:
            assert request["upgrade"] is True, f"{where}: upgrade is only ever true"
            assert request["keep_alive"] is False, f"{where}: an upgrade closes the connection"
        if index < len(requests) - 1:
            assert request["keep_alive"], f"{where}: nothing is parsed after a closing request"
        if case.kind == "invalid":
            assert request["keep_alive"], f"{where}: the bad request must still be parsed"
        # Framing: a Content-Length body has exactly that many bytes; a request
        # with neither framing field has no body.
        chunked = bool(header_values(request, "transfer-encoding"))
        lengths = header_values(request, "content-length")
        assert not (chunked and lengths), f"{where}: both framings listed"
        if lengths:
            assert len(lengths) == 1, f"{where}: several Content-Length fields"
            assert int(lengths[0]) == len(request["body"]), (
                f"{where}: Content-Length is not len(body)")
        elif not chunked:
            assert request["body"] == "", f"{where}: a body without framing"
        if request["version"] == "1.1":
            assert len(header_values(request, "host")) == 1, f"{where}: HTTP/1.1 needs one Host"
        # The request line is in the bytes, in order (its words may be
        # separated by more than one space: RFC 9112 3 lets a server accept it).
        words = [request["method"], request["target"], f"HTTP/{request['version']}"]
        line = re.compile(b" +".join(re.escape(w.encode("latin-1")) for w in words) + b"\r\n")
        match = line.search(case.data, position)
        assert match, f"{where}: request line {' '.join(words)!r} not found in order"
        position = match.end()
        if request["body"]:
            body = request["body"].encode("latin-1")
            if not chunked:
                found = case.data.find(body, position)
                assert found >= 0, f"{where}: body not found in order"
                position = found + len(body)

"""The request corpus (tests/requests) replayed over real sockets.

Each corpus file is sent, on a fresh connection, to a real ``fastpool serve``
running the echo apps of tests/apps_echo.py with ``--limit-request-body
65536``, in four set-ups (one server each, started once for the module):

* ``wsgi``:        ``--interface wsgi``, ``apps_echo:app``
* ``asgi``:        ``--interface asgi``, ``apps_echo:asgi_app``
* ``routed``:      a config with two WSGI groups, ``edge`` (listens) and ``app``
                   (``routes = ["/"]``, no listener): every request is handed
                   from edge to app
* ``routed_asgi``: the same with two ASGI groups

What comes back is checked against the expectation, mapped to the view of
the app's interface (``expected_view``): every listed request is answered
200 with the echo of what the app saw, with ``Connection: close`` exactly when
the request does not keep the connection alive; then an invalid case gets its
status and the connection closes with nothing more, a truncated one
(``"status": null``, the only cases whose write side is shut) gets no answer
and a close, and a valid one leaves the connection open or closed as its last
request says.  In the routed set-ups the echo must come from a worker of the
``app`` group (except for ``OPTIONS *``: no path, so no route, and the edge
group answers it).

WebSocket upgrades are the one place where the interfaces differ on purpose:
the ASGI worker switches protocols for them, so an ASGI set-up expects a 101
and the echo as one WebSocket text message instead of a 200 (the WebSocket
cases in the corpus are complete handshakes with nothing after them).  Every
other upgrade request is answered as plain HTTP and closed in all set-ups.

To stay fast, each set-up replays every file at once from a thread pool when
its fixture starts; the tests (one per file and set-up) report the outcome.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from client import Response, Stream
from clusters import Cluster, Clusters, ports, render
from conftest import Server, start_server, stop_server
from corpus_cases import LIMIT_REQUEST_BODY, Case, header_values, load_cases

CASES = load_cases()

READ_TIMEOUT = 3.0   # for an answer or a close that is expected
QUIET = 0.05         # a connection that must stay open: nothing arrives for this long
PARALLEL = 16        # connections replaying at once

BODY_LIMIT = ("--limit-request-body", str(LIMIT_REQUEST_BODY))


# ---------------------------------------------------------------- the app's view


ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")


def authority_of(target: str) -> str | None:
    """The authority of an absolute-form target, else None."""
    if target.startswith("/") or target == "*":
        return None
    match = ABSOLUTE.match(target)
    return match.group(1) if match else None


def asgi_target(target: str) -> str:
    """``raw_path`` (plus ``?query`` when not empty) as an ASGI app sees it: the
    fragment dropped; for absolute-form, the path from the first ``/`` after
    the authority (``/`` when there is none)."""
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    if authority_of(path) is not None:
        rest = path.split("://", 1)[1]
        slash = rest.find("/")
        path = rest[slash:] if slash >= 0 else "/"
    return path + ("?" + query if query else "")


def expected_view(request: dict[str, Any], view: str) -> dict[str, Any]:
    """What the echo app of ``view`` (wsgi or asgi) must report for an expected request.

    Names are lower-cased.  With absolute-form, the app sees Host = the
    target's authority.  WSGI drops names holding ``_`` and joins repeated
    fields with ``, `` in first-seen order; its target is the raw target
    (RAW_URI).  ASGI keeps every field; its target is ``asgi_target``.
    """
    target = request["target"]
    headers = [(name.lower(), value) for name, value in request["headers"]]
    authority = authority_of(target)
    if authority is not None:
        headers = [(name, authority if name == "host" else value) for name, value in headers]
    if view == "wsgi":
        joined: dict[str, str] = {}
        for name, value in headers:
            if "_" in name:
                continue
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        headers = list(joined.items())
    else:
        target = asgi_target(target)
    return {"method": request["method"], "target": target,
            "headers": sorted([name, value] for name, value in headers),
            "body": request["body"]}


def is_websocket(request: dict[str, Any]) -> bool:
    """An upgrade to WebSocket: the ASGI worker switches protocols for it."""
    return bool(request.get("upgrade")) and any(
        value.strip().lower() == "websocket" for value in header_values(request, "upgrade"))


# ---------------------------------------------------------------- set-ups


@dataclass
class Setup:
    name: str
    view: str                                # "wsgi" or "asgi"
    port: int
    app_pids: frozenset[int] | None = None   # routed: the pids of the app group
    results: dict[str, str | None] = field(default_factory=dict)


def start_routed(directory: Path, interface: str) -> tuple[Clusters, Cluster, int]:
    app = {"wsgi": "apps_echo:app", "asgi": "apps_echo:asgi_app"}[interface]
    chosen = ports("edge")
    text = render(
        server={"control_socket": str(directory / ".fastpool.sock"),
                "limit_request_body": LIMIT_REQUEST_BODY, "interface": interface},
        groups={"edge": {"app": app, "listen": [f"127.0.0.1:{chosen['edge']}"], "workers": 1},
                "app": {"app": app, "routes": ["/"], "workers": 1}})
    factory = Clusters(directory)
    try:
        server = factory.start(text, workers=2, ports=chosen)
        server.wait_group("edge", 1)
        server.wait_group("app", 1)
    except BaseException:
        factory.close()
        raise
    return factory, server, chosen["edge"]


SETUPS = ("wsgi", "asgi", "routed", "routed_asgi")


@pytest.fixture(scope="module", params=SETUPS)
def setup(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    name = request.param
    directory = tmp_path_factory.mktemp(f"corpus-{name}")
    if name in ("wsgi", "asgi"):
        app = {"wsgi": "apps_echo:app", "asgi": "apps_echo:asgi_app"}[name]
        server: Server = start_server(app, directory, "--interface", name, *BODY_LIMIT)
        try:
            chosen = Setup(name, name, server.port)
            replay_all(chosen)
            yield chosen
        finally:
            stop_server(server)
    else:
        view = "asgi" if name == "routed_asgi" else "wsgi"
        factory, cluster, port = start_routed(directory, view)
        try:
            chosen = Setup(name, view, port, frozenset(cluster.group_pids("app")))
            replay_all(chosen)
            yield chosen
        finally:
            factory.close()


def replay_all(setup: Setup) -> None:
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = pool.map(lambda case: (case.name, replay(setup, case)), CASES)
        setup.results.update(outcomes)


# ---------------------------------------------------------------- one case


class Mismatch(AssertionError):
    pass


def replay(setup: Setup, case: Case) -> str | None:
    """Send the case on a fresh connection and check what comes back: None, or
    what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", setup.port), timeout=READ_TIMEOUT) as sock:
            try:
                sock.sendall(case.data)
                if case.kind == "invalid" and case.status is None:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # the server stopped reading; what it answered is still checked
            check_exchange(Stream(sock, READ_TIMEOUT), setup, case)
    except Mismatch as exc:
        return str(exc)
    except AssertionError as exc:
        return str(exc)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def read(stream: Stream, method: str, what: str) -> Response:
    try:
        return stream.response(method)
    except EOFError:
        raise Mismatch(f"{what}: the connection closed without an answer") from None
    except ConnectionResetError:
        raise Mismatch(f"{what}: the connection was reset without an answer") from None
    except TimeoutError:
        raise Mismatch(f"{what}: no answer within {READ_TIMEOUT}s") from None


def describe(response: Response) -> str:
    return f"{response.status} {response.body[:160]!r}"


def compare(want: dict[str, Any], echo: dict[str, Any], what: str) -> None:
    seen = {key: echo.get(key) for key in want}
    if seen == want:
        return
    lines = [f"{what}: the app saw something else"]
    for key in want:
        if seen[key] == want[key]:
            continue
        if key == "headers":
            expected = [tuple(pair) for pair in want[key]]
            got = [tuple(pair) for pair in seen[key] or []]
            lines.append(f"  headers missing {[p for p in expected if p not in got]!r}"[:600])
            lines.append(f"  headers extra   {[p for p in got if p not in expected]!r}"[:600])
        else:
            lines.append(f"  {key}: expected {want[key]!r:.300}, got {seen[key]!r:.300}")
    raise Mismatch("\n".join(lines))


def check_routed(setup: Setup, echo: dict[str, Any], request: dict[str, Any], what: str) -> None:
    # OPTIONS * has no path, so no route: the edge group answers it.
    if setup.app_pids is not None and request["target"] != "*":
        if echo.get("pid") not in setup.app_pids:
            raise Mismatch(f"{what}: answered by pid {echo.get('pid')}, not by the app group "
                           f"{sorted(setup.app_pids)}")


def check_websocket(stream: Stream, setup: Setup, request: dict[str, Any], what: str) -> None:
    """ASGI switches to WebSocket: a 101, then the echo as one text message."""
    try:
        response = stream.head()
        assert response.status == 101, f"{what}: expected 101, got {response.status}"
        first, second = stream.exact(2)
        opcode, size = first & 0x0F, second & 0x7F
        if size == 126:
            size = int.from_bytes(stream.exact(2), "big")
        elif size == 127:
            size = int.from_bytes(stream.exact(8), "big")
        payload = stream.exact(size)
    except (EOFError, ConnectionResetError, TimeoutError) as exc:
        raise Mismatch(f"{what}: no WebSocket handshake and message ({exc!r})") from None
    assert opcode == 1, f"{what}: expected a text message, got opcode {opcode}"
    echo = json.loads(payload)
    compare(expected_view(request, setup.view), echo, what)
    check_routed(setup, echo, request, what)


def check_exchange(stream: Stream, setup: Setup, case: Case) -> None:
    for index, request in enumerate(case.requests):
        what = f"request {index} ({request['method']} {request['target'][:60]})"
        if setup.view == "asgi" and is_websocket(request):
            check_websocket(stream, setup, request, what)
            return   # the connection speaks WebSocket now
        response = read(stream, request["method"], what)
        if response.status != 200:
            raise Mismatch(f"{what}: expected 200 with the echo, got {describe(response)}")
        raw = response.header("x-echo") if request["method"] == "HEAD" else response.body
        echo = json.loads(raw or "{}")
        compare(expected_view(request, setup.view), echo, what)
        check_routed(setup, echo, request, what)
        connection = [token.strip().lower()
                      for token in (response.header("connection") or "").split(",")]
        if ("close" in connection) != (not request["keep_alive"]):
            raise Mismatch(f"{what}: keep_alive is {request['keep_alive']}, but the response "
                           f"has Connection: {response.header('connection')!r}")
    after = f"after {len(case.requests)} answered request(s)"
    if case.kind == "invalid" and case.status is not None:
        response = read(stream, "GET", f"{after}, the bad request")
        if response.status != case.status:
            raise Mismatch(f"{after}: expected {case.status}, got {describe(response)}")
        closed(stream, f"after the {case.status}")
    elif case.kind == "invalid":
        closed(stream, f"{after}, the truncated request (expected no answer)")
    elif case.requests[-1]["keep_alive"]:
        try:
            stream.assert_open(QUIET)
        except AssertionError as exc:
            raise Mismatch(f"{after}: the connection should stay open: {exc}") from None
        except ConnectionResetError:
            raise Mismatch(f"{after}: the connection should stay open, it was reset") from None
    else:
        closed(stream, after)


def closed(stream: Stream, what: str) -> None:
    """Nothing more arrives and the connection closes."""
    if stream.buf:
        raise Mismatch(f"{what}: unexpected bytes {bytes(stream.buf)[:200]!r}")
    try:
        stream.assert_closed(READ_TIMEOUT)
    except AssertionError as exc:
        raise Mismatch(f"{what}: {exc}") from None


# ---------------------------------------------------------------- the tests


def test_views_of_an_absolute_form_request():
    request = {"method": "GET", "target": "http://a.example:81/p/q?x=1#f", "version": "1.1",
               "headers": [["Host", "b.example"], ["X_U", "1"], ["X-D", "1"], ["x-d", "2"]],
               "body": "", "keep_alive": True}
    assert expected_view(request, "wsgi") == {
        "method": "GET", "target": "http://a.example:81/p/q?x=1#f",
        "headers": [["host", "a.example:81"], ["x-d", "1, 2"]], "body": ""}
    assert expected_view(request, "asgi") == {
        "method": "GET", "target": "/p/q?x=1",
        "headers": [["host", "a.example:81"], ["x-d", "1"], ["x-d", "2"], ["x_u", "1"]],
        "body": ""}
    assert asgi_target("http://a.example") == "/"
    assert asgi_target("*") == "*"
    assert asgi_target("/a?#f") == "/a"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_replay(setup: Setup, case: Case):
    failure = setup.results[case.name]
    if failure is not None:
        pytest.fail(f"{setup.name} {case}: {failure}", pytrace=False)

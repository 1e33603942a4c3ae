"""Static files answered by the workers (``--static``, issue 13), over real
sockets, for the WSGI worker and the ASGI worker on both event loops.

The app of every server is the HTTP test app (tests/apps_http.py and
apps_http_asgi.py), which answers ``METHOD PATH?QUERY`` for paths it does not
know: a request that falls through to the app is recognisable by that body,
and a static hit by its ETag.
"""

from __future__ import annotations

import gzip
import http.client
import os
import random
import socket
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from client import Client, connect, fetch, get, raw_request, worker_pid
from clusters import group, ports, render, routed_group
from conftest import HTTP_APPS, start_server, stop_server, wait_for

SECRET = b"TOP SECRET outside the mount\n"
HELLO = b"hello static\n"
CSS = b"body { color: black }\n" * 64
BIG_SIZE = 3 * 1024 * 1024
HUGE_SIZE = 64 * 1024 * 1024     # more than the socket buffers take: the sender must wait

KINDS = {
    "wsgi": ("wsgi",),
    "asgi": ("asgi", "--loop", "uvloop"),
    "asgi-asyncio": ("asgi", "--loop", "asyncio"),
}


def make_tree(root: Path) -> dict[str, bytes]:
    """public/ (mounted at /), assets/ (at /assets) and a secret beside them."""
    public = root / "public"
    (public / "docs").mkdir(parents=True)
    (public / "empty-dir").mkdir()
    (public / ".git").mkdir()
    (root / "assets").mkdir()
    big = random.Random(13).randbytes(BIG_SIZE)
    files = {
        "public/hello.txt": HELLO,
        "public/style.css": CSS,
        "public/style.css.gz": gzip.compress(CSS, mtime=0),
        "public/style.css.br": b"(brotli bytes of style.css)",
        "public/big.bin": big,
        "public/docs/index.html": b"<h1>docs</h1>\n",
        "public/.env": b"SECRET_KEY=dotfile\n",
        "public/.git/config": b"[core]\n",
        "assets/app.js": b"console.log(1);\n",
        "secret.txt": SECRET,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (public / "huge.bin").write_bytes(bytes(range(256)) * (HUGE_SIZE // 256))
    os.symlink("../secret.txt", public / "link-outside")
    os.symlink("hello.txt", public / "link-inside")
    return files


@pytest.fixture(scope="module", params=list(KINDS))
def site(request, tmp_path_factory):
    interface, *loop = KINDS[request.param]
    directory = tmp_path_factory.mktemp(f"static-{request.param}")
    make_tree(directory)
    server = start_server(HTTP_APPS[interface], directory, "--interface", interface, *loop,
                          "--static", "/=public", "--static", "/assets=assets",
                          "--static-max-age", "60", "--access-log", "access.log")
    server.directory = directory
    yield server
    stop_server(server)


def etag_of(site, path: str, **headers: str) -> str:
    reply = fetch(site, path, headers=headers)
    assert reply.status == 200, reply
    return reply.headers["ETag"]


def is_app_answer(reply, method: str, path: str) -> bool:
    """The test app answered (``METHOD PATH``), not the static files."""
    return reply.headers["ETag"] is None and reply.body.startswith(f"{method} ".encode())


# ---------------------------------------------------------------- hits

def test_a_file_is_served_with_nginx_headers(site):
    reply = fetch(site, "/hello.txt")
    info = os.stat(site.directory / "public/hello.txt")
    assert reply.status == 200
    assert reply.body == HELLO
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert reply.headers["Content-Length"] == str(len(HELLO))
    assert reply.headers["Last-Modified"] == formatdate(int(info.st_mtime), usegmt=True)
    assert reply.headers["ETag"] == f'"{int(info.st_mtime):x}-{len(HELLO):x}"'
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["Cache-Control"] == "public, max-age=60"
    assert reply.headers["Vary"] == "Accept-Encoding"


def test_head_has_the_headers_and_no_body(site):
    with Client(site) as client:
        reply = client.send("/style.css", method="HEAD")
        assert reply.status == 200
        assert reply.header("Content-Length") == str(len(CSS))
        assert reply.header("Content-Type") == "text/css; charset=utf-8"
        assert reply.body == b""
        assert client.send("/hello.txt").body == HELLO      # the connection goes on


def test_a_large_file_arrives_intact(site):
    reply = fetch(site, "/big.bin")
    assert reply.status == 200
    assert reply.body == (site.directory / "public/big.bin").read_bytes()


def test_the_longest_mount_wins(site):
    assert fetch(site, "/assets/app.js").body == b"console.log(1);\n"
    assert fetch(site, "/assets/app.js").headers["Content-Type"] in (
        "text/javascript; charset=utf-8", "application/javascript; charset=utf-8")


def test_a_symlink_inside_the_mount_is_followed(site):
    assert fetch(site, "/link-inside").body == HELLO


# ---------------------------------------------------------------- what falls through

@pytest.mark.parametrize("method, path", [
    ("GET", "/missing.txt"), ("POST", "/hello.txt"), ("PUT", "/hello.txt"),
    ("DELETE", "/style.css"), ("GET", "/empty-dir/"), ("GET", "/empty-dir"),
    ("GET", "/.env"), ("GET", "/.git/config"), ("GET", "/docs/.hidden"),
])
def test_anything_but_a_file_reaches_the_app_as_it_arrived(site, method, path):
    reply = fetch(site, path + "?q=1", method=method, body=b"x" if method != "GET" else None)
    assert reply.status == 200
    assert reply.body.startswith(f"{method} {path}?q=1".encode()), reply.body
    assert reply.headers["ETag"] is None


def test_a_directory_serves_its_index_and_redirects_without_the_slash(site):
    reply = fetch(site, "/docs/")
    assert (reply.status, reply.body) == (200, b"<h1>docs</h1>\n")
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    moved = fetch(site, "/docs?page=2")
    assert moved.status == 301
    assert moved.headers["Location"] == "/docs/?page=2"
    assert moved.headers["Content-Length"] == "0"


# ---------------------------------------------------------------- conditional requests

def test_if_none_match_gives_304_weakly_compared_in_lists(site):
    etag = etag_of(site, "/hello.txt")
    for value in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        reply = fetch(site, "/hello.txt", headers={"If-None-Match": value})
        assert reply.status == 304, value
        assert reply.body == b""
        assert reply.headers["ETag"] == etag
        assert reply.headers["Content-Length"] is None
    assert fetch(site, "/hello.txt", headers={"If-None-Match": '"other"'}).status == 200


def test_if_modified_since_gives_304_unless_if_none_match_disagrees(site):
    modified = fetch(site, "/hello.txt").headers["Last-Modified"]
    assert fetch(site, "/hello.txt", headers={"If-Modified-Since": modified}).status == 304
    earlier = formatdate(0, usegmt=True)
    assert fetch(site, "/hello.txt", headers={"If-Modified-Since": earlier}).status == 200
    assert fetch(site, "/hello.txt", headers={"If-Modified-Since": "not a date"}).status == 200
    # If-None-Match decides when both are present (RFC 9110 13.2.2).
    both = {"If-None-Match": '"other"', "If-Modified-Since": modified}
    assert fetch(site, "/hello.txt", headers=both).status == 200


# ---------------------------------------------------------------- ranges

@pytest.mark.parametrize("spec, first, last", [
    ("bytes=0-4", 0, 4), ("bytes=6-", 6, len(HELLO) - 1), ("bytes=-3", len(HELLO) - 3,
                                                            len(HELLO) - 1),
    ("bytes=2-1000", 2, len(HELLO) - 1),
])
def test_one_range_gives_206(site, spec, first, last):
    reply = fetch(site, "/hello.txt", headers={"Range": spec})
    assert reply.status == 206
    assert reply.body == HELLO[first:last + 1]
    assert reply.headers["Content-Range"] == f"bytes {first}-{last}/{len(HELLO)}"


def test_a_range_of_a_large_file_is_sent_from_its_offset(site):
    data = (site.directory / "public/big.bin").read_bytes()
    first, last = 1_000_001, 2_500_000
    reply = fetch(site, "/big.bin", headers={"Range": f"bytes={first}-{last}"})
    assert reply.status == 206
    assert reply.body == data[first:last + 1]


def test_an_unsatisfiable_range_gives_416(site):
    reply = fetch(site, "/hello.txt", headers={"Range": "bytes=9999-"})
    assert reply.status == 416
    assert reply.headers["Content-Range"] == f"bytes */{len(HELLO)}"


@pytest.mark.parametrize("spec", ["bytes=0-1,4-5", "bytes=5-2", "items=0-1", "bytes=x-"])
def test_several_or_invalid_ranges_get_the_whole_file(site, spec):
    reply = fetch(site, "/hello.txt", headers={"Range": spec})
    assert (reply.status, reply.body) == (200, HELLO)


def test_if_range_applies_the_range_only_to_the_current_version(site):
    etag = etag_of(site, "/hello.txt")
    modified = fetch(site, "/hello.txt").headers["Last-Modified"]
    for current in (etag, modified):
        reply = fetch(site, "/hello.txt", headers={"Range": "bytes=0-1", "If-Range": current})
        assert (reply.status, reply.body) == (206, HELLO[:2]), current
    for stale in ('"old"', f"W/{etag}", formatdate(0, usegmt=True)):
        reply = fetch(site, "/hello.txt", headers={"Range": "bytes=0-1", "If-Range": stale})
        assert (reply.status, reply.body) == (200, HELLO), stale


# ---------------------------------------------------------------- precompressed files

@pytest.mark.parametrize("accept, encoding, suffix", [
    ("gzip", "gzip", ".gz"), ("br", "br", ".br"), ("gzip, deflate, br", "br", ".br"),
    ("gzip;q=1, br;q=0.5", "gzip", ".gz"), ("br;q=0, gzip", "gzip", ".gz"),
    ("*", "br", ".br"), ("identity", None, ""), ("br;q=0, gzip;q=0", None, ""),
])
def test_a_precompressed_variant_is_sent_when_the_client_accepts_it(site, accept, encoding,
                                                                     suffix):
    reply = fetch(site, "/style.css", headers={"Accept-Encoding": accept})
    assert reply.status == 200
    assert reply.body == (site.directory / f"public/style.css{suffix}").read_bytes()
    assert reply.headers["Content-Encoding"] == encoding
    assert reply.headers["Content-Type"] == "text/css; charset=utf-8"
    assert reply.headers["Vary"] == "Accept-Encoding"


def test_each_encoding_has_its_own_etag(site):
    tags = {accept: etag_of(site, "/style.css", **{"Accept-Encoding": accept})
            for accept in ("identity", "gzip", "br")}
    assert len(set(tags.values())) == 3
    gz = fetch(site, "/style.css", headers={"Accept-Encoding": "gzip",
                                            "If-None-Match": tags["gzip"]})
    assert gz.status == 304


# ---------------------------------------------------------------- nothing outside the mount

ESCAPES = [
    "/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/..%2fsecret.txt",
    "/%2e%2e%2fsecret.txt", "/docs/../../secret.txt", "/docs/%2e%2e/%2e%2e/secret.txt",
    "/%5c..%5csecret.txt", "/..%5csecret.txt", "/hello.txt%00.png", "/%00/../secret.txt",
    "/%c0%ae%c0%ae/secret.txt", "/%c0%af..%c0%afsecret.txt", "//secret.txt",
    "/link-outside", "/assets/../../secret.txt", "/assets/%2e%2e/%2e%2e/secret.txt",
    "http://localhost/../secret.txt",
]


@pytest.mark.parametrize("target", ESCAPES)
def test_nothing_outside_the_mounted_directory_is_served(site, target):
    raw = raw_request(site, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                      .encode())
    assert SECRET.strip() not in raw
    assert b"\r\nETag:" not in raw


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "openat-and-realpath"])
def test_no_lookup_leaves_the_mount_with_or_without_openat2(tmp_path, openat2):
    """The same escapes, in process, through the lookup both ways the kernel
    may offer: openat2(RESOLVE_BENEATH), or openat and a real-path check."""
    from fastpool._static import StaticFiles, use_openat2

    make_tree(tmp_path)
    static = StaticFiles([("/", str(tmp_path / "public"))])
    use_openat2(openat2)
    try:
        for target in ESCAPES:
            assert static.lookup("GET", target.encode()) is None, target
        assert static.lookup("GET", b"/link-inside")[2] == HELLO
        assert static.lookup("GET", b"/hello.txt")[2] == HELLO
    finally:
        use_openat2(True)


def test_random_targets_and_headers_never_raise_nor_escape(tmp_path):
    """A seeded random walk over targets and the five headers the lookup
    reads: an exception there would be a 500 (never a dead worker), and the
    secret beside the mount must never come back."""
    from fastpool._static import StaticFiles

    make_tree(tmp_path)
    static = StaticFiles([("/", str(tmp_path / "public")), ("/assets", str(tmp_path / "assets"))])
    rng = random.Random(2026)
    pieces = [b"/", b"..", b".", b"%2e", b"%2f", b"%5c", b"%00", b"%c0%ae", b"\\", b"secret.txt",
              b"hello.txt", b"docs", b"style.css", b"link-outside", b"link-inside", b"assets",
              b"?", b"#", b"%", b"%zz", b"\xff", b";", b"//", b".git", b"index.html"]
    values = [b"bytes=0-1", b"bytes=-", b"bytes=9999999999999999999-", b"bytes=1-0,2-3",
              b"*", b'W/"x"', b'"', b"gzip;q=abc", b"br;q=-1, *;q=nan", b"Sun, 06 Nov 1994",
              b"99999 99 99", b"\x00\xff", b"", b"  ", b"bytes=" + b"9" * 40]
    names = (b"if-none-match", b"if-modified-since", b"range", b"if-range", b"accept-encoding")
    for _ in range(3000):
        target = b"/" + b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        headers = {name: rng.choice(values) for name in names if rng.random() < 0.5}
        answer = static.lookup(rng.choice(["GET", "HEAD"]), target, headers)
        if answer is not None:
            assert SECRET.strip() not in answer[2], target


def test_symlinks_out_of_the_mount_only_with_follow_symlinks(tmp_path):
    make_tree(tmp_path)
    server = start_server(HTTP_APPS["wsgi"], tmp_path, "--static", "/=public",
                          "--static-follow-symlinks")
    try:
        assert fetch(server, "/link-outside").body == SECRET
        assert not is_app_answer(fetch(server, "/hello.txt"), "GET", "/hello.txt")
        # Dot segments are still resolved before the lookup: never a way out.
        assert SECRET not in fetch(server, "/%2e%2e/secret.txt").body
    finally:
        stop_server(server)


# ---------------------------------------------------------------- the connection

def test_static_and_app_responses_pipelined_in_any_order(site):
    sock, stream = connect(site)
    with sock:
        sock.sendall(get("/hello.txt") + get("/app-path?x=1") + get("/big.bin")
                     + get("/style.css", method="HEAD") + get("/missing") + get("/docs"))
        replies = [stream.response(method) for method in
                   ("GET", "GET", "GET", "HEAD", "GET", "GET")]
    assert [r.status for r in replies] == [200, 200, 200, 200, 200, 301]
    assert replies[0].body == HELLO
    assert replies[1].body.startswith(b"GET /app-path?x=1")
    assert len(replies[2].body) == BIG_SIZE
    assert replies[3].body == b"" and replies[3].header("Content-Length") == str(len(CSS))
    assert replies[4].body.startswith(b"GET /missing")


def test_a_client_that_does_not_read_a_large_file_holds_nobody(site):
    stalled, stalled_stream = connect(site)
    with stalled:
        stalled.sendall(get("/huge.bin"))
        head = stalled_stream.head()
        assert head.header("Content-Length") == str(HUGE_SIZE)
        # The worker is sending the file into a full socket; others are served.
        start = time.monotonic()
        assert fetch(site, "/hello.txt").body == HELLO
        assert fetch(site, "/app-path").body.startswith(b"GET /app-path")
        assert time.monotonic() - start < 1.0
        # Then the slow client takes it all.
        assert stalled_stream.exact(HUGE_SIZE)[-256:] == bytes(range(256))


def test_a_file_that_shrinks_while_sent_ends_in_a_closed_connection(tmp_path):
    for kind, (interface, *loop) in KINDS.items():
        directory = tmp_path / kind
        directory.mkdir()
        make_tree(directory)
        server = start_server(HTTP_APPS[interface], directory, "--interface", interface, *loop,
                              "--static", "/=public")
        try:
            sock, stream = connect(server)
            with sock:
                sock.sendall(get("/huge.bin") + get("/hello.txt"))
                head = stream.head()
                assert head.header("Content-Length") == str(HUGE_SIZE)
                stream.exact(1024)
                os.truncate(directory / "public/huge.bin", HUGE_SIZE // 4)
                rest = stream.until_eof()     # fails unless the server closes
                assert 1024 + len(rest) < HUGE_SIZE, kind
                assert b"HTTP/1.1 200" not in rest[-200:]
        finally:
            stop_server(server)


def test_a_client_that_stops_reading_a_file_is_closed_at_the_deadline(tmp_path):
    make_tree(tmp_path)
    for kind, (interface, *loop) in KINDS.items():
        server = start_server(HTTP_APPS[interface], tmp_path, "--interface", interface, *loop,
                              "--static", "/=public", "--client-timeout", "1")
        try:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with sock:
                sock.sendall(get("/huge.bin"))
                wait_for(lambda: "took no response bytes" in server.log, 10,  # noqa: B023
                         what=f"{kind}: the stalled client to be closed:\n{server.log}")
                assert fetch(server, "/hello.txt").body == HELLO
        finally:
            stop_server(server)


def test_with_app_threads_hits_are_answered_by_the_loop(tmp_path):
    """threads > 1: a static hit never waits behind busy app threads, and a
    pipeline mixing hits and app requests stays in order."""
    make_tree(tmp_path)
    server = start_server(HTTP_APPS["wsgi"], tmp_path, "--threads", "2", "--static", "/=public")
    try:
        slow = [connect(server) for _ in range(2)]
        for sock, _ in slow:      # both app threads busy for ~2 s
            sock.sendall(get("/events?n=2&every=1"))
        for _, stream in slow:
            stream.head()
        start = time.monotonic()
        assert fetch(server, "/hello.txt").body == HELLO
        assert time.monotonic() - start < 0.5
        sock, stream = connect(server)
        with sock:
            sock.sendall(get("/hello.txt") + get("/app-path") + get("/big.bin"))
            replies = [stream.response() for _ in range(3)]
        assert replies[0].body == HELLO
        assert replies[1].body.startswith(b"GET /app-path")
        assert replies[2].body == (tmp_path / "public/big.bin").read_bytes()
        for sock, _ in slow:
            sock.close()
    finally:
        stop_server(server)


def test_hits_are_in_the_access_log(site):
    fetch(site, "/hello.txt?logged=1")
    log = site.directory / "access.log"
    wait_for(lambda: log.exists() and '"GET /hello.txt?logged=1 HTTP/1.1" 200 13' in
             log.read_text(), 10, what="the access log line of a static hit")


# ---------------------------------------------------------------- downloads the app returns

def test_a_file_wrapper_download_is_sent_from_the_loop(tmp_path):
    """A download slower than ``timeout`` completes, and the same single
    worker answers another request meanwhile (WSGI: the app returned the file
    wrapper; the loop sends it)."""
    make_tree(tmp_path)
    server = start_server(HTTP_APPS["wsgi"], tmp_path, "--timeout", "1")
    try:
        pid = worker_pid(server)
        sock, stream = connect(server)
        with sock:
            target = f"/file?path={tmp_path / 'public/huge.bin'}"
            sock.sendall(get(target))
            head = stream.head()
            assert head.status == 200
            received = 0
            started = time.monotonic()
            while received < HUGE_SIZE:
                received += len(stream.exact(min(4 * 1024 * 1024, HUGE_SIZE - received)))
                if received == 8 * 1024 * 1024:
                    quick = time.monotonic()
                    assert fetch(server, "/app-path").status == 200
                    assert time.monotonic() - quick < 0.5
                # Slow: about 2.5 s in all, past --timeout 1.
                time.sleep(0.15)
            assert time.monotonic() - started > 1.5
            assert "has run one request" not in server.log     # no timeout abort
            assert server.worker_pids() == [pid]
    finally:
        stop_server(server)


# ---------------------------------------------------------------- config

def test_a_missing_static_directory_is_one_error_line(tmp_path):
    from clusters import fastpool
    done = fastpool("check", "apps_http:app", "--static", "/s=nowhere", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"Error: static /s: nowhere: no such directory ({tmp_path / 'nowhere'})"]


def test_the_layout_nginx_served_runs_from_one_config(clusters, tmp_path):
    """The layout fastpool replaces: /tast to the slow group, files from
    public/, everything else to the app -- one config."""
    make_tree(tmp_path)
    chosen = ports("web")
    text = render(groups={
        "web": group(chosen["web"], 1, app="apps_routes:web", static={"/": "public"}),
        "task": routed_group("apps_routes:task", ["/tast"], 1,
                             static={"/tast/files": "assets"}),
    })
    cluster = clusters.start(text, workers=2, ports=chosen)
    port = chosen["web"]
    assert fetch(port, "/hello.txt").body == HELLO
    # A hit of the routed group: handed over, then answered by that group's worker.
    assert fetch(port, "/tast/files/app.js").body == b"console.log(1);\n"
    assert fetch(port, "/tast/files/missing.js").pid in cluster.group_pids("task")
    tast = fetch(port, "/tast/report")
    web = fetch(port, "/anything")
    assert tast.status == web.status == 200
    assert tast.pid in cluster.group_pids("task")
    assert web.pid in cluster.group_pids("web")
    assert tast.headers["ETag"] is None and web.headers["ETag"] is None


def test_http_client_keep_alive_across_hits_and_app_answers(site):
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=10)
    try:
        for path in ("/hello.txt", "/x", "/big.bin", "/hello.txt", "/docs/"):
            assert fetch(conn, path).status == 200
    finally:
        conn.close()

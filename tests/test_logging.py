"""Logs (README, Logs): access_log_format (gunicorn atoms and json) on the WSGI
and ASGI workers with hostile bytes from the wire, the worker's batched writes
(within a second, and nothing lost at a stop or a recycling), SIGUSR1 reopening
the access and error logs after a ``mv``, error_log, and log_config (JSON,
TOML, and a bad one).  Apps: tests/apps_logs.py."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from client import fetch, raw_request
from conftest import wait_exit, wait_for

APPS = {"wsgi": "apps_logs:wsgi", "asgi": "apps_logs:asgi"}

# A request as a hostile client sends it: its path percent-encodes a byte that
# is not UTF-8, a quote, a backslash and a newline; its query a quote and a
# backslash (raw, as sent); its headers quotes, backslashes, a tab, raw bytes
# that are not UTF-8 and valid UTF-8.
NASTY = (b'GET /p%ff%22%5c%0a/%c3%a9?q="\\x HTTP/1.1\r\nHost: test\r\n'
         b'User-Agent: ua "q" \\ \xff\xfe\t\xc3\xa9\r\n'
         b'Referer: http://r/"q"\r\n'
         b'X-Request-Id: req-42\r\n'
         b'X-Custom: a"b\\c\xff\r\n'
         b'Connection: close\r\n\r\n')


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def wait_lines(path: Path, count: int, server, timeout: float = 10.0) -> list[str]:
    return wait_for(lambda: len(lines(path)) >= count and lines(path), timeout,
                    what=f"{count} line(s) in {path.name}:\n{server.log}")


def started(server, error_log: Path) -> None:
    """Wait until ``server``, whose error log is ``error_log`` (not its stderr), serves."""
    wait_for(lambda: error_log.exists() and "Booting worker 0" in error_log.read_text()
             and server.can_connect(), what=f"the server to boot:\n{server.log}")


def send_nasty(server) -> None:
    response = raw_request(server, NASTY)
    assert response.startswith(b"HTTP/1.1 200 "), response


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("interface", list(APPS))
def test_json_lines_have_every_field_and_escape_every_hostile_byte(serve, tmp_path, interface):
    path = tmp_path / "access.log"
    server = serve(APPS[interface], "--access-log", str(path), "--access-log-format", "json")
    send_nasty(server)
    assert fetch(server, "/plain?a=1").status == 200
    first, second = (json.loads(line) for line in wait_lines(path, 2, server))
    assert set(first) == {"timestamp", "remote_addr", "method", "path", "query", "protocol",
                          "status", "bytes", "duration_us", "user_agent", "referer", "group",
                          "pid", "request_id"}
    # ISO 8601 with milliseconds and the UTC offset: 2026-12-04T15:00:04.777+00:00
    stamp = first["timestamp"]
    assert len(stamp) == 29 and stamp[10] == "T" and stamp[19] == "." and stamp[23] in "+-"
    assert first["remote_addr"] == "127.0.0.1"
    assert (first["method"], first["protocol"], first["status"]) == ("GET", "HTTP/1.1", 200)
    # Decoded as UTF-8; a byte that is not UTF-8 as \xNN, a backslash doubled.
    assert first["path"] == '/p\\xff"\\\\\n/é'
    assert first["query"] == 'q="\\\\x'
    assert first["user_agent"] == 'ua "q" \\\\ \\xff\\xfe\té'
    assert first["referer"] == 'http://r/"q"'
    assert first["request_id"] == "req-42"
    assert first["bytes"] == 2 and first["pid"] == server.booted_workers()[0]
    assert first["group"] == "main" and isinstance(first["duration_us"], int)
    # Not sent: null.
    assert (second["request_id"], second["referer"], second["path"], second["query"]) == (
        None, None, "/plain", "a=1")
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2 and b"\xff" not in raw


GUNICORN_ATOMS = ('%(h)s|%(l)s|%(u)s|%(t)s|"%(r)s"|%(m)s|%(U)s|%(q)s|%(H)s|%(s)s|%(B)s|%(b)s|'
                  '"%(f)s"|"%(a)s"|%(T)s|%(M)s|%(D)s|%(L)s|%(p)s|%({x-custom}i)s|'
                  '%({X-Request-Id}i)s|%({x-absent}i)s|100%%')


@pytest.mark.parametrize("interface", list(APPS))
def test_gunicorn_atoms_with_text_escapes(serve, tmp_path, interface):
    path = tmp_path / "access.log"
    server = serve(APPS[interface], "--access-log", str(path),
                   "--access-log-format", GUNICORN_ATOMS)
    send_nasty(server)
    (line,) = wait_lines(path, 1, server)
    fields = line.split("|")
    assert len(fields) == 23, line
    (h, l_, u, t, r, m, url, q, proto, s, big_b, b, f, a, big_t, big_m, d, big_l, p, custom,
     request_id, absent, percent) = fields
    assert (h, l_, u, m, proto, s, big_b, b) == ("127.0.0.1", "-", "-", "GET", "HTTP/1.1",
                                                  "200", "2", "2")
    assert t.startswith("[") and t.endswith("]") and len(t) == 28, t
    assert r == '"GET /p%ff%22%5c%0a/%c3%a9?q=\\"\\\\x HTTP/1.1"'
    assert url == '/p\\xff\\"\\\\\\x0a/é'
    assert q == 'q=\\"\\\\x'
    assert f == '"http://r/\\"q\\""'
    assert a == '"ua \\"q\\" \\\\ \\xff\\xfe\\x09é"'
    assert custom == 'a\\"b\\\\c\\xff'
    assert (request_id, absent, percent) == ("req-42", "-", "100%")
    assert big_t == "0" and int(big_m) >= 0 and int(d) >= 0 and big_l.startswith("0.")
    assert p == f"<{server.booted_workers()[0]}>"


@pytest.mark.parametrize(("fmt", "needle"), [
    ("%(h)s %(zz)s", "unknown atom %(zz)s"),
    ("%(h)s %({x-y}o)s", "response headers"),
])
def test_a_bad_format_stops_the_start_with_one_line(serve, fmt, needle):
    server = serve(APPS["wsgi"], "--access-log", "-", "--access-log-format", fmt, wait=False)
    code, _ = wait_exit(server)
    assert code == 2, server.log
    (line,) = server.log.strip().splitlines()
    assert line.startswith("Error: --access-log-format: ") and needle in line, line


# ---------------------------------------------------------------- batched writes


def test_a_line_is_written_within_a_second_without_more_requests(serve, tmp_path):
    path = tmp_path / "access.log"
    server = serve(APPS["wsgi"], "--access-log", str(path))
    assert fetch(server, "/one").status == 200
    sent = time.monotonic()
    wait_lines(path, 1, server, timeout=5)
    assert time.monotonic() - sent < 1.5


@pytest.mark.parametrize(("interface", "sig"), [("wsgi", signal.SIGTERM),
                                                ("asgi", signal.SIGTERM),
                                                ("wsgi", signal.SIGQUIT),
                                                ("asgi", signal.SIGQUIT)])
def test_every_line_is_written_when_the_server_stops(serve, tmp_path, interface, sig):
    path = tmp_path / "access.log"
    server = serve(APPS[interface], "--access-log", str(path), "--workers", "2")
    for index in range(40):
        assert fetch(server, f"/n{index}").status == 200
    assert server.stop(sig) == 0
    written = lines(path)
    assert sorted(int(line.split('"GET /n')[1].split()[0]) for line in written) == list(
        range(40)), written


@pytest.mark.parametrize("interface", list(APPS))
def test_every_line_is_written_by_recycled_workers(serve, tmp_path, interface):
    path = tmp_path / "access.log"
    server = serve(APPS[interface], "--access-log", str(path), "--access-log-format", "json",
                   "--max-requests", "4")
    for index in range(10):
        assert fetch(server, f"/n{index}").status == 200
    entries = [json.loads(line) for line in wait_lines(path, 10, server)]
    assert [e["path"] for e in entries] == [f"/n{i}" for i in range(10)]
    assert len({e["pid"] for e in entries}) == 3, entries


def test_every_line_is_written_by_a_worker_the_app_ends(serve, tmp_path):
    """The app's code raises SystemExit out of the WSGI worker: the lines it
    queued before are written on the way out."""
    path = tmp_path / "access.log"
    server = serve(APPS["wsgi"], "--access-log", str(path))
    (pid,) = server.booted_workers()
    for index in range(5):
        assert fetch(server, f"/n{index}").status == 200
    with pytest.raises(OSError):
        fetch(server, "/exit", timeout=5)
    wait_for(lambda: f"(pid {pid}) of group main exited with code 3" in server.log,
             what=f"the worker to exit:\n{server.log}")
    assert [line.split()[6] for line in lines(path)] == [f"/n{i}" for i in range(5)]


# ---------------------------------------------------------------- reopen, error_log


def test_usr1_reopens_the_access_log_after_a_move(serve, tmp_path):
    path = tmp_path / "access.log"
    moved = tmp_path / "access.log.1"
    server = serve(APPS["asgi"], "--access-log", str(path))
    assert fetch(server, "/before").status == 200
    wait_lines(path, 1, server)
    path.rename(moved)
    os.kill(server.pid, signal.SIGUSR1)
    wait_for(path.exists, what=f"a new access.log:\n{server.log}")
    assert fetch(server, "/after").status == 200
    (line,) = wait_lines(path, 1, server)
    assert "GET /after" in line
    assert "/after" not in moved.read_text() and "GET /before" in moved.read_text()


@pytest.mark.parametrize("interface", list(APPS))
def test_error_log_file_gets_the_start_and_usr1_reopens_it(serve, tmp_path, interface):
    path = tmp_path / "logs" / "error.log"
    path.parent.mkdir()
    moved = tmp_path / "logs" / "error.log.1"
    server = serve(APPS[interface], "--error-log", "logs/error.log", wait=False)
    started(server, path)
    text = path.read_text()
    assert "[INFO] Starting fastpool" in text and "[INFO] Booting worker 0" in text
    assert "Starting fastpool" not in server.log     # not on stderr
    path.rename(moved)
    os.kill(server.pid, signal.SIGUSR1)
    wait_for(lambda: path.exists() and "Handling signal: SIGUSR1" in path.read_text(),
             what=f"the master's line in a new error.log:\n{server.log}")

    # The worker reopens too: its next lines go to the new file.
    def worker_line() -> bool:
        assert fetch(server, "/log?n=x").status == 200
        return "[WARNING] app-line x" in path.read_text()
    wait_for(worker_line, interval=0.1, what="a worker's line in the new error.log")
    assert fetch(server, "/log?n=y").status == 200
    assert "app-line y" in path.read_text() and "app-line y" not in moved.read_text()
    assert server.stop() == 0
    assert "Shutting down: master" in path.read_text()


# ---------------------------------------------------------------- log_config


def test_log_config_json_changes_the_error_log_format(serve, tmp_path):
    out = tmp_path / "custom.log"
    (tmp_path / "logging.json").write_text(json.dumps({
        "formatters": {"plain": {"format": "CUSTOM %(levelname)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(out),
                              "formatter": "plain"}},
        "loggers": {"fastpool": {"handlers": ["file"], "level": "INFO",
                                 "propagate": False}},
    }))
    server = serve(APPS["wsgi"], "--log-config", "logging.json", wait=False)
    started(server, out)
    text = out.read_text()
    assert "CUSTOM INFO Starting fastpool" in text and "CUSTOM INFO Booting worker 0" in text
    assert "Booting worker" not in server.log


def test_log_config_toml_carries_the_access_lines(serve, tmp_path):
    out = tmp_path / "access-through-logging.log"
    (tmp_path / "logging.toml").write_text(f"""
[formatters.access]
format = "ACCESS %(name)s %(message)s"

[handlers.access]
class = "logging.FileHandler"
filename = "{out}"
formatter = "access"

[loggers."fastpool.access"]
handlers = ["access"]
level = "INFO"
propagate = false
""")
    # No access_log: a log_config that configures fastpool.access turns it on.
    server = serve(APPS["asgi"], "--log-config", "logging.toml",
                   "--access-log-format", "%(m)s %(U)s %(s)s")
    assert fetch(server, "/via-logging").status == 200
    (line,) = wait_lines(out, 1, server)
    assert line == "ACCESS fastpool.access GET /via-logging 200"
    assert "Booting worker 0" in server.log     # the error log is still the default


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("bad.json", "{not json", "not valid JSON"),
    ("bad.toml", "[handlers.x]\nclass = \"no.such.Handler\"\n", "handler 'x'"),
    ("bad.yaml", "version: 1\n", "expected a .json or .toml file"),
    ("missing.json", None, "No such file"),
])
def test_a_bad_log_config_stops_the_start_with_one_line(serve, tmp_path, name, content,
                                                         needle):
    if content is not None:
        (tmp_path / name).write_text(content)
    server = serve(APPS["wsgi"], "--log-config", name, wait=False)
    code, _ = wait_exit(server)
    assert code == 2, server.log
    (line,) = server.log.strip().splitlines()
    assert line.startswith(f"Error: log_config: {tmp_path / name}: ") and needle in line, line


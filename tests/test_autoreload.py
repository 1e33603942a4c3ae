"""Reload on code change (``fastpool serve --reload``): a real server watching
an app written to ``tmp_path``, edited while it serves.

Every edit goes through ``save``, which moves the file's modification time
forward by a second at least: byte-code caches compare whole seconds, so two
saves within one second would otherwise look alike to Python.  A test that
needs to show that something did NOT reload saves a marker edit afterwards and
counts the reloads once the marker is served: the watcher reports changes in
order, so a reload the test wrongly caused shows before the marker's.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from client import fetch
from clusters import fastpool, group, ports, render
from conftest import alive, cmdline, wait_for

WSGI_APP = '''
import os

VERSION = {version!r}


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/pid":
        return [str(os.getpid()).encode()]
    return [VERSION.encode()]


b = app
'''

ASGI_APP = '''
import os

VERSION = {version!r}
state = {{}}


def note(text):
    with open("lifespan.txt", "a") as handle:
        handle.write(f"{{text}} {{VERSION}} {{os.getpid()}}\\n")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["started"] = VERSION
                note("startup")
                await send({{"type": "lifespan.startup.complete"}})
            else:
                note("shutdown")
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]}})
    await send({{"type": "http.response.body",
                "body": state.get("started", "no startup").encode()}})
'''

RELOADING = "; reloading"     # the end of the master's "Reload: FILES changed; reloading"


def save(path: Path, text: str) -> None:
    """Write ``text`` to ``path``; its modification time moves forward by a
    second at least (see the module's docstring)."""
    before = path.stat().st_mtime if path.exists() else 0.0
    path.write_text(text)
    if path.stat().st_mtime < before + 1:
        os.utime(path, (before + 1, before + 1))


def body(where, path: str = "/") -> str:
    reply = fetch(where, path)
    assert reply.status == 200, reply
    return reply.body.decode()


def wait_body(server, expected: str, where=None) -> None:
    wait_for(lambda: body(where or server) == expected, timeout=15,
             what=f"the response {expected!r}:\n{server.log}")


def reloads(server) -> int:
    return server.log.count(RELOADING)


def watching(server, how: str = "with watchfiles"):
    """``server`` once its watcher watches (it says so once its watches are set)."""
    wait_for(lambda: "Reload: watching" in server.log, what=f"the watcher:\n{server.log}")
    assert how in server.log, server.log
    return server


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "devapp.py"
    save(path, WSGI_APP.format(version="v1"))
    return path


def test_an_edit_reloads_onto_new_workers(serve, app_file):
    server = watching(serve("devapp:app", "--reload", workers=2))
    assert body(server) == "v1"
    old = set(server.booted_workers())
    assert len(old) == 2

    save(app_file, WSGI_APP.format(version="v2"))
    wait_body(server, "v2")
    assert "Reload: devapp.py changed; reloading" in server.log
    new = wait_for(lambda: set(server.booted_workers()) - old, what="new workers")
    assert len(new) == 2
    wait_for(lambda: not any(alive(pid) for pid in old), what=f"old workers gone:\n{server.log}")
    assert int(body(server, "/pid")) in new
    # The same master throughout.
    assert server.proc.poll() is None
    assert server.log.count("Starting fastpool") == 1
    assert f"master pid {server.pid}" in server.log
    assert reloads(server) == 1


@pytest.mark.parametrize("watcher", ["watchfiles", "poll"])
def test_a_burst_of_saves_is_one_reload(serve, app_file, watcher):
    server = watching(serve("devapp:app", "--reload", "--reload-watcher", watcher),
                      "with watchfiles" if watcher == "watchfiles" else "by polling")
    for version in range(2, 7):        # an editor, a git checkout: five saves at once
        save(app_file, WSGI_APP.format(version=f"v{version}"))
        time.sleep(0.05)
    wait_body(server, "v6")
    save(app_file, WSGI_APP.format(version="marker"))
    wait_body(server, "marker")
    assert reloads(server) == 2, server.log


def test_a_syntax_error_keeps_the_old_workers_and_is_logged_once(serve, app_file):
    # crash_limit 2: the two new workers that cannot boot are no crash loop of
    # the group (its old workers serve on).
    server = watching(serve("devapp:app", "--reload", "--crash-limit", "2", workers=2))
    old = set(server.booted_workers())
    save(app_file, WSGI_APP.format(version="v2").replace("def app(", "def app(:"))
    wait_for(lambda: "Reload of group main failed" in server.log,
             what=f"the failed reload:\n{server.log}")
    assert body(server) == "v1"
    assert int(body(server, "/pid")) in old

    save(app_file, WSGI_APP.format(version="v3"))
    wait_body(server, "v3")
    assert server.log.count("syntax error in") == 1, server.log
    assert server.log.count("Reload of group main failed") == 1
    assert reloads(server) == 2
    assert server.proc.poll() is None


def test_excluded_files_change_nothing(serve, app_file, tmp_path):
    server = watching(serve("devapp:app", "--reload", "--reload-exclude", "generated_*.py"))
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    for name in (".#devapp.py", "devapp.py~", "devapp.py.swp", "4913", "notes.txt",
                 "generated_models.py", "pkg/__pycache__/devapp.py", ".hidden.py"):
        save(tmp_path / name, "x = 1\n")
    save(app_file, WSGI_APP.format(version="marker"))
    wait_body(server, "marker")
    assert reloads(server) == 1, server.log
    assert "Reload: devapp.py changed; reloading" in server.log


def test_reload_dir_elsewhere(serve, tmp_path):
    lib, run = tmp_path / "lib", tmp_path / "run"
    lib.mkdir()
    run.mkdir()
    save(lib / "devapp.py", WSGI_APP.format(version="v1"))
    save(run / "local.py", "x = 1\n")
    server = watching(serve("devapp:app", "--reload", "--reload-dir", "../lib", cwd=run,
                            env={"PYTHONPATH": str(lib)}))
    assert f"Reload: watching {lib} with watchfiles" in server.log
    save(run / "local.py", "x = 2\n")      # not watched: the current directory is not
    save(lib / "devapp.py", WSGI_APP.format(version="v2"))
    wait_body(server, "v2")
    assert reloads(server) == 1, server.log
    assert "local.py" not in server.log


def test_asgi_lifespan_runs_for_new_and_old_workers(serve, tmp_path):
    path = tmp_path / "devapp.py"
    save(path, ASGI_APP.format(version="v1"))
    server = watching(serve("devapp:app", "--reload", "--lifespan", "on"))
    assert body(server) == "v1"
    save(path, ASGI_APP.format(version="v2"))
    wait_body(server, "v2")        # set by the new worker's startup, from the new code
    events = tmp_path / "lifespan.txt"
    wait_for(lambda: "shutdown v1" in events.read_text(),
             what=f"the old worker's shutdown:\n{server.log}")
    assert [line.split()[:2] for line in events.read_text().splitlines()] == [
        ["startup", "v1"], ["startup", "v2"], ["shutdown", "v1"]]


def test_groups_all_reload_and_the_config_file_is_watched(clusters, tmp_path, app_file):
    port = ports("a", "b")

    def config(b_workers: int) -> str:
        return render(server={"reload": True},
                      groups={"a": group(port["a"], app="devapp:app"),
                              "b": group(port["b"], app="devapp:b", workers=b_workers)})

    server = watching(clusters.start(config(1), workers=2, ports=port))
    save(app_file, WSGI_APP.format(version="v2"))
    wait_body(server, "v2", port["a"])
    wait_body(server, "v2", port["b"])
    assert reloads(server) == 1

    save(tmp_path / "fastpool.toml", config(2))
    wait_for(lambda: "Reload: fastpool.toml changed; reloading" in server.log,
             what=f"the config's reload:\n{server.log}")
    server.wait_group("b", 2)
    assert reloads(server) == 2


def test_preload_imports_the_new_code_in_the_master(serve, app_file):
    server = watching(serve("devapp:app", "--reload", "--preload"))
    save(app_file, WSGI_APP.format(version="v2"))
    wait_body(server, "v2")
    save(app_file, WSGI_APP.format(version="v3") + "\nraise RuntimeError('half-written')\n")
    wait_for(lambda: "its app cannot be imported" in server.log,
             what=f"the failed reload:\n{server.log}")
    assert body(server) == "v2"
    save(app_file, WSGI_APP.format(version="v4"))
    wait_body(server, "v4")
    assert server.log.count("RuntimeError: half-written") == 1, server.log


def test_polling_when_asked_by_the_environment(serve, app_file):
    server = watching(serve("devapp:app", "--reload", env={"FASTPOOL_RELOAD_WATCHER": "poll"}),
                      "by polling (pip install 'fastpool[reload]' for watchfiles)")
    save(app_file, WSGI_APP.format(version="v2"))
    wait_body(server, "v2")
    assert reloads(server) == 1


def test_off_by_default_and_check_lists_it(app_file, tmp_path):
    off = fastpool("check", "devapp:app", cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert "reload on code change: off" in off.stdout
    on = fastpool("check", "devapp:app", "--reload", cwd=tmp_path)
    assert on.returncode == 0, on.stderr
    assert f"reload on code change: ON (development only): {tmp_path} with" in on.stdout
    bad = fastpool("serve", "devapp:app", "--reload", "--reload-dir", "nowhere", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr == (f"Error: --reload-dir: nowhere: no such directory "
                          f"({tmp_path / 'nowhere'})\n")


def test_a_watcher_that_dies_is_started_again(serve, app_file):
    server = watching(serve("devapp:app", "--reload"))
    watcher = [pid for pid in server.worker_pids() if pid not in server.booted_workers()]
    assert len(watcher) == 1 and "reload watcher" in cmdline(watcher[0])
    os.kill(watcher[0], signal.SIGKILL)
    wait_for(lambda: server.log.count("Reload: watching") == 2,
             what=f"a new watcher:\n{server.log}")
    assert "ended (killed by signal SIGKILL); starting it again" in server.log
    save(app_file, WSGI_APP.format(version="v2"))
    wait_body(server, "v2")
    # A stop ends the watcher with the rest.
    new = [pid for pid in server.worker_pids() if pid not in server.booted_workers()]
    assert server.stop() == 0
    assert not any(alive(pid) for pid in new)

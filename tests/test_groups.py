"""Worker groups: several apps on their own ports and workers under one master,
their per-group settings, and the control socket (status, reload, scale).

Every server is the real ``python -m fastpool serve --config FILE`` (started by
clusters.Clusters); the app is apps_groups.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from client import fetch, start_sleeper, timed
from clusters import fastpool, group, ports, render
from conftest import DEADLINE, alive, children, cmdline, wait_for

# ---------------------------------------------------------------- the example config


EXAMPLE = """\
[server]
graceful_timeout = 30
[group.web]
app = "shop:app"
listen = ["127.0.0.1:{web}"]
workers = 2
[group.task]
app = "shop:app"
listen = ["127.0.0.1:{task}"]
workers = 2
timeout = 120
max_requests = 1000
max_requests_jitter = 100
[process.mailer]
target = "shop.jobs:consume"
count = 2
"""


def write_shop(directory: Path) -> None:
    """The ``shop`` package of the example, in the server's working directory."""
    (directory / "shop").mkdir()
    (directory / "shop" / "__init__.py").write_text("from apps_groups import app  # noqa\n")
    (directory / "shop" / "jobs.py").write_text("from apps_groups import consume  # noqa\n")


def test_example_config_serves_each_group_from_its_own_workers(clusters, tmp_path):
    write_shop(tmp_path)
    chosen = ports("web", "task")
    server = clusters.start(EXAMPLE.format(**chosen), workers=4, ports=chosen)
    result = server.fastpool("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    by_name = {g["name"]: g for g in status["groups"]}
    assert set(by_name) == {"web", "task"}
    pids = {name: sorted(w["pid"] for w in g["workers"]) for name, g in by_name.items()}
    assert len(pids["web"]) == 2 and len(pids["task"]) == 2
    assert not set(pids["web"]) & set(pids["task"])
    # The log agrees with the status on which worker belongs to which group.
    assert sorted(server.booted("web")) == pids["web"], server.log
    assert sorted(server.booted("task")) == pids["task"], server.log
    for name in ("web", "task"):
        seen = set()
        for _ in range(30):
            reply = fetch(chosen[name], "/pid")
            assert reply.status == 200 and int(reply.body) == reply.pid
            seen.add(reply.pid)
        assert seen <= set(pids[name]), (name, seen, pids)
    # The custom processes run, print into the log, and are the master's children.
    (mailer,) = status["processes"]
    assert mailer["name"] == "mailer" and mailer["count"] == 2 and len(mailer["pids"]) == 2
    for pid in mailer["pids"]:
        wait_for(lambda pid=pid: f"mailer stdout {pid}" in server.log, what="mailer output")
    assert sorted(children(server.pid)) == sorted(pids["web"] + pids["task"] + mailer["pids"])


def test_check_prints_the_plan_of_the_example(tmp_path):
    write_shop(tmp_path)
    chosen = ports("web", "task")
    config = tmp_path / "fastpool.toml"
    config.write_text(EXAMPLE.format(**chosen))
    result = fastpool("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"config: {config}" in out
    assert (f"group web: app shop:app, listen 127.0.0.1:{chosen['web']}, 2 worker(s) x "
            "1 thread(s), timeout 30 s, max_requests off") in out, out
    assert (f"group task: app shop:app, listen 127.0.0.1:{chosen['task']}, 2 worker(s) x "
            "1 thread(s), timeout 120 s, max_requests 1000") in out, out
    assert "process mailer: target shop.jobs:consume x 2" in out
    assert f"control socket: {tmp_path / '.fastpool.sock'}" in out
    assert out.rstrip().endswith("OK")
    assert not (tmp_path / ".fastpool.sock").exists()


# ---------------------------------------------------------------- isolation


def test_a_busy_group_does_not_slow_down_another(clusters):
    chosen = ports("web", "task")
    # task: one shared socket, so that the second slow request reaches the idle worker.
    text = render(groups={"web": group(chosen["web"]),
                          "task": group(chosen["task"], 2, reuse_port=False)})
    server = clusters.start(text, workers=3, ports=chosen)
    task_pids = server.wait_group("task", 2)
    fetch(chosen["web"], "/pid")   # warm up
    with ThreadPoolExecutor(2) as pool:
        sleepers = [start_sleeper(pool, server, 2, port=chosen["task"]) for _ in range(2)]
        busy = server.group_status("task")["workers"]
        assert all(w["current_request_s"] is not None for w in busy), busy
        latencies = []
        for _ in range(5):
            took, reply = timed(fetch, chosen["web"], "/pid")
            assert reply.status == 200
            latencies.append(took)
        assert not any(f.done() for f in sleepers), "the slow requests ended too early"
        results = [f.result(timeout=20) for f in sleepers]
    assert max(latencies) < 0.1, latencies
    assert {r.status for r in results} == {200}
    assert {r.pid for r in results} == set(task_pids)


# ---------------------------------------------------------------- threads


def test_threads_serve_concurrent_requests_in_one_worker(clusters):
    chosen = ports("io")
    text = render(groups={"io": group(chosen["io"], 1, threads=4)})
    server = clusters.start(text, workers=1, ports=chosen)
    (worker,) = server.wait_group("io", 1)
    code, _, body = fetch(chosen["io"], "/environ")
    assert code == 200
    assert json.loads(body)["wsgi.multithread"] is True
    assert server.group_status("io")["threads"] == 4
    with ThreadPoolExecutor(4) as pool:
        start = time.monotonic()
        futures = [pool.submit(fetch, chosen["io"], "/sleep?s=0.5&tag=t") for _ in range(4)]
        results = [f.result(timeout=15) for f in futures]
        took = time.monotonic() - start
    assert [r.status for r in results] == [200] * 4
    assert {r.pid for r in results} == {worker}
    assert took < 1.5, f"4 concurrent 0.5 s requests took {took:.2f} s on 4 threads"


@pytest.mark.parametrize(("flooders", "limit"), [(3, 0.1), (8, 1.0)],
                         ids=["3-of-4-threads-busy", "8-connections"])
def test_threads_keep_a_fast_endpoint_answering_under_a_flood(clusters, flooders, limit):
    """With a thread to spare the fast endpoint answers at once; with more
    blocking connections than threads it waits for the pool (FIFO), never
    longer than two rounds of it."""
    chosen = ports("io")
    text = render(groups={"io": group(chosen["io"], 1, threads=4)})
    server = clusters.start(text, workers=1, ports=chosen)
    (worker,) = server.wait_group("io", 1)
    stop = threading.Event()
    flooded: list[int] = []
    deadline = time.monotonic() + 15

    def flood() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", chosen["io"], timeout=10)
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                conn.request("GET", "/sleep?s=0.2&tag=flood")
                response = conn.getresponse()
                response.read()
                flooded.append(response.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(flooders)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(flooded) >= flooders, what="the flood to run")
        latencies = []
        for _ in range(6):
            took, reply = timed(fetch, chosen["io"], "/pid")
            assert reply.status == 200 and reply.pid == worker
            latencies.append(took)
        busy = server.group_status("io")["workers"][0]["current_request_s"]
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert set(flooded) == {200}
    assert busy is not None
    assert max(latencies) < limit, [round(t, 3) for t in latencies]


# ---------------------------------------------------------------- nice, cpus, titles


def niceness(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])   # field 19 of the whole line: after pid and comm


def test_nice_and_cpus_apply_to_the_group_workers(clusters):
    chosen = ports("batch", "web")
    text = render(groups={"batch": group(chosen["batch"], 2, nice=5, cpus=[0]),
                          "web": group(chosen["web"])})
    server = clusters.start(text, workers=3, ports=chosen)
    batch = server.wait_group("batch", 2)
    (web,) = server.wait_group("web", 1)
    master_nice = niceness(server.pid)
    for pid in batch:
        assert niceness(pid) == 5
        assert os.sched_getaffinity(pid) == {0}
    assert niceness(web) == master_nice
    assert os.sched_getaffinity(web) == os.sched_getaffinity(server.pid)


def test_process_titles(clusters):
    pytest.importorskip("setproctitle")
    chosen = ports("web")
    text = render(groups={"web": group(chosen["web"])},
                  processes={"mailer": {"target": "apps_groups:consume"}})
    server = clusters.start(text, workers=1, ports=chosen)
    (web,) = server.wait_group("web", 1)
    (mailer,) = wait_for(lambda: server.status()["processes"][0]["pids"], what="the mailer")
    assert "fastpool: master" in cmdline(server.pid)
    assert f"fastpool: web worker 0 [http://127.0.0.1:{chosen['web']}]" in cmdline(web)
    assert "fastpool: mailer process 0" in cmdline(mailer)


# ---------------------------------------------------------------- status


def test_status_shows_groups_workers_and_processes(clusters):
    chosen = ports("web", "task")
    text = render(groups={"web": group(chosen["web"]), "task": group(chosen["task"])},
                  processes={"mailer": {"target": "apps_groups:consume", "count": 2}})
    server = clusters.start(text, workers=2, ports=chosen)
    (web,) = server.wait_group("web", 1)
    (task,) = server.wait_group("task", 1)
    assert stat.S_IMODE(os.stat(server.control).st_mode) == 0o600
    for _ in range(3):
        assert fetch(chosen["web"], "/pid").status == 200
    os.kill(web, signal.SIGKILL)
    (web,) = server.wait_group("web", 1, exclude={web})
    for _ in range(2):
        assert fetch(chosen["web"], "/pid").status == 200
    with ThreadPoolExecutor(1) as pool:
        slow = start_sleeper(pool, server, 2, port=chosen["task"])
        result = server.fastpool("status", "--json")
        text_result = server.fastpool("status")
        assert not slow.done()
        assert slow.result(timeout=15).status == 200
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["master"] == server.pid
    groups = {g["name"]: g for g in status["groups"]}
    assert groups["web"]["listen"] == [f"http://127.0.0.1:{chosen['web']}"]
    assert groups["task"]["listen"] == [f"http://127.0.0.1:{chosen['task']}"]
    assert groups["web"]["restarts"] == 1
    assert groups["task"]["restarts"] == 0
    (web_worker,) = groups["web"]["workers"]
    (task_worker,) = groups["task"]["workers"]
    assert web_worker["pid"] == web and task_worker["pid"] == task
    assert web_worker["requests"] == 2
    assert web_worker["current_request_s"] is None
    assert task_worker["current_request_s"] is not None and task_worker["current_request_s"] >= 0
    for worker in (web_worker, task_worker):
        assert worker["rss_kib"] > 1000
    (mailer,) = status["processes"]
    assert mailer["name"] == "mailer" and len(mailer["pids"]) == 2
    assert sorted(children(server.pid)) == sorted([web, task, *mailer["pids"]])
    # The human-readable form has the same facts.
    assert text_result.returncode == 0, text_result.stderr
    out = text_result.stdout
    assert "group web (running): apps_groups:app, 1/1 worker(s)" in out, out
    assert "1 restart(s)" in out and f"listen: http://127.0.0.1:{chosen['task']}" in out
    assert str(task) in out and "process mailer (running)" in out


def test_status_without_a_master_is_one_error_line(tmp_path):
    result = fastpool("status", "--control-socket", str(tmp_path / "nobody.sock"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "nobody.sock" in lines[0]


def test_a_second_server_on_the_same_control_socket_is_refused(serve, tmp_path):
    first = serve("apps_wsgi:hello")
    second = serve("apps_wsgi:hello", wait=False)
    try:
        code = second.proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the second server runs:\n{second.log}") from None
    assert code == 2, second.log
    # One line, before the second one bound its port or forked a worker.
    (line,) = second.log.splitlines()
    path = tmp_path / ".fastpool.sock"
    assert line == (f"Error: control socket {path} is in use by another fastpool master "
                    f"(pid {first.pid}); stop that one, or give this server its own socket "
                    "with --control-socket PATH (control_socket in [server] of the config "
                    "file)"), line
    assert not second.can_connect()
    # The first one still owns the socket and serves.
    assert path.exists()
    result = fastpool("status", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"] == first.pid
    assert first.can_connect()
    # With a socket of its own, a second server starts next to the first.
    third = serve("apps_wsgi:hello", "--control-socket", "third.sock")
    result = fastpool("status", "--json", "--control-socket", "third.sock", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"] == third.pid
    assert third.stop() == 0
    assert not (tmp_path / "third.sock").exists()
    assert path.exists()


def test_a_stale_control_socket_is_replaced_silently(serve, tmp_path):
    path = tmp_path / ".fastpool.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_over:
        left_over.bind(str(path))     # a master that died without cleaning up
    server = serve("apps_wsgi:hello")
    result = fastpool("status", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"] == server.pid
    assert "control socket" not in server.log, server.log
    assert "WARNING" not in server.log, server.log


@pytest.mark.parametrize("how", ["environment", "flag", "server-table"])
def test_status_finds_the_control_socket_where_serve_put_it(clusters, tmp_path, how):
    """One rule places the control socket for serve and for status/reload/scale:
    flag > FASTPOOL_CONTROL_SOCKET > [server] control_socket > default, a
    relative path being relative to the config file's directory."""
    chosen = ports("web")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server_table = {"control_socket": "ctl.sock"} if how == "server-table" else None
    text = render(server=server_table, groups={"web": group(chosen["web"])})
    env = {"FASTPOOL_CONTROL_SOCKET": "ctl.sock"} if how == "environment" else None
    args = ("--control-socket", "ctl.sock") if how == "flag" else ()
    server = clusters.start(text, workers=1, ports=chosen, cwd=elsewhere, env=env, args=args)
    server.control = tmp_path / "ctl.sock"
    assert server.status()["master"] == server.pid
    assert not (elsewhere / "ctl.sock").exists()
    config = ("--config", str(server.config))
    result = fastpool("status", "--json", *config, *args, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"] == server.pid
    # The flag beats the environment, as for serve.
    result = fastpool("status", "--json", *config, "--control-socket", "ctl.sock",
                      cwd=elsewhere, env={"FASTPOOL_CONTROL_SOCKET": "wrong.sock"})
    assert result.returncode == 0, result.stderr
    result = fastpool("status", *config, cwd=elsewhere,
                      env={"FASTPOOL_CONTROL_SOCKET": "wrong.sock"})
    assert result.returncode == 1
    assert result.stderr.startswith("Error: no control socket at ") and \
        str(tmp_path / "wrong.sock") in result.stderr, result.stderr


# ---------------------------------------------------------------- reload, scale, TTIN/TTOU


def test_reload_of_one_group_replaces_only_its_workers(clusters):
    chosen = ports("web", "task")
    text = render(groups={"web": group(chosen["web"], 2), "task": group(chosen["task"], 2)})
    server = clusters.start(text, workers=4, ports=chosen)
    web = server.wait_group("web", 2)
    task = server.wait_group("task", 2)
    result = server.fastpool("reload", "--group", "task")
    assert result.returncode == 0, result.stderr
    new_task = server.wait_group("task", 2, exclude=set(task))
    wait_for(lambda: not any(map(alive, task)), what="the old task workers to exit")
    assert server.group_pids("web") == web
    assert all(map(alive, web))
    assert {fetch(chosen["task"], "/pid").pid for _ in range(10)} <= set(new_task)
    assert {fetch(chosen["web"], "/pid").pid for _ in range(10)} <= set(web)


def test_reload_keeps_the_listen_addresses_and_applies_the_rest(clusters):
    """A reload that moves a group's listen addresses keeps the sockets it has
    (with a warning) and applies its other settings; the master keeps the
    addresses it really listens on, so a second reload of the same file warns
    again and one that goes back to the old addresses does not."""
    chosen = ports("web", "moved")
    original = render(groups={"web": group(chosen["web"], 1)})
    server = clusters.start(original, workers=1, ports={"web": chosen["web"]})
    old = set(server.wait_group("web", 1))
    warning = "Reload: group web changed its listen addresses"
    moved = render(groups={"web": group(chosen["moved"], 2)})
    for turn in (1, 2):
        server.config.write_text(moved)
        assert server.fastpool("reload").returncode == 0
        wait_for(lambda turn=turn: server.log.count(warning) == turn,
                 what=f"reload {turn} to warn about the moved listen address")
        pids = server.wait_group("web", 2, exclude=old)
        assert server.group_status("web")["listen"] == [f"http://127.0.0.1:{chosen['web']}"]
        assert {fetch(chosen["web"], "/pid").pid for _ in range(10)} <= set(pids)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", chosen["moved"]), timeout=5).close()
        old = set(pids)
    server.config.write_text(render(groups={"web": group(chosen["web"], 1)}))
    assert server.fastpool("reload").returncode == 0
    (last,) = server.wait_group("web", 1, exclude=old)
    assert fetch(chosen["web"], "/pid").pid == last
    assert server.log.count(warning) == 2, server.log


def test_scale_a_group_up_and_down(clusters):
    chosen = ports("web", "task")
    text = render(groups={"web": group(chosen["web"], 1), "task": group(chosen["task"], 1)})
    server = clusters.start(text, workers=2, ports=chosen)
    (web,) = server.wait_group("web", 1)
    (task,) = server.wait_group("task", 1)
    result = server.fastpool("scale", "web", "+1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "group web: 2 worker(s)"
    two = server.wait_group("web", 2)
    assert web in two
    wait_for(lambda: len(children(server.pid)) == 3, what="3 children of the master")
    assert {fetch(chosen["web"], "/pid").pid for _ in range(20)} <= set(two)
    result = server.fastpool("scale", "web", "-1")
    assert result.returncode == 0, result.stderr
    (left,) = server.wait_group("web", 1)
    wait_for(lambda: sorted(children(server.pid)) == sorted([left, task]),
             what="the master to have 2 children")
    assert server.group_pids("task") == [task]
    result = server.fastpool("scale", "nosuch", "+1")
    assert result.returncode == 1
    assert result.stderr.startswith("Error:") and "nosuch" in result.stderr


def test_ttin_and_ttou_change_every_group(clusters):
    chosen = ports("web", "task")
    text = render(groups={"web": group(chosen["web"], 1), "task": group(chosen["task"], 2)})
    server = clusters.start(text, workers=3, ports=chosen)
    server.wait_group("web", 1)
    server.wait_group("task", 2)
    server.proc.send_signal(signal.SIGTTIN)
    server.wait_group("web", 2)
    server.wait_group("task", 3)
    wait_for(lambda: len(children(server.pid)) == 5, what="5 children of the master")
    server.proc.send_signal(signal.SIGTTOU)
    server.wait_group("web", 1)
    server.wait_group("task", 2)
    wait_for(lambda: len(children(server.pid)) == 3, what="3 children of the master")

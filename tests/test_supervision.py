"""Supervision of worker groups and custom processes: replacement of killed
workers, rolling reloads under load, request timeouts, max_requests, crash
loops, supervised processes, graceful stop.

Every server is the real ``python -m fastpool serve --config FILE`` (started by
clusters.Clusters); the apps are apps_groups.py and
apps_groups_crash.py.  Load comes from clusters.Load: client
threads for a bounded time, each request checked for a 200 and the pid of the
worker that served it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from client import fetch, start_sleeper
from clusters import Load, group, ports, render
from conftest import alive, children, wait_exit, wait_for


def describe(failures) -> str:
    return "\n".join(f"{o.detail} (pid {o.pid})" for o in failures[:20])


# ---------------------------------------------------------------- killed worker


def test_killed_worker_under_load_is_replaced(clusters):
    chosen = ports("web")
    server = clusters.start(render(groups={"web": group(chosen["web"], 2)}), workers=2,
                            ports=chosen)
    before = server.wait_group("web", 2)
    victim = before[0]
    with Load(chosen["web"], fresh=3, limit=20) as load:
        wait_for(lambda: load.count_since(0) >= 30, what="the load to run")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        after = server.wait_group("web", 2, exclude={victim})
        (replacement,) = set(after) - set(before)
        settled = time.monotonic()
        wait_for(lambda: replacement in load.pids_since(settled) and
                 load.count_since(settled) >= 60, what="the replacement to serve the load")
    # Only requests in the victim's hands when it died may fail: each client
    # has one request at a time, and the worker accepts connections in
    # batches, so that is at most one per client, all sent before the kill.
    failures = load.failures()
    assert len(failures) <= load.fresh, describe(failures)
    assert all(o.started < killed for o in failures), describe(failures)
    assert load.pids_since(settled) <= set(after)
    assert re.search(rf"Worker \d \(pid {victim}\) of group web was killed by signal SIGKILL",
                     server.log), server.log
    assert server.group_status("web")["restarts"] == 1


# ---------------------------------------------------------------- reload


def test_sighup_under_load_replaces_every_worker_without_a_failed_request(clusters, tmp_path):
    chosen = ports("web")
    server = clusters.start(render(groups={"web": group(chosen["web"], 2)}), workers=2,
                            ports=chosen)
    old = server.wait_group("web", 2)
    started = time.monotonic()
    with Load(chosen["web"], fresh=3, keep_alive=2, limit=20) as load:
        wait_for(lambda: load.count_since(0) >= 50, what="the load to run")
        assert load.pids_since(0) <= set(old)
        # The edited file is read again by the reload: 2 -> 3 workers.
        server.config.write_text(render(groups={"web": group(chosen["web"], 3)}))
        server.proc.send_signal(signal.SIGHUP)
        new = server.wait_group("web", 3, exclude=set(old))
        wait_for(lambda: not any(map(alive, old)), what="the old workers to exit")
        reloaded = time.monotonic()
        wait_for(lambda: load.count_since(reloaded) >= 100
                 and time.monotonic() - started >= 5, what="the load to run on")
    failures = load.failures()
    assert not failures, describe(failures)
    assert load.pids_since(reloaded) <= set(new)
    assert len(load.pids_since(reloaded)) >= 2
    assert "Reload: rolling group web onto new workers" in server.log
    wait_for(lambda: children(server.pid) == new, what="the old workers to be reaped")


# ---------------------------------------------------------------- timeout


@pytest.mark.parametrize("route", ["/sleep", "/csleep", "/select"],
                         ids=["time.sleep", "C-sleep", "C-select"])
def test_timeout_aborts_and_replaces_a_stuck_worker(clusters, route):
    chosen = ports("web", "slow")
    text = render(groups={"web": group(chosen["web"]),
                          "slow": group(chosen["slow"], timeout=1)})
    server = clusters.start(text, workers=2, ports=chosen)
    (stuck,) = server.wait_group("slow", 1)
    (web,) = server.wait_group("web", 1)
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        future = start_sleeper(pool, server, 30, port=chosen["slow"], route=route)
        try:
            result = future.result(timeout=20)
        except (ConnectionError, http.client.HTTPException):
            result = None
    took = time.monotonic() - started
    assert result is None or result.status >= 500, result
    assert took < 8, f"the stuck request was ended after {took:.1f}s with timeout = 1"
    (fresh,) = server.wait_group("slow", 1, exclude={stuck})
    log = server.log
    assert re.search(rf"Worker 0 \(pid {stuck}\) of group slow has run one request for "
                     r"[\d.]+ s \(timeout 1 s\): aborting it \(SIGABRT", log), log
    assert "Fatal Python error: Aborted" in log, log
    dump = log[log.index("Fatal Python error: Aborted"):]
    assert "Current thread" in dump, log
    assert "apps_groups.py" in dump, log
    assert re.search(rf"pid {stuck}\) of group slow was killed by signal SIGABRT", log) or \
        re.search(rf"pid {stuck}\) of group slow was killed by signal SIGKILL", log), log
    assert fetch(chosen["slow"], "/pid").pid == fresh
    # The other group was never touched.
    assert server.group_pids("web") == [web]


# ---------------------------------------------------------------- max_requests


def test_max_requests_recycles_workers_under_load_without_failures(clusters):
    chosen = ports("web")
    text = render(groups={"web": group(chosen["web"], 2, max_requests=20,
                                       max_requests_jitter=5)})
    server = clusters.start(text, workers=2, ports=chosen)
    first = server.wait_group("web", 2)
    with Load(chosen["web"], fresh=3, limit=20) as load:
        wait_for(lambda: len(re.findall(r"retiring after \d+ requests", server.log)) >= 4
                 and len(load.pids_since(0)) >= 5, timeout=15,
                 what=f"workers to be recycled:\n{server.log}")
    failures = load.failures()
    assert not failures, describe(failures)
    served = re.findall(r"\[(\d+)\] \[INFO\] worker (\d+) retiring after (\d+) requests",
                        server.log)
    assert served, server.log
    for logged_by, pid, count in served:
        assert logged_by == pid
        assert int(count) >= 20
    assert set(first) & {int(pid) for _, pid, _ in served}
    # The replacements are new workers of the same group, and they serve.
    now = server.wait_group("web", 2)
    assert fetch(chosen["web"], "/pid").pid in now
    assert server.group_status("web")["state"] == "running"
    assert "crash-looping" not in server.log


# ---------------------------------------------------------------- crash loops


def crash_loop_config(chosen: dict[str, int], **task: object) -> str:
    return render(groups={
        "web": group(chosen["web"]),
        "task": group(chosen["task"], app="apps_groups_crash:app", crash_limit=3, **task),
    })


def start_crash_loop(server, tmp_path) -> int:
    """Make every new task worker die 0.2 s after boot, then kill the current one."""
    (task,) = server.wait_group("task", 1)
    (tmp_path / "crash-after-boot").write_text("")
    os.kill(task, signal.SIGKILL)
    return task


def test_crash_loop_stops_the_group_and_the_others_keep_serving(clusters, tmp_path):
    chosen = ports("web", "task")
    server = clusters.start(crash_loop_config(chosen), workers=2, ports=chosen)
    (web,) = server.wait_group("web", 1)
    start_crash_loop(server, tmp_path)
    wait_for(lambda: "Group task is crash-looping" in server.log,
             what=f"the crash loop to be reported:\n{server.log}")
    line = next(x for x in server.log.splitlines() if "crash-looping" in x)
    assert "[ERROR]" in line and "stop-group" in line, line
    wait_for(lambda: not server.group_status("task")["workers"], what="the task group to stop")
    task = server.group_status("task")
    assert task["state"] == "crash-loop"
    assert len(server.booted("task")) >= 3
    assert server.proc.poll() is None
    wait_for(lambda: children(server.pid) == [web], what="only the web worker to be left")
    for _ in range(5):
        reply = fetch(chosen["web"], "/pid")
        assert reply.status == 200 and reply.pid == web
    # Stopped means stopped: no new task worker appears.
    booted = len(server.booted("task"))
    assert fetch(chosen["web"], "/pid").status == 200
    assert len(server.booted("task")) == booted
    assert server.stop() == 0


def test_crash_loop_with_stop_server_stops_the_server(clusters, tmp_path):
    chosen = ports("web", "task")
    server = clusters.start(crash_loop_config(chosen, on_crash_loop="stop-server"),
                            workers=2, ports=chosen)
    (web,) = server.wait_group("web", 1)
    start_crash_loop(server, tmp_path)
    code, _ = wait_exit(server, 20)
    assert code != 0, server.log
    assert "Group task is crash-looping" in server.log
    assert not alive(web)
    assert not children(server.pid)


def test_crash_loop_from_the_first_boot_while_another_group_still_boots(clusters, tmp_path):
    """The task workers boot (say READY) and die 0.2 s later, from the very
    first one, while the web group is still importing its app: that is a
    crash loop of the task group, not a boot failure of the server."""
    (tmp_path / "crash-after-boot").write_text("")
    chosen = ports("web", "task")
    text = render(groups={
        "web": group(chosen["web"], app="apps_groups_slowboot:app"),
        "task": group(chosen["task"], app="apps_groups_crash:app", crash_limit=3),
    })
    server = clusters.start(text, workers=1, ports=chosen, wait=False)
    wait_for(lambda: "crash-looping" in server.log or server.proc.poll() is not None,
             what=f"the crash loop to be reported:\n{server.log}")
    assert server.proc.poll() is None, f"the server stopped:\n{server.log}"
    assert "Group task is crash-looping" in server.log, server.log
    (web,) = server.wait_group("web", 1)
    assert fetch(chosen["web"], "/pid").pid == web
    assert server.group_status("task")["state"] == "crash-loop"


def test_repeated_timeouts_are_not_a_crash_loop(clusters):
    """Workers the master aborts for a slow request served their requests
    until then: replacing them again and again must not stop the group."""
    chosen = ports("slow")
    text = render(groups={"slow": group(chosen["slow"], timeout=0.5, crash_limit=2)})
    server = clusters.start(text, workers=1, ports=chosen)
    aborted: set[int] = set()
    for _ in range(3):
        (worker,) = server.wait_group("slow", 1, exclude=aborted, timeout=10)
        assert fetch(chosen["slow"], "/pid").pid == worker
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            fetch(chosen["slow"], "/sleep?s=30&tag=stuck", timeout=15)
        aborted.add(worker)
    (worker,) = server.wait_group("slow", 1, exclude=aborted, timeout=10)
    assert fetch(chosen["slow"], "/pid").pid == worker
    assert "crash-looping" not in server.log, server.log
    assert server.group_status("slow")["restarts"] == 3


# ---------------------------------------------------------------- stopped while booting


def held(server) -> list[int]:
    """Pids of the workers waiting in apps_groups_heldboot's import."""
    return [int(pid) for pid in re.findall(r"^boot held (\d+)$", server.log, re.M)]


def start_held(clusters, tmp_path, workers: int, hold: bool):
    """A server of apps_groups_heldboot (crash_limit 1: one worker dying
    early is a crash loop); with ``hold``, its first workers wait in their boot."""
    gate = tmp_path / "hold-boot"
    if hold:
        gate.write_text("")
    chosen = ports("web")
    text = render(groups={"web": group(chosen["web"], workers, app="apps_groups_heldboot:app",
                                       crash_limit=1)})
    server = clusters.start(text, workers=workers, ports=chosen, wait=not hold,
                            env={"TEST_BOOT_HOLD": str(gate)})
    return server, gate, chosen["web"]


def assert_ordinary_stop(server, pid: int, booted: bool = True) -> None:
    """The worker ``pid`` stopped without serving, and the master says so plainly.
    ``booted``: it finished its boot first (and says why it stops), rather than
    leaving in the middle of it (QUIT)."""
    log = server.log
    assert re.search(rf"^.*\[INFO\] Worker \d \(pid {pid}\) of group web exited$", log,
                     re.M), log
    said = re.search(rf"\[{pid}\] \[INFO\] Worker \d \(pid {pid}\) of group web stops: "
                     r"SIG(TERM|USR2) arrived while it booted", log)
    assert bool(said) == booted, log
    assert f"Booting worker 1 with pid: {pid}" not in log, log
    assert "killed by signal" not in log, log
    assert "crash" not in log and "died while booting" not in log, log
    assert "Traceback" not in log, log


def test_scale_down_of_a_booting_worker_is_an_ordinary_stop(clusters, tmp_path):
    server, gate, port = start_held(clusters, tmp_path, workers=1, hold=False)
    (first,) = server.wait_group("web", 1)
    gate.write_text("")
    assert server.fastpool("scale", "web", "+1").returncode == 0
    (booting,) = wait_for(lambda: held(server), what=f"a worker held in its boot:\n{server.log}")
    assert {w["pid"]: w["state"] for w in server.group_status("web")["workers"]} == {
        first: "serving", booting: "booting"}
    result = server.fastpool("scale", "web", "-1")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "Scaling group web to 1 worker(s)" in server.log, what="the scale-down")
    gate.unlink()     # its import ends; it must now stop instead of serving
    wait_for(lambda: not alive(booting), what=f"the booting worker to stop:\n{server.log}")
    wait_for(lambda: children(server.pid) == [first], what="the first worker alone")
    assert_ordinary_stop(server, booting)
    status = server.group_status("web")
    assert status["state"] == "running" and status["restarts"] == 0, status
    assert [w["pid"] for w in status["workers"]] == [first]
    assert {fetch(port, "/pid").pid for _ in range(5)} == {first}


def test_ttou_while_the_server_boots_does_not_stop_it(clusters, tmp_path):
    server, gate, port = start_held(clusters, tmp_path, workers=2, hold=True)
    pids = wait_for(lambda: len(held(server)) == 2 and held(server),
                    what=f"two workers held in their boot:\n{server.log}")
    server.proc.send_signal(signal.SIGTTOU)
    wait_for(lambda: "Handling signal: SIGTTOU (web: 1 worker(s))" in server.log,
             what="the TTOU")
    gate.unlink()
    (serving,) = server.wait_group("web", 1)
    (stopped,) = set(pids) - {serving}
    wait_for(lambda: not alive(stopped), what=f"the retired worker to stop:\n{server.log}")
    assert server.proc.poll() is None, server.log
    assert_ordinary_stop(server, stopped)
    assert server.group_status("web")["restarts"] == 0
    assert fetch(port, "/pid").pid == serving
    assert server.stop() == 0, server.log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT], ids=["TERM", "QUIT"])
def test_stopping_a_server_whose_workers_boot_is_a_clean_stop(clusters, tmp_path, sig):
    server, gate, _ = start_held(clusters, tmp_path, workers=2, hold=True)
    pids = wait_for(lambda: len(held(server)) == 2 and held(server),
                    what=f"two workers held in their boot:\n{server.log}")
    server.proc.send_signal(sig)
    wait_for(lambda: "Handling signal: " + signal.Signals(sig).name in server.log,
             what="the stop")
    if sig == signal.SIGTERM:
        gate.unlink()    # graceful: they stop once booted; QUIT ends them in their boot
    assert wait_exit(server, 15)[0] == 0, server.log
    assert not any(map(alive, pids))
    for pid in pids:
        assert_ordinary_stop(server, pid, booted=sig == signal.SIGTERM)


# ---------------------------------------------------------------- custom processes


def test_custom_process_is_respawned_with_backoff_and_stopped_by_term(clusters):
    chosen = ports("web")
    text = render(groups={"web": group(chosen["web"])},
                  processes={"job": {"target": "apps_groups:brief_job"},
                             "mailer": {"target": "apps_groups:consume"}})
    server = clusters.start(text, workers=1, ports=chosen)

    def starts() -> list[int]:
        return [int(p) for p in re.findall(r"Starting process job 0 with pid: (\d+)",
                                           server.log)]

    wait_for(lambda: len(starts()) >= 2, what=f"a respawn of the job:\n{server.log}")
    second = time.monotonic()
    wait_for(lambda: len(starts()) >= 3, what=f"a second respawn:\n{server.log}")
    gap = time.monotonic() - second
    pids = starts()[:3]
    assert len(set(pids)) == 3, pids
    log = server.log
    assert "Process job 0 will be restarted in 0.5 s" in log, log
    assert "Process job 0 will be restarted in 1.0 s" in log, log
    assert gap >= 0.9, f"the second respawn came {gap:.2f}s after the first (backoff 1 s)"
    for pid in pids[:2]:
        assert f"job stdout {pid}" in log and f"job stderr {pid}" in log, log
    (mailer,) = server.status()["processes"][1]["pids"]
    wait_for(lambda: f"mailer stdout {mailer}" in server.log and
             f"mailer stderr {mailer}" in server.log, what="the mailer's output")
    everyone = children(server.pid)
    assert mailer in everyone
    assert server.stop(signal.SIGTERM) == 0, server.log
    wait_for(lambda: not any(map(alive, everyone + starts())), timeout=5,
             what="every child to exit")


def test_a_config_of_processes_only_is_supervised(clusters):
    """No [group.*] at all: the master supervises the processes; status, reload,
    the control socket and TERM work without a single worker group."""
    text = render(processes={"mailer": {"target": "apps_groups:consume", "count": 2}})
    server = clusters.start(text, workers=0, ports={})
    # The control socket listens before the first child starts.
    wait_for(lambda: "Starting process mailer" in server.log, what=f"a mailer:\n{server.log}")
    plan = server.fastpool("check")
    assert plan.returncode == 0, plan.stderr
    assert "process mailer: target apps_groups:consume x 2" in plan.stdout

    def mailers() -> list[int]:
        return server.status()["processes"][0]["pids"]

    first = wait_for(lambda: len(mailers()) == 2 and mailers(), what=f"2 mailers:\n{server.log}")
    assert children(server.pid) == first
    result = server.fastpool("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["master"] == server.pid and status["groups"] == []
    result = server.fastpool("status")
    assert result.returncode == 0, result.stderr
    assert "process mailer (running): apps_groups:consume, 2/2 running" in result.stdout
    # A process that dies is respawned.
    os.kill(first[0], signal.SIGKILL)
    again = wait_for(lambda: len(mailers()) == 2 and first[0] not in mailers() and mailers(),
                     what=f"the mailer to be respawned:\n{server.log}")
    assert first[1] in again
    # A reload re-reads the file: three new mailers replace the two.
    server.config.write_text(render(processes={"mailer": {"target": "apps_groups:consume",
                                                          "count": 3}}))
    result = server.fastpool("reload")
    assert result.returncode == 0, result.stderr
    third = wait_for(lambda: len(mailers()) == 3 and not set(again) & set(mailers())
                     and mailers(), what=f"3 new mailers:\n{server.log}")
    wait_for(lambda: children(server.pid) == third, what="the old mailers to be reaped")
    result = server.fastpool("scale", "web", "+1")
    assert result.returncode == 1 and "no group or process named 'web'" in result.stderr
    server.proc.send_signal(signal.SIGTTIN)
    wait_for(lambda: "SIGTTIN (no worker groups" in server.log, what="the TTIN")
    assert server.stop(signal.SIGTERM) == 0, server.log
    assert not any(map(alive, first + again + third))
    assert "Booting worker" not in server.log and "ERROR" not in server.log, server.log


# ---------------------------------------------------------------- graceful stop


def test_term_lets_an_in_flight_request_finish_in_a_multi_group_server(clusters):
    chosen = ports("web", "task")
    text = render(groups={"web": group(chosen["web"], 2), "task": group(chosen["task"], 2)},
                  processes={"mailer": {"target": "apps_groups:consume"}})
    server = clusters.start(text, workers=4, ports=chosen)
    server.wait_group("web", 2)
    server.wait_group("task", 2)
    everyone = wait_for(lambda: len(children(server.pid)) == 5 and children(server.pid),
                        what="4 workers and a process")
    with ThreadPoolExecutor(1) as pool:
        future = start_sleeper(pool, server, 1, port=chosen["task"])
        server.proc.send_signal(signal.SIGTERM)
        code, _, body = future.result(timeout=15)
    assert code == 200 and body.startswith(b"slept "), body
    assert wait_exit(server, 15)[0] == 0, server.log
    wait_for(lambda: not any(map(alive, everyone)), timeout=5, what="every child to exit")
    assert "Shutting down: master" in server.log

"""Supervised processes that run any program: ``[process.NAME] command``.

Every server is the real ``python -m fastpool serve --config FILE`` (started by
clusters.Clusters, most of them with processes only, which start at once);
the programs are ``sh -c`` scripts and ``python -c`` one-liners, so that what
they see (arguments, environment, directory, signals) comes back as lines of
the master's log, which the tests read.  Process groups are read from /proc.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from clusters import fastpool, group, ports, render
from conftest import alive, cmdline, wait_exit, wait_for

from fastpool.control import ControlError

# A program that waits for its stop (bounded even if nobody stops it).
SLEEPER = ["sleep", "600"]


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(int(entry.name))
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def process_status(server, name: str) -> dict:
    for entry in server.status()["processes"]:
        if entry["name"] == name:
            return entry
    raise AssertionError(f"no process {name} in the status")


def wait_pids(server, name: str, count: int, exclude: set[int] = frozenset()) -> list[int]:
    """Wait until set ``name`` runs exactly ``count`` copies, none in ``exclude``."""
    def settled() -> list[int] | None:
        try:
            pids = process_status(server, name)["pids"]
        except ControlError:
            return None     # the server is still starting
        if len(pids) == count and not set(pids) & set(exclude) and all(map(alive, pids)):
            return pids
        return None
    return wait_for(settled, what=f"{count} new cop(ies) of {name}:\n{server.log}")


def wait_line(server, pattern: str) -> re.Match[str]:
    return wait_for(lambda: re.search(pattern, server.log),
                    what=f"a log line {pattern!r}:\n{server.log}")


# ---------------------------------------------------------------- what a copy gets


def test_command_gets_its_arguments_environment_directory_and_own_process_group(
        clusters, tmp_path):
    (tmp_path / "work").mkdir()
    script = ('echo "args=$1 $2"; '
              'echo "env=$GREETING name=$FASTPOOL_PROCESS_NAME index=$FASTPOOL_PROCESS_INDEX '
              'cwd=$(pwd)"; exec sleep 600')
    text = render(processes={
        "echo": {"command": ["sh", "-c", script, "sh", "${FP_TEST_WORD}", "$${NOT_EXPANDED}"],
                 "count": 2, "env": {"GREETING": "hi there"}, "cwd": "work", "nice": 3,
                 "cpus": [0]},
        "announce": {"target": "apps_groups:announce", "env": {"GREETING": "hello"},
                     "cwd": "work"},
    })
    server = clusters.start(text, workers=0, ports={}, env={"FP_TEST_WORD": "expanded"})
    pids = wait_pids(server, "echo", 2)
    for index in (0, 1):
        wait_line(server, rf"\[echo {index}\] env=hi there name=echo index={index} "
                          rf"cwd={re.escape(str(tmp_path / 'work'))}\n")
        wait_line(server, rf"\[echo {index}\] args=expanded \$\{{NOT_EXPANDED\}}\n")
    wait_line(server, rf"target announce 0 hello {re.escape(str(tmp_path / 'work'))}\n")
    for pid in pids:
        fields = stat_fields(pid)
        assert int(fields[2]) == pid, "a command leads a process group of its own"
        assert int(fields[16]) == 3, "nice"
        assert os.sched_getaffinity(pid) == {0}
    # The command as it runs, ${VAR} expanded, in the plan and the status.
    plan = fastpool("check", "--config", str(server.config), cwd=tmp_path,
                    env={"FP_TEST_WORD": "expanded"})
    assert "process echo: command sh -c" in plan.stdout and "expanded" in plan.stdout, plan
    status = server.fastpool("status")
    assert re.search(r"process echo \(running\): sh -c .* 2/2 running \(pids "
                     rf"{pids[0]}, {pids[1]}\), 0 restart\(s\), last exit: -", status.stdout), \
        status.stdout
    assert server.stop() == 0, server.log


CONFIG_ERRORS = {
    "missing-executable": ({"command": ["fastpool-no-such-program", "--flag"]},
                           "command: 'fastpool-no-such-program': no such executable on PATH"),
    "missing-path": ({"command": ["./bin/nothing-here"]}, "'./bin/nothing-here': no such "
                                                           "executable"),
    "target-and-command": ({"command": SLEEPER, "target": "apps_groups:consume"},
                           "give target or command, not both"),
    "unset-variable": ({"command": ["echo", "${FP_TEST_UNSET}"]},
                       "command: ${FP_TEST_UNSET} is not set in the environment"),
    "empty-command": ({"command": []}, "command: expected a list of strings"),
    "bad-stop-signal": ({"command": SLEEPER, "stop_signal": "TERMINATE"},
                        "stop_signal: expected a signal name"),
    "bad-env": ({"command": SLEEPER, "env": {"A-B": "1"}}, "env: expected environment"),
    "missing-cwd": ({"command": SLEEPER, "cwd": "nowhere"}, "cwd: nowhere: no such directory"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_a_bad_process_table_stops_the_start_with_one_line(tmp_path, case):
    table, message = CONFIG_ERRORS[case]
    config = tmp_path / "fastpool.toml"
    config.write_text(render(processes={"job": table}))
    result = fastpool("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("Error: fastpool.toml: [process.job]"), result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / ".fastpool.sock").exists()


# ---------------------------------------------------------------- output


OUTPUT_PROGRAM = r"""
import os, sys, time
out, err = sys.stdout, sys.stderr
out.write("half a line, "); out.flush()
time.sleep(0.3)
err.write("a whole line on stderr\n"); err.flush()
time.sleep(0.3)
out.write("then the rest\nsecond line\n"); out.flush()
out.write("x" * 70000); out.flush()
time.sleep(0.3)
out.write("\n" + f"pending since {time.time()}"); out.flush()
time.sleep(600)
"""


def test_output_is_logged_as_whole_prefixed_lines_and_a_partial_line_after_a_second(clusters):
    text = render(processes={"talker": {"command": [sys.executable, "-c", OUTPUT_PROGRAM]}})
    server = clusters.start(text, workers=0, ports={})
    match = wait_line(server, r"\[talker 0\] pending since ([\d.]+)\n")
    seen = time.time()
    waited = seen - float(match.group(1))
    assert 0.9 <= waited < 5, f"the partial line was logged after {waited:.2f}s"
    lines = [line.split("[talker 0] ", 1)[1] for line in server.log.splitlines()
             if "[talker 0] " in line]
    # (A master slowed down by a busy machine may read both pipes in one turn:
    # the stderr line is then logged first or second, but whole.)
    assert sorted(lines[:3]) == ["a whole line on stderr", "half a line, then the rest",
                                 "second line"], lines[:3]
    assert lines.index("half a line, then the rest") + 1 == lines.index("second line")
    # 64 KiB without a newline are logged at once; the rest ends with its newline.
    assert lines[3:5] == ["x" * 65536, "x" * (70000 - 65536)], [len(x) for x in lines]
    # Every line is one event of the master's log.
    for line in server.log.splitlines():
        if "[talker 0]" in line:
            assert re.match(rf"\[[^]]+\] \[{server.pid}\] \[INFO\] \[talker 0\] ", line), line
    assert server.stop() == 0, server.log


# ---------------------------------------------------------------- deaths


def test_a_killed_process_is_respawned_and_counted(clusters):
    text = render(processes={"sleeper": {"command": SLEEPER}})
    server = clusters.start(text, workers=0, ports={})
    (first,) = wait_pids(server, "sleeper", 1)
    os.kill(first, signal.SIGKILL)
    (second,) = wait_pids(server, "sleeper", 1, exclude={first})
    status = process_status(server, "sleeper")
    assert status["restarts"] == 1 and status["state"] == "running"
    assert status["last_exit"] == "killed by signal SIGKILL"
    assert status["copies"][0]["pid"] == second and status["copies"][0]["uptime_s"] < 10
    assert f"Process sleeper 0 (pid {first}) was killed by signal SIGKILL" in server.log
    assert server.stop() == 0, server.log


@pytest.mark.parametrize("on_crash_loop", ["stop-group", "stop-server"])
def test_a_crash_loop_stops_the_process_set(clusters, on_crash_loop):
    text = render(processes={
        "broken": {"command": ["sh", "-c", "echo failing; exit 3"], "crash_limit": 3,
                   "on_crash_loop": on_crash_loop},
        "sleeper": {"command": SLEEPER},
    })
    server = clusters.start(text, workers=0, ports={})
    (sleeper,) = wait_pids(server, "sleeper", 1)
    if on_crash_loop == "stop-server":
        code, _ = wait_exit(server)
        assert code == 1, server.log
        assert not alive(sleeper) and not group_members(sleeper)
    else:
        wait_line(server, r"\[ERROR\] Process set broken is crash-looping: 3 copies died "
                          r"within 30 s of boot in a row; stopping it \(on_crash_loop = "
                          r"stop-group\)")
        status = process_status(server, "broken")
        assert status["state"] == "crash-loop" and status["pids"] == []
        assert status["last_exit"] == "exit code 3" and status["restarts"] == 3
        assert process_status(server, "sleeper")["pids"] == [sleeper]
        assert server.log.count("[broken 0] failing") == 3
        # A restart starts it afresh.
        assert server.fastpool("restart", "broken").returncode == 0
        wait_for(lambda: server.log.count("[broken 0] failing") == 4, what="a new start")
        assert server.stop() == 0, server.log


# ---------------------------------------------------------------- stopping


POLITE = "trap 'echo got USR1; exit 0' USR1; sleep 600 & wait"
STUBBORN = "trap '' TERM; sleep 600 & sleep 600"
# The program leaves on TERM, a child of it stays: the copy is its whole group.
LEAVER = "sh -c \"trap '' TERM; exec sleep 600\" & trap 'exit 0' TERM; wait"


def test_term_sends_the_stop_signal_then_kill_to_the_whole_process_group(clusters):
    text = render(processes={
        "polite": {"command": ["sh", "-c", POLITE], "stop_signal": "USR1"},
        "stubborn": {"command": ["sh", "-c", STUBBORN], "graceful_timeout": 1},
        "leaver": {"command": ["sh", "-c", LEAVER], "graceful_timeout": 1},
    })
    server = clusters.start(text, workers=0, ports={})
    leaders = {name: wait_pids(server, name, 1)[0] for name in ("polite", "stubborn", "leaver")}
    # Each child has ignored TERM once it runs sleep (the shells set that first).
    wait_for(lambda: [cmdline(p) for p in group_members(leaders["stubborn"])].count(
        "sleep 600 ") == 2 and "sleep 600 " in map(cmdline, group_members(leaders["leaver"])),
        what="every program's children")
    started = time.monotonic()
    code = server.stop(signal.SIGTERM)
    took = time.monotonic() - started
    assert code == 0, server.log
    assert 0.9 <= took < 6, f"the stop took {took:.1f}s with graceful_timeout = 1"
    for name, pgid in leaders.items():
        assert not group_members(pgid), f"{name}: {group_members(pgid)} left"
    log = server.log
    assert "[polite 0] got USR1" in log, log
    for name in ("stubborn", "leaver"):
        assert f"Process {name} 0 (pid {leaders[name]}) did not stop within its " \
               "graceful_timeout: killing it and its process group" in log, log
    assert f"Process polite 0 (pid {leaders['polite']}) did not stop" not in log, log


def test_quit_kills_every_command_process_group_at_once(clusters):
    text = render(processes={"stubborn": {"command": ["sh", "-c", STUBBORN]}})
    server = clusters.start(text, workers=0, ports={})
    (leader,) = wait_pids(server, "stubborn", 1)
    wait_for(lambda: len(group_members(leader)) == 3, what="the program's children")
    started = time.monotonic()
    server.stop(signal.SIGQUIT)
    assert time.monotonic() - started < 5, server.log
    assert not group_members(leader), group_members(leader)


def test_a_copy_is_its_whole_process_group(clusters):
    """The program dies and leaves a child behind: the child gets the stop
    signal, then KILL, and only then does the slot start again."""
    text = render(processes={"leaver": {"command": ["sh", "-c", LEAVER],
                                        "graceful_timeout": 1}})
    server = clusters.start(text, workers=0, ports={})
    (leader,) = wait_pids(server, "leaver", 1)
    (orphan,) = wait_for(lambda: [p for p in group_members(leader)
                                  if cmdline(p) == "sleep 600 "], what="the program's child")
    os.kill(leader, signal.SIGKILL)
    (second,) = wait_pids(server, "leaver", 1, exclude={leader})
    assert not alive(orphan), "the new copy started while the old one's child ran"
    assert not group_members(leader)
    assert f"Process leaver 0 (pid {leader}) did not stop within its graceful_timeout" \
        in server.log, server.log
    assert server.stop() == 0, server.log


# ---------------------------------------------------------------- restart, reload, scale


def test_restart_replaces_one_process_set_only(clusters):
    chosen = ports("web")
    text = render(groups={"web": group(chosen["web"])},
                  processes={"a": {"command": SLEEPER, "count": 2},
                             "b": {"command": SLEEPER}})
    server = clusters.start(text, workers=1, ports=chosen)
    (web,) = server.wait_group("web", 1)
    a = wait_pids(server, "a", 2)
    b = wait_pids(server, "b", 1)
    result = server.fastpool("restart", "a")
    assert result.returncode == 0 and result.stdout == "restarting process a\n", result
    wait_pids(server, "a", 2, exclude=set(a))
    assert not any(map(alive, a))
    assert process_status(server, "b")["pids"] == b
    assert server.group_pids("web") == [web]
    assert process_status(server, "a")["restarts"] == 0, "a restart is not a death"
    result = server.fastpool("restart", "web")
    assert result.returncode == 1, result
    assert result.stderr == ("Error: no process named 'web' (web is a group: fastpool reload "
                             "--group web)\n")
    assert server.stop() == 0, server.log


def test_reload_restarts_only_the_process_sets_whose_table_changed(clusters):
    tables = {"a": {"command": SLEEPER}, "b": {"command": SLEEPER, "env": {"V": "1"}},
              "c": {"command": SLEEPER}}
    server = clusters.start(render(processes=tables), workers=0, ports={})
    before = {name: wait_pids(server, name, 1) for name in tables}
    tables["b"]["env"] = {"V": "2"}
    del tables["c"]
    tables["d"] = {"command": SLEEPER}
    server.config.write_text(render(processes=tables))
    assert server.fastpool("reload").returncode == 0
    wait_pids(server, "b", 1, exclude=set(before["b"]))
    wait_pids(server, "d", 1)
    wait_for(lambda: [p["name"] for p in server.status()["processes"]] == ["a", "b", "d"],
             what="process c to stop")
    assert process_status(server, "a")["pids"] == before["a"]
    assert not alive(before["c"][0])
    assert "Reload: restarting process b (its table changed)" in server.log
    assert server.stop() == 0, server.log


def test_scale_adds_and_removes_copies_of_a_process_set(clusters):
    server = clusters.start(render(processes={"a": {"command": SLEEPER}}), workers=0,
                            ports={})
    (first,) = wait_pids(server, "a", 1)
    result = server.fastpool("scale", "a", "+1")
    assert result.returncode == 0 and result.stdout == "process a: 2 cop(ies)\n", result
    pids = wait_pids(server, "a", 2)
    assert first in pids
    assert [c["index"] for c in process_status(server, "a")["copies"]] == [0, 1]
    assert server.fastpool("scale", "a", "-1").returncode == 0
    assert wait_pids(server, "a", 1) == [first]
    assert server.stop() == 0, server.log

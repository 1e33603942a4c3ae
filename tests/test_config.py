"""The config file: fastpool.toml and [tool.fastpool] in pyproject.toml,
[server] defaults vs per-group settings vs flags, and the errors a bad file
gets before any process starts.

Servers are the real ``python -m fastpool serve`` (clusters.py); the
app is apps_groups.py.
"""

from __future__ import annotations

import json
import pickle
import socket
import time

import pytest
from client import fetch
from clusters import fastpool, group, ports, render

from fastpool import settings

# ---------------------------------------------------------------- bad configs

PORT = 18391   # never bound: every case fails before anything listens

GOOD_WEB = f'[group.web]\napp = "apps_groups:app"\nlisten = ["127.0.0.1:{PORT}"]\n'

# name: (file text, extra args, parts the one error line must contain)
BAD_CONFIGS = {
    "unknown-key-in-server": (
        "[server]\nworkerz = 2\n" + GOOD_WEB, (),
        ["fastpool.toml: [server]", "unknown key 'workerz'", "known keys:", "workers"]),
    "unknown-key-in-group": (
        GOOD_WEB + "wrokers = 2\n", (),
        ["fastpool.toml: [group.web]", "unknown key 'wrokers'", "known keys:"]),
    "unknown-key-in-process": (
        GOOD_WEB + '[process.mailer]\ntarget = "apps_groups:consume"\ncuont = 2\n', (),
        ["fastpool.toml: [process.mailer]", "unknown key 'cuont'", "known keys:", "count"]),
    "unknown-top-level-key": (
        "timeout = 3\n" + GOOD_WEB, (),
        # A top-level key is a key, not a table: say so.
        ["fastpool.toml", "unknown key 'timeout'", "[server]"]),
    "unknown-top-level-table": (
        GOOD_WEB + '[groups.task]\napp = "apps_groups:app"\n', (),
        ["fastpool.toml", "[groups]", "expected [server], [group.NAME] or [process.NAME]"]),
    "workers-not-an-integer": (
        GOOD_WEB + 'workers = "four"\n', (),
        ["fastpool.toml: [group.web] workers", "expected an integer", "'four'"]),
    "listen-not-a-list": (
        '[group.web]\napp = "apps_groups:app"\nlisten = 8000\n', (),
        ["fastpool.toml: [group.web] listen", "expected a list of strings", "8000"]),
    "timeout-not-a-number": (
        GOOD_WEB + 'timeout = "x"\n', (),
        ["fastpool.toml: [group.web] timeout", "expected a number", "'x'"]),
    "server-timeout-not-a-number": (
        '[server]\ntimeout = "x"\n' + GOOD_WEB, (),
        ["fastpool.toml: [server] timeout", "expected a number", "'x'"]),
    "two-groups-one-address": (
        GOOD_WEB + f'[group.task]\napp = "apps_groups:app"\nlisten = ["127.0.0.1:{PORT}"]\n',
        (), ["fastpool.toml: [group.task] listen", f"'127.0.0.1:{PORT}'", "group 'web'",
             "two groups cannot listen on one address"]),
    "two-groups-wildcard-overlap": (
        GOOD_WEB + f'[group.task]\napp = "apps_groups:app"\nlisten = ["0.0.0.0:{PORT}"]\n',
        (), ["fastpool.toml: [group.task] listen", f"'0.0.0.0:{PORT}'", "group 'web'"]),
    "unparsable-listen": (
        '[group.web]\napp = "apps_groups:app"\nlisten = ["127.0.0.1:http"]\n', (),
        ["fastpool.toml: [group.web] listen", "'127.0.0.1:http'", "port"]),
    "two-groups-without-listen": (
        '[group.web]\napp = "apps_groups:app"\n[group.task]\napp = "apps_groups:app"\n', (),
        ["fastpool.toml: [group.web] and [group.task] set no listen, so both get the default "
         "'127.0.0.1:8000'", "two groups cannot listen on one address",
         "set listen in each group"]),
    "default-listen-on-another-groups-address": (
        f"[server]\nport = {PORT}\n" + GOOD_WEB + '[group.task]\napp = "apps_groups:app"\n',
        (), [f"fastpool.toml: [group.web] listens on '127.0.0.1:{PORT}' and [group.task] sets "
             f"no listen, so it gets the default '127.0.0.1:{PORT}'",
             "two groups cannot listen on one address", "set listen in [group.task]"]),
    "two-groups-with-the-server-listen": (
        f'[server]\nlisten = ["127.0.0.1:{PORT}"]\n[group.web]\napp = "apps_groups:app"\n'
        '[group.task]\napp = "apps_groups:app"\n', (),
        ["fastpool.toml: [group.web] and [group.task] set no listen, so both get [server] "
         f"listen '127.0.0.1:{PORT}'", "two groups cannot listen on one address"]),
    "nothing-to-run": (
        "[server]\nworkers = 2\n", (),
        ["fastpool.toml: no [group.NAME] or [process.NAME] table: nothing to run"]),
    "process-without-target": (
        GOOD_WEB + "[process.mailer]\ncount = 2\n", (),
        ["fastpool.toml: [process.mailer]", "no target", "module:callable"]),
    "app-with-config": (
        GOOD_WEB, ("apps_groups:app",),
        ["APP", "--config", "not both", "apps_groups:app", "fastpool.toml"]),
    "invalid-toml": (
        GOOD_WEB + "workers = \n", (), ["fastpool.toml", "not valid TOML", "line 4"]),
    "setting-and-its-alias-in-one-table": (
        GOOD_WEB + "client_timeout = 3\nheader_timeout = 4\n", (),
        ["fastpool.toml: [group.web] client_timeout and header_timeout are the same setting",
         "give only one"]),
    "setting-and-its-alias-in-server": (
        "[server]\nheader_timeout = 3\nclient_timeout = 4\n" + GOOD_WEB, (),
        ["fastpool.toml: [server] header_timeout and client_timeout are the same setting",
         "give only one"]),
    "alias-with-a-bad-value": (
        GOOD_WEB + 'header_timeout = "soon"\n', (),
        ["fastpool.toml: [group.web] header_timeout", "expected a number", "'soon'"]),
}


def assert_refused(result, parts: list[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert result.stdout == "", output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: "), output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert "Booting worker" not in output and "Starting fastpool" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_refused_before_anything_starts(tmp_path, case):
    text, extra, parts = BAD_CONFIGS[case]
    config = tmp_path / "fastpool.toml"
    config.write_text(text)
    result = fastpool("serve", *extra, "--config", str(config), cwd=tmp_path)
    assert_refused(result, parts)
    assert not (tmp_path / ".fastpool.sock").exists()


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    result = fastpool("serve", "--config", str(missing), cwd=tmp_path)
    assert_refused(result, ["--config", str(missing), "no such file"])


def test_check_refuses_a_bad_config_the_same_way(tmp_path):
    config = tmp_path / "fastpool.toml"
    config.write_text(GOOD_WEB + 'workers = "four"\n')
    result = fastpool("check", "--config", str(config), cwd=tmp_path)
    assert_refused(result, ["fastpool.toml: [group.web] workers", "expected an integer"])


def test_bad_pyproject_table_names_it(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.fastpool.group.web]\napp = \"apps_groups:app\"\nworkers = \"four\"\n")
    result = fastpool("serve", cwd=tmp_path)
    assert_refused(result, ["pyproject.toml", "[tool.fastpool]", "[group.web] workers",
                            "expected an integer"])


# ---------------------------------------------------------------- a group without listen


def test_a_group_without_listen_gets_the_default_address(tmp_path):
    """The documented default of listen: the server's host and port, so
    127.0.0.1:8000 unless [server] (or --host/--port) says otherwise; a group
    with routes and no listen still has no listener of its own."""
    (tmp_path / "fastpool.toml").write_text(render(groups={
        "web": {"app": "apps_groups:app"},
        "task": {"app": "apps_groups:app", "routes": ["/task"]}}))
    lines = plan_lines(tmp_path)
    assert "group web: app apps_groups:app, listen 127.0.0.1:8000 (the default)," in \
        lines["group web"], lines
    assert "listen -," in lines["group task"] and "routes /task" in lines["group task"], lines
    lines = plan_lines(tmp_path, "--host", "::1", "--port", "9001")
    assert "listen [::1]:9001 (the default)," in lines["group web"], lines


@pytest.mark.parametrize("how", ["server-table", "flag"])
def test_a_one_group_config_without_listen_serves(clusters, how):
    chosen = ports("web")
    server_table = {"port": chosen["web"]} if how == "server-table" else None
    text = render(server=server_table, groups={"web": {"app": "apps_groups:app"}})
    args = ("--port", str(chosen["web"])) if how == "flag" else ()
    server = clusters.start(text, workers=1, ports=chosen, args=args)
    (worker,) = server.wait_group("web", 1)
    reply = fetch(chosen["web"], "/pid")
    assert (reply.status, reply.pid) == (200, worker)
    assert server.group_status("web")["listen"] == [f"http://127.0.0.1:{chosen['web']}"]


# ---------------------------------------------------------------- pyproject.toml


def test_pyproject_tool_table_is_used_without_config(clusters, tmp_path):
    chosen = ports("web", "task")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "shop"\nversion = "1"\n\n'
        '[tool.fastpool.server]\nroot_path = "/shop"\n\n'
        + render(groups={"web": group(chosen["web"], 2), "task": group(chosen["task"])})
        .replace("[group.", "[tool.fastpool.group."))
    plan = fastpool("check", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert f"config: {tmp_path / 'pyproject.toml'}" in plan.stdout
    assert "group web: app apps_groups:app" in plan.stdout
    assert "2 worker(s)" in plan.stdout
    server = clusters.start(None, workers=3, ports=chosen, cwd=tmp_path)
    web = server.wait_group("web", 2)
    task = server.wait_group("task", 1)
    for name, pids in (("web", web), ("task", task)):
        reply = fetch(chosen[name], "/shop/environ")
        assert reply.status == 200 and reply.pid in pids
        assert json.loads(reply.body)["SCRIPT_NAME"] == "/shop"
    status = fastpool("status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert [g["name"] for g in json.loads(status.stdout)["groups"]] == ["web", "task"]
    # With APP on the command line, the pyproject table is not used.
    plan = fastpool("check", "apps_groups:app", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "config: command line" in plan.stdout
    assert "group main: app apps_groups:app, listen 127.0.0.1:8000" in plan.stdout


# ---------------------------------------------------------------- precedence


def script_names(server, chosen: dict[str, int], prefixes: dict[str, str]) -> dict[str, str]:
    names = {}
    for name, port in chosen.items():
        code, _, body = fetch(port, f"{prefixes[name]}/environ")
        assert code == 200, body
        names[name] = json.loads(body)["SCRIPT_NAME"]
    return names


def test_server_table_is_the_default_of_every_group(clusters):
    chosen = ports("plain", "own")
    text = render(server={"root_path": "/base"},
                  groups={"plain": group(chosen["plain"]),
                          "own": group(chosen["own"], root_path="/other")})
    server = clusters.start(text, workers=2, ports=chosen)
    assert script_names(server, chosen, {"plain": "/base", "own": "/other"}) == {
        "plain": "/base", "own": "/other"}


def test_command_line_flag_overrides_server_table_and_group(clusters):
    chosen = ports("plain", "own")
    text = render(server={"root_path": "/base"},
                  groups={"plain": group(chosen["plain"]),
                          "own": group(chosen["own"], root_path="/other")})
    server = clusters.start(text, workers=2, ports=chosen, args=("--root-path", "/cli"))
    assert script_names(server, chosen, {"plain": "/cli", "own": "/cli"}) == {
        "plain": "/cli", "own": "/cli"}


def plan_lines(tmp_path, *args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    result = fastpool("check", "--config", str(tmp_path / "fastpool.toml"), *args,
                      cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    return {line.split(":")[0]: line for line in result.stdout.splitlines()}


def test_precedence_in_the_plan(tmp_path):
    chosen = ports("plain", "own")
    listen = {name: [f"127.0.0.1:{port}"] for name, port in chosen.items()}
    (tmp_path / "fastpool.toml").write_text(render(
        server={"timeout": 7, "workers": 2, "threads": 3},
        groups={"plain": {"app": "apps_groups:app", "listen": listen["plain"]},
                "own": {"app": "apps_groups:app", "listen": listen["own"], "timeout": 9}}))
    lines = plan_lines(tmp_path)
    # [server] gives both groups 2 workers x 3 threads and timeout 7; "own" overrides timeout.
    assert "2 worker(s) x 3 thread(s), timeout 7 s" in lines["group plain"], lines
    assert "2 worker(s) x 3 thread(s), timeout 9 s" in lines["group own"], lines
    # The environment beats the file, the flag beats both.
    lines = plan_lines(tmp_path, env={"FASTPOOL_TIMEOUT": "4"})
    assert "timeout 4 s" in lines["group plain"] and "timeout 4 s" in lines["group own"]
    lines = plan_lines(tmp_path, "--timeout", "3", "--workers", "1",
                       env={"FASTPOOL_TIMEOUT": "4"})
    for name in ("group plain", "group own"):
        assert "1 worker(s) x 3 thread(s), timeout 3 s" in lines[name], lines


# ---------------------------------------------------------------- aliases (former names)

TIMEOUT = 1.0    # the client_timeout the alias tests give (the default is 30 s)

# how: (a [server] table, flags, environment) that set client_timeout to TIMEOUT
CLIENT_TIMEOUT_WAYS = {
    "flag": (None, ("--client-timeout", "1"), None),
    "alias-flag": (None, ("--header-timeout", "1"), None),
    "alias-env": (None, (), {"FASTPOOL_HEADER_TIMEOUT": "1"}),
    "alias-key": ({"header_timeout": TIMEOUT}, (), None),
    # The flag under the new name beats the file's key under the old one.
    "flag-over-alias-key": ({"header_timeout": 60.0}, ("--client-timeout", "1"), None),
}


@pytest.mark.parametrize("how", list(CLIENT_TIMEOUT_WAYS))
def test_client_timeout_under_either_name_applies(clusters, how):
    """header_timeout, the former name of client_timeout, still sets it as a
    flag, an environment variable and a key: a connection that sends nothing
    is closed after client_timeout, not the default 30 s."""
    server_table, args, env = CLIENT_TIMEOUT_WAYS[how]
    chosen = ports("web")
    text = render(server=server_table, groups={"web": group(chosen["web"])})
    server = clusters.start(text, workers=1, ports=chosen, args=args, env=env)
    server.wait_group("web", 1)
    with socket.create_connection(("127.0.0.1", chosen["web"]), timeout=TIMEOUT + 10) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""     # closed by the server, never answered
        waited = time.monotonic() - started
    assert TIMEOUT - 0.2 < waited < TIMEOUT + 5, waited


# how: (flags, environment, the two names the one error line must contain)
BOTH_NAMES = {
    "flags": (("--client-timeout", "3", "--header-timeout", "4"), None,
              ["--client-timeout and --header-timeout"]),
    "environment": ((), {"FASTPOOL_HEADER_TIMEOUT": "3", "FASTPOOL_CLIENT_TIMEOUT": "4"},
                    ["FASTPOOL_CLIENT_TIMEOUT and FASTPOOL_HEADER_TIMEOUT"]),
}


@pytest.mark.parametrize("how", list(BOTH_NAMES))
@pytest.mark.parametrize("command", ["serve", "check"])
def test_a_setting_given_under_both_names_is_refused(tmp_path, how, command):
    args, env, parts = BOTH_NAMES[how]
    result = fastpool(command, "apps_groups:app", "--port", str(PORT), *args, cwd=tmp_path,
                      env=env)
    assert_refused(result, [*parts, "are the same setting",
                            "client_timeout, formerly header_timeout", "give only one"])


# ---------------------------------------------------------------- the loaded config


def test_a_loaded_config_is_immutable_and_picklable(tmp_path):
    (tmp_path / "fastpool.toml").write_text(
        "[server]\nheader_timeout = 7\n" + GOOD_WEB
        + '[process.mailer]\ntarget = "apps_groups:consume"\n')
    config = settings.load({}, {}, str(tmp_path / "fastpool.toml"))
    web = config.groups["web"]
    assert web.client_timeout == web.header_timeout == 7.0
    assert web.listen == (f"127.0.0.1:{PORT}",)
    with pytest.raises(TypeError):
        web.values["workers"] = 2            # type: ignore[index]
    with pytest.raises(AttributeError):
        web.workers = 2                      # type: ignore[misc]
    with pytest.raises(TypeError):
        config.groups["other"] = web         # type: ignore[index]
    changed = web.with_values(header_timeout=3.0, listen=["127.0.0.1:1"])
    assert (changed.client_timeout, changed.listen) == (3.0, ("127.0.0.1:1",))
    assert (web.client_timeout, web.listen) == (7.0, (f"127.0.0.1:{PORT}",))
    assert pickle.loads(pickle.dumps(config)) == config

"""The ``fastpool`` command line: --version, operator errors, the README table."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TESTS, child_env, free_port

import fastpool

ROOT = TESTS.parent
START_MARKER = "<!-- settings-table:start -->"
END_MARKER = "<!-- settings-table:end -->"


def run_cli(args: list[str], env: dict[str, str] | None = None,
            timeout: float = 20.0, command: list[str] | None = None,
            cwd: Path = TESTS, stdout_closed: bool = False,
            ) -> subprocess.CompletedProcess:
    """Run ``python -m fastpool ARGS`` to completion (killed, and failed, past ``timeout``).

    ``stdout_closed``: stdout is a pipe whose reader has already gone (what
    ``fastpool status | head -1`` meets once head has its line)."""
    stdout: int | None = subprocess.PIPE
    if stdout_closed:
        reader, stdout = os.pipe()
        os.close(reader)
    try:
        proc = subprocess.Popen((command or [sys.executable, "-m", "fastpool"]) + args,
                                stdout=stdout, stderr=subprocess.PIPE, text=True,
                                env=child_env(env), cwd=cwd, start_new_session=True)
    finally:
        if stdout_closed:
            os.close(stdout)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"fastpool {' '.join(args)} still ran after {timeout}s:\n{stdout}\n{stderr}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# ---------------------------------------------------------------- --version


def test_version_module():
    result = run_cli(["--version"])
    assert result.returncode == 0, result.stderr
    assert fastpool.__version__ in result.stdout
    assert "compiled core: yes" in result.stdout


def test_version_console_script():
    script = Path(sys.executable).parent / "fastpool"
    if not script.exists():
        pytest.skip(f"no console script at {script}")
    result = run_cli(["--version"], command=[str(script)])
    assert result.returncode == 0, result.stderr
    assert fastpool.__version__ in result.stdout
    assert "compiled core: yes" in result.stdout


# ---------------------------------------------------------------- operator errors

BAD_USAGE = {
    "workers-zero": (["--workers", "0"], {}, "--workers"),
    "workers-word": (["--workers", "many"], {}, "--workers"),
    "workers-missing-value": (["--workers"], {}, "--workers"),
    "port-word": (["--port", "abc"], {}, "--port"),
    "port-negative": (["--port", "-1"], {}, "--port"),
    "port-too-large": (["--port", "70000"], {}, "--port"),
    "bind-port-too-large": (["--bind", "1.2.3.4:99999"], {}, "--bind"),
    "bind-port-word": (["--bind", "127.0.0.1:http"], {}, "--bind"),
    "bind-no-host": (["--bind", ":8000"], {}, "--bind"),
    "keep-alive-negative": (["--keep-alive", "-1"], {}, "--keep-alive"),
    "graceful-timeout-word": (["--graceful-timeout", "soon"], {}, "--graceful-timeout"),
    "backlog-zero": (["--backlog", "0"], {}, "--backlog"),
    "log-level": (["--log-level", "loud"], {}, "--log-level"),
    "unknown-flag": (["--wrokers", "3"], {}, "--wrokers"),
    "env-workers": ([], {"FASTPOOL_WORKERS": "x"}, "FASTPOOL_WORKERS"),
    "env-preload": ([], {"FASTPOOL_PRELOAD": "maybe"}, "FASTPOOL_PRELOAD"),
    "env-port": ([], {"FASTPOOL_PORT": "eighty"}, "FASTPOOL_PORT"),
    "web-concurrency": ([], {"WEB_CONCURRENCY": "lots"}, "WEB_CONCURRENCY"),
}


@pytest.mark.parametrize("case", list(BAD_USAGE))
def test_bad_setting_is_one_error_line_and_exit_2(case):
    args, env, flag = BAD_USAGE[case]
    if not any(a in ("--port", "--bind") for a in args) and "FASTPOOL_PORT" not in env:
        args = [*args, "--port", str(free_port())]   # should it start anyway: not on 8000
    result = run_cli(["serve", "apps_wsgi:hello", *args], env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:"), result.stderr
    assert flag in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


ABBREVIATED = {
    "serve-workers": (["serve", "apps_wsgi:hello", "--work", "2"], "serve", "--work 2"),
    "serve-reuse-port": (["serve", "apps_wsgi:hello", "--no-reuse"], "serve", "--no-reuse"),
    "check-workers": (["check", "apps_wsgi:hello", "--work=2"], "check", "--work=2"),
    "status-json": (["status", "--js"], "status", "--js"),
    "reload-group": (["reload", "--gr", "web"], "reload", "--gr web"),
    "scale-socket": (["scale", "web", "+1", "--control-sock", "x"], "scale",
                     "--control-sock x"),
    "nginx-hosts": (["nginx-config", "--upstream", "a"], "nginx-config", "--upstream a"),
    "version": (["--vers"], None, "--vers"),
}


@pytest.mark.parametrize("case", list(ABBREVIATED))
def test_abbreviated_flags_are_refused(case):
    args, command, unknown = ABBREVIATED[case]
    if command == "serve":
        args = [*args, "--port", str(free_port())]   # should it start anyway: not on 8000
    result = run_cli(args)
    assert result.returncode == 2, result.stderr
    helper = f"fastpool {command}" if command else "fastpool"
    assert result.stderr == (f"Error: unrecognized arguments: {unknown} "
                             f"(see '{helper} --help')\n")
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["serve", "check", "nginx-config", "status", "reload",
                                     "scale"])
def test_unknown_flag_points_at_the_subcommands_help(command):
    args = {"serve": ["apps_wsgi:hello"], "check": ["apps_wsgi:hello"],
            "scale": ["web", "+1"]}.get(command, [])
    result = run_cli([command, *args, "--bogus"])
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"Error: unrecognized arguments: --bogus "
                             f"(see 'fastpool {command} --help')\n")


def test_unknown_flag_before_the_command_points_at_the_main_help():
    result = run_cli(["--bogus", "status"])
    assert result.returncode == 2, result.stderr
    assert result.stderr == "Error: unrecognized arguments: --bogus (see 'fastpool --help')\n"


@pytest.mark.parametrize("how", ["port", "bind"])
def test_port_in_use(how):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = ["--port", str(port)] if how == "port" else ["--bind", f"127.0.0.1:{port}"]
        result = run_cli(["serve", "apps_wsgi:hello", *args])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"127.0.0.1:{port}" in output
    assert "Traceback" not in output
    assert "Booting worker" not in output


# ---------------------------------------------------------------- stdout closed early


@pytest.mark.parametrize("args", [["--version"], ["check", "apps_wsgi:hello"],
                                  ["serve", "--help"]], ids=["version", "check", "help"])
def test_closed_stdout_ends_quietly(args):
    result = run_cli(args, stdout_closed=True)
    # 141 = 128 + SIGPIPE, as the shell reports a tool whose reader left; argparse's
    # --help ignores a failed write and exits 0.
    assert result.returncode == (0 if "--help" in args else 141), result.stderr
    assert result.stderr == ""


def test_status_into_a_closed_pipe_ends_quietly(serve, tmp_path):
    """``fastpool status | head -1`` once head has gone: no BrokenPipeError."""
    serve("apps_wsgi:hello")
    result = run_cli(["status"], cwd=tmp_path, stdout_closed=True)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""
    assert run_cli(["status"], cwd=tmp_path).returncode == 0   # the master is unharmed


# ---------------------------------------------------------------- README


def test_readme_settings_table_is_current():
    expected = subprocess.run([sys.executable, "-m", "fastpool.settings"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
    assert expected.startswith("| setting |")
    readme = ROOT / "README.md"
    assert readme.exists(), "README.md is missing"
    text = readme.read_text(encoding="utf-8")
    assert text.count(START_MARKER) == 1 and text.count(END_MARKER) == 1, \
        "README.md needs exactly one pair of settings-table markers"
    table = text.split(START_MARKER, 1)[1].split(END_MARKER, 1)[0].strip()
    assert table == expected, (
        "README.md's settings table is stale; replace it with the output of "
        "`python -m fastpool.settings`")


def test_settings_types_are_current():
    """fastpool/settings_types.py (the typed attributes of the configs) is what
    the settings table generates."""
    expected = subprocess.run([sys.executable, "-m", "fastpool.settings", "--types"],
                              capture_output=True, text=True, check=True, timeout=30).stdout
    assert "class GroupSettings:" in expected and "    workers: int\n" in expected
    shipped = ROOT / "src" / "fastpool" / "settings_types.py"
    assert shipped.read_text(encoding="utf-8") == expected, (
        "src/fastpool/settings_types.py is stale; regenerate it with "
        "`python -m fastpool.settings --write-types`")

"""Check that the fastpool this Python imports is an installed, compiled wheel; then test it.

Run with the Python of the environment the wheel is installed in:

    python tools/check_installed.py --project . [--wheel FILE] [--suite fast|full|none]

It is the test step of every wheel cibuildwheel builds (``test-command`` in
pyproject.toml), of the nox ``quick-3.x`` sessions, and of
``tools/check_release.py`` (in a fresh venv without Cython).  It fails when:

* ``import fastpool`` finds the source tree (``src/``) instead of the
  installed package, so the tests would not be testing the wheel;
* the installed distribution is not a platform wheel (its WHEEL file says
  ``Root-Is-Purelib: true`` or has a ``none-any`` tag; with ``--wheel``, the
  file name is checked too);
* one of the project's ``src/fastpool/_*.pyx`` has no compiled module in the
  installed package, or ``fastpool --version`` does not say
  ``compiled core: yes``.

Then it runs pytest on the project's tests from a temporary directory, so that
only the installed package can be imported: ``--suite fast`` (the default) is
the subset in FAST_SUBSET below, ``--suite full`` the whole suite.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# The fast subset (about a quarter of the suite's time): the suites that drive
# the compiled core through the CPython C API (the request corpus in process,
# HTTP parsing and framing, limits, WSGI, static files, TLS (ssl differs by
# Python: kernel TLS needs 3.12+), the bundled example) and the
# config-file suite (tomllib, or
# tomli on 3.10), less FAST_DESELECT: the HTTP tests that spend their time
# waiting out deadlines (slow readers, slowloris, idle keep-alive), which
# exercise timers rather than the interpreter.  Left out as well: the
# process-management suites (master, groups, supervision), plain Python over
# fork and signals, and the CLI and health/proxy suites.  Everything runs on
# the default python3 in .ci/run and on every CPython in
# .github/workflows/tests.yml.
FAST_SUBSET = (
    "test_smoke.py",
    "test_corpus.py",
    "test_http.py",
    "test_wsgi.py",
    "test_limits.py",
    "test_config.py",
    "test_static.py",
    "test_tls.py",
)
FAST_DESELECT = ("not read_slowly and not slowloris and not idle_keep_alive"
                 " and not stops_reading_a_file and not file_wrapper_download")


class CheckFailed(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def check_import_location(project: Path) -> Path:
    """The installed package, not the checkout's src/, is what imports."""
    spec = importlib.util.find_spec("fastpool")
    check(spec is not None and spec.origin, "fastpool is not importable")
    package_dir = Path(spec.origin).resolve().parent
    source_dir = (project / "src").resolve()
    check(not package_dir.is_relative_to(source_dir),
          f"fastpool is imported from the source tree ({package_dir}), not from the "
          "installed wheel; run this from outside the checkout without PYTHONPATH=src")
    return package_dir


def check_platform_wheel(wheel: Path | None) -> str:
    """The installed distribution came from a platform wheel; returns its tags."""
    dist = importlib.metadata.distribution("fastpool")
    wheel_file = dist.read_text("WHEEL")
    check(wheel_file, "the installed fastpool has no WHEEL metadata (not installed from a wheel)")
    fields = [line.split(":", 1) for line in wheel_file.splitlines() if ":" in line]
    tags = [value.strip() for key, value in fields if key.strip() == "Tag"]
    purelib = [value.strip().lower() for key, value in fields if key.strip() == "Root-Is-Purelib"]
    check(purelib == ["false"], f"WHEEL says Root-Is-Purelib: {purelib}: a pure-Python wheel")
    check(tags and not any(tag.endswith("-none-any") for tag in tags),
          f"the wheel is tagged {tags}: a pure-Python wheel")
    if wheel is not None:
        check(wheel.name.startswith("fastpool-") and wheel.suffix == ".whl",
              f"{wheel.name} is not a fastpool wheel")
        check(not wheel.name.endswith("-none-any.whl"),
              f"{wheel.name} is a pure-Python wheel")
        check("linux" in wheel.name, f"{wheel.name} is not a Linux wheel")
    return ", ".join(tags)


def check_compiled_modules(project: Path, package_dir: Path) -> list[str]:
    """Each src/fastpool/_*.pyx has an extension module in the installed package."""
    sources = sorted(p.stem for p in (project / "src" / "fastpool").glob("_*.pyx"))
    check(sources, f"no _*.pyx under {project / 'src' / 'fastpool'}: is --project right?")
    found = []
    for name in sources:
        spec = importlib.util.find_spec(f"fastpool.{name}")
        check(spec is not None and spec.origin,
              f"fastpool.{name} is missing from the installed package")
        origin = Path(spec.origin)
        check(any(origin.name.endswith(suffix) for suffix in EXTENSION_SUFFIXES),
              f"fastpool.{name} is {origin.name}, not a compiled extension module")
        check(origin.resolve().parent == package_dir,
              f"fastpool.{name} comes from {origin}, outside {package_dir}")
        found.append(origin.name)
    script = Path(sys.executable).with_name("fastpool")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fastpool"]
    out = subprocess.run([*command, "--version"], capture_output=True, text=True,
                         timeout=60, cwd=tempfile.gettempdir())
    check(out.returncode == 0, f"fastpool --version failed: {out.stdout}{out.stderr}")
    check("compiled core: yes (" in out.stdout,
          f"fastpool --version does not report the compiled core: {out.stdout.strip()}")
    print(out.stdout.strip())
    return found


def run_tests(project: Path, suite: str, extra: list[str]) -> int:
    tests = project / "tests"
    if suite == "full":
        targets = [str(tests)]
    else:
        missing = [name for name in FAST_SUBSET if not (tests / name).exists()]
        check(not missing, f"FAST_SUBSET names files that do not exist: {missing}")
        targets = [str(tests / name) for name in FAST_SUBSET] + ["-k", FAST_DESELECT]
    env = dict(os.environ)
    # Nothing may put the checkout's src/ back on the path.
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="fastpool-tests-") as cwd:
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                   "--rootdir", str(project), *targets, *extra]
        print("+", " ".join(command), flush=True)
        return subprocess.run(command, cwd=cwd, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True,
                        help="the fastpool checkout (or unpacked sdist) whose tests to run")
    parser.add_argument("--wheel", type=Path, help="the wheel file that was installed")
    parser.add_argument("--suite", choices=("fast", "full", "none"), default="fast")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    try:
        package_dir = check_import_location(project)
        tags = check_platform_wheel(args.wheel)
        modules = check_compiled_modules(project, package_dir)
    except CheckFailed as exc:
        print(f"check_installed: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"check_installed: fastpool from {package_dir}, wheel tags {tags}, "
          f"compiled modules {', '.join(modules)}")
    if args.suite == "none":
        return 0
    try:
        return run_tests(project, args.suite, args.pytest_args)
    except CheckFailed as exc:
        print(f"check_installed: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

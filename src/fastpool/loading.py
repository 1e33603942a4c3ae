"""Import the user's app from ``module:attribute`` (or ``module:factory(...)``).

Rules: every failure is an ``AppLoadError`` whose message is one line naming
what was not found (module, attribute) — or, for an exception raised while the
app's module was importing, that exception with its traceback, since the
operator needs to see where it came from.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any


class AppLoadError(Exception):
    """The app named on the command line cannot be loaded."""


def _literal(node: ast.expr, spec: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise AppLoadError(
            f"app {spec!r}: factory arguments must be literals (strings, numbers, ...)"
        ) from None


def import_app(spec: str, *, add_cwd: bool = True,
               callable_kind: str = "a WSGI app") -> Callable[..., Any]:
    """Return the app object named by ``spec``."""
    if add_cwd and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, expression = spec.partition(":")
    module_name = module_name.strip()
    expression = expression.strip() or "application"
    if not module_name:
        raise AppLoadError(f"app {spec!r}: expected MODULE:ATTRIBUTE, e.g. myapp:app")
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        raise AppLoadError(
            f"app {spec!r}: {expression!r} is not an attribute name or a factory call"
        ) from None
    call = tree if isinstance(tree, ast.Call) else None
    target = call.func if call is not None else tree
    names: list[str] = []
    while isinstance(target, ast.Attribute):
        names.insert(0, target.attr)
        target = target.value
    if not isinstance(target, ast.Name):
        raise AppLoadError(
            f"app {spec!r}: {expression!r} is not an attribute name or a factory call"
        )
    names.insert(0, target.id)

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppLoadError(
                f"could not import module {module_name!r} (looked in {os.getcwd()}): "
                f"no module named {exc.name!r}"
            ) from None
        raise AppLoadError(
            f"error while importing {module_name!r}:\n{traceback.format_exc().rstrip()}"
        ) from None
    except SyntaxError as exc:
        raise AppLoadError(
            f"syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}"
        ) from None
    except Exception:
        raise AppLoadError(
            f"error while importing {module_name!r}:\n{traceback.format_exc().rstrip()}"
        ) from None

    obj: Any = module
    for index, name in enumerate(names):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            where = module_name if index == 0 else f"{module_name}:{'.'.join(names[:index])}"
            raise AppLoadError(f"attribute {name!r} not found in {where!r}") from None
    if call is not None:
        args = [_literal(a, spec) for a in call.args]
        kwargs = {k.arg: _literal(k.value, spec) for k in call.keywords if k.arg}
        try:
            obj = obj(*args, **kwargs)
        except Exception:
            raise AppLoadError(
                f"app factory {expression!r} raised:\n{traceback.format_exc().rstrip()}"
            ) from None
    if not callable(obj):
        hint = ("an app is a WSGI callable taking (environ, start_response) or an ASGI "
                "callable taking (scope, receive, send)"
                if callable_kind == "a WSGI app" else f"{callable_kind} must be callable")
        raise AppLoadError(f"{spec!r} is not callable (it is a {type(obj).__name__}); {hint}")
    return obj


def _is_async_callable(obj: Any) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - the method itself is inspected
    return call is not None and inspect.iscoroutinefunction(call)


class ASGI2Adapter:
    """Calls an ASGI 2 app (``App(scope)`` returns ``await instance(receive, send)``)
    with the ASGI 3 signature."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        instance = self.app(scope)
        await instance(receive, send)


def resolve_interface(app: Callable[..., Any], interface: str,
                      spec: str) -> tuple[str, Callable[..., Any]]:
    """``("wsgi" | "asgi", app to call)`` for the ``interface`` setting.

    ``auto``: an ASGI 3 app is a coroutine function, or an object whose
    ``__call__`` is one; a class whose instances have an async ``__call__`` is
    an ASGI 2 app and is wrapped; anything else is WSGI.
    """
    asgi2 = inspect.isclass(app) and inspect.iscoroutinefunction(
        getattr(app, "__call__", None))  # noqa: B004
    asgi3 = not inspect.isclass(app) and _is_async_callable(app)
    if interface == "wsgi":
        if asgi3 or asgi2:
            raise AppLoadError(f"{spec!r} is an ASGI app (async); serve it with "
                               "--interface asgi (or auto)")
        return "wsgi", app
    if asgi2:
        return "asgi", ASGI2Adapter(app)
    if interface == "asgi" and not asgi3:
        raise AppLoadError(f"{spec!r} is not an ASGI app: expected an async callable taking "
                           "(scope, receive, send)")
    return ("asgi" if asgi3 else "wsgi"), app

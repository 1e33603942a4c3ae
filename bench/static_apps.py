"""The peers' static-file apps for ``static.py`` (run from the peers' environment).

Both serve the directory named by ``$STATIC_BENCH_DIR`` under ``/static/`` and hand
everything else to the bench app of ``apps.py`` (so ``GET /`` answers ``Hello, World!``,
which is what the harness polls until a server is ready). They are factories, so the
directory is read when the server loads the app, and this module can be imported without
whitenoise or starlette installed:

* ``whitenoise_app()``: the WSGI ``apps:app`` wrapped in
  ``whitenoise.WhiteNoise(app, root=DIR, prefix="static/")`` (gunicorn:
  ``static_apps:whitenoise_app()``).
* ``starlette_app()``: a Starlette app mounting ``StaticFiles(directory=DIR)`` at
  ``/static`` and ``apps:asgi_app`` at the root (uvicorn: ``--factory
  static_apps:starlette_app``).
"""

from __future__ import annotations

import os
from typing import Any

import apps

ENV = "STATIC_BENCH_DIR"


def _directory() -> str:
    directory = os.environ.get(ENV)
    if not directory or not os.path.isdir(directory):
        raise RuntimeError(f"${ENV} must name the directory to serve (got {directory!r})")
    return directory


def whitenoise_app() -> Any:
    """WSGI: whitenoise in front of ``apps:app``."""
    from whitenoise import WhiteNoise

    return WhiteNoise(apps.app, root=_directory(), prefix="static/")


def starlette_app() -> Any:
    """ASGI: Starlette with ``StaticFiles`` at /static, ``apps:asgi_app`` for the rest."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    return Starlette(routes=[
        Mount("/static", app=StaticFiles(directory=_directory()), name="static"),
        Mount("", app=apps.asgi_app),
    ])

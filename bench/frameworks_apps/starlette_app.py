"""Starlette: ``GET /json`` (and ``/``), a ``JSONResponse`` from an async endpoint."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from frameworks_apps import PAYLOAD


async def json_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(PAYLOAD)


app = Starlette(routes=[Route("/", json_endpoint), Route("/json", json_endpoint)])

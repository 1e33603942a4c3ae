"""A real Starlette app (``apps_asgi_starlette:app``) for test_asgi.py and
test_asgi_websocket.py.

Routes:

* ``GET /json``                  JSON: a greeting, the lifespan state seen via
                                 ``request.state``, the worker's pid
* ``GET /stream?n=N``            a ``StreamingResponse`` of N parts ``part I\\n``
* ``POST /upload``               the body read with ``async for chunk in request.stream()``:
                                 length, sha256 and how many chunks
* ``GET /background?tag=T``      answers at once; a ``BackgroundTask`` then sleeps
                                 ``BACKGROUND_DELAY`` s and marks T done
* ``GET /background-result?tag=T``  ``pending``, ``running`` or ``done`` for T (this worker)
* ``WS /ws``                     echoes text and bytes until the client goes away
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

BACKGROUND_DELAY = 1.0
BACKGROUND: dict[str, str] = {}


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    yield {"greeting": "hello from the lifespan", "started_by": os.getpid()}


async def json_endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "starlette", "greeting": request.state.greeting,
                         "started_by": request.state.started_by, "pid": os.getpid()})


async def stream_endpoint(request: Request) -> StreamingResponse:
    count = int(request.query_params.get("n", "3"))

    async def parts() -> AsyncIterator[bytes]:
        for i in range(count):
            yield b"part %d\n" % i
            await asyncio.sleep(0)

    return StreamingResponse(parts(), media_type="text/plain")


async def upload_endpoint(request: Request) -> JSONResponse:
    digest = hashlib.sha256()
    length = 0
    chunks = 0
    async for chunk in request.stream():
        digest.update(chunk)
        length += len(chunk)
        chunks += 1 if chunk else 0
    return JSONResponse({"length": length, "sha256": digest.hexdigest(), "chunks": chunks})


async def _background_job(tag: str) -> None:
    BACKGROUND[tag] = "running"
    await asyncio.sleep(BACKGROUND_DELAY)
    BACKGROUND[tag] = "done"


async def background_endpoint(request: Request) -> PlainTextResponse:
    tag = request.query_params["tag"]
    return PlainTextResponse("accepted", background=BackgroundTask(_background_job, tag))


async def background_result(request: Request) -> PlainTextResponse:
    return PlainTextResponse(BACKGROUND.get(request.query_params["tag"], "pending"))


async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"])
            else:
                await websocket.send_text(message["text"])
    except WebSocketDisconnect:
        return


app = Starlette(
    routes=[
        Route("/json", json_endpoint),
        Route("/stream", stream_endpoint),
        Route("/upload", upload_endpoint, methods=["POST"]),
        Route("/background", background_endpoint),
        Route("/background-result", background_result),
        WebSocketRoute("/ws", websocket_echo),
    ],
    lifespan=lifespan,
)

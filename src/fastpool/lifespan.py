"""The ASGI lifespan protocol, run once in each ASGI worker.

Rules of this module:

* ``startup`` runs before the worker accepts a connection; ``shutdown`` after
  it has drained.  The app's lifespan call is one task for the worker's life.
* ``mode`` is the ``lifespan`` setting: ``on`` — the app must support the
  protocol, and any failure stops the server (a ``LifespanFailure``, which the
  worker reports to the master as a boot failure: one message, no respawn
  loop); ``auto`` — an app that raises before answering the startup event is
  taken not to support lifespan, logged once, and served without it (uvicorn
  behaves the same); an app that answers ``lifespan.startup.failed`` fails the
  boot in both modes.
* ``state`` is the dict given to the app in the lifespan scope; each request's
  scope gets a shallow copy of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fastpool.error")


class LifespanFailure(Exception):
    """The app's lifespan startup failed; the message says how."""


class Lifespan:
    def __init__(self, app: Callable[..., Any], mode: str) -> None:
        self.app = app
        self.mode = mode
        self.state: dict[str, Any] = {}
        self.supported = True
        self.to_app: asyncio.Queue[dict[str, Any]] | None = None
        self.replies: asyncio.Queue[dict[str, Any]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.error: str | None = None

    async def startup(self) -> dict[str, Any] | None:
        """Run the app's startup; return the state for request scopes, or None
        when the app does not take part in lifespan."""
        self.to_app = asyncio.Queue()
        self.replies = asyncio.Queue()
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self.task = asyncio.get_running_loop().create_task(self._run(scope))
        await self.to_app.put({"type": "lifespan.startup"})
        reply = await self._reply()
        if reply is None:
            # The app returned or raised without answering.
            if self.mode == "on":
                why = self.error or "the app returned without answering lifespan.startup"
                raise LifespanFailure(f"ASGI lifespan startup failed: {why} (--lifespan on)")
            self.supported = False
            log.info("ASGI 'lifespan' protocol appears unsupported by the app%s; serving "
                     "without it", f" ({self.error})" if self.error else "")
            return None
        if reply["type"] == "lifespan.startup.failed":
            message = reply.get("message") or "no message"
            raise LifespanFailure(f"ASGI lifespan startup failed: {message}")
        if reply["type"] != "lifespan.startup.complete":
            raise LifespanFailure(
                f"ASGI lifespan startup failed: unexpected message {reply['type']!r}")
        return self.state

    async def shutdown(self) -> None:
        if not self.supported or self.task is None or self.task.done():
            return
        assert self.to_app is not None
        await self.to_app.put({"type": "lifespan.shutdown"})
        reply = await self._reply()
        if reply is not None and reply["type"] == "lifespan.shutdown.failed":
            log.error("ASGI lifespan shutdown failed: %s", reply.get("message") or "no message")
        elif reply is None and self.error:
            log.error("ASGI lifespan shutdown failed: %s", self.error)

    async def _reply(self) -> dict[str, Any] | None:
        """The app's next answer, or None once its lifespan call has ended."""
        assert self.replies is not None and self.task is not None
        getter = asyncio.ensure_future(self.replies.get())
        await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:  # noqa: BLE001 - the app's failure is reported
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self.error = f"{type(exc).__name__}: {exc}"
            if self.mode == "on" or not self.supported:
                log.error("ASGI lifespan raised", exc_info=True)

    async def _receive(self) -> dict[str, Any]:
        assert self.to_app is not None
        return await self.to_app.get()

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.replies is not None
        await self.replies.put(message)

"""The queue path and its push channel (ASGI), the ``reports`` group.

* ``POST /reports`` (JSON ``{"name": ..., "seconds": ...}``, both optional)
  enqueues ``jobs.make_report`` on RQ's ``reports`` queue and answers ``202
  Accepted`` with ``Location: /reports/ID`` at once: the work happens later,
  in a consumer.
* ``GET /reports/ID``: the job's state (``queued``, ``started``, ``finished``,
  ``failed`` ...) and, once finished, its result; 404 for an unknown ID.
* WebSocket ``/reports/ID/events``: one message with the result the moment a
  consumer finishes the job (it publishes on the report's Redis channel; a job
  already finished is answered from RQ at once), then a normal close.

RQ's API is synchronous: its calls run in a thread (``asyncio.to_thread``),
so the event loop never waits on Redis.  The push side uses redis-py's
asyncio client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis
import redis.asyncio
from jobs import make_report
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job
from shared import JOB_TIMEOUT, QUEUE, REDIS_URL, channel

_sync: redis.Redis | None = None


def _connection() -> redis.Redis:
    global _sync
    if _sync is None:
        _sync = redis.Redis.from_url(REDIS_URL)
    return _sync


def _enqueue(name: str, seconds: float) -> str:
    # A job whose consumer died mid-way (kill -9) is run again, twice at most,
    # once RQ finds it abandoned (see README.md, "Deferred work").
    return Queue(QUEUE, connection=_connection()).enqueue(
        make_report, name, seconds, job_timeout=JOB_TIMEOUT, retry=Retry(max=2)).id


def _state(job_id: str) -> dict[str, Any] | None:
    try:
        job = Job.fetch(job_id, connection=_connection())
    except NoSuchJobError:
        return None
    status = job.get_status(refresh=False)
    state: dict[str, Any] = {"id": job.id, "status": str(getattr(status, "value", status))}
    if state["status"] == "finished":
        state["result"] = job.return_value()
    return state


async def _answer(send: Any, status: int, payload: Any, headers: tuple = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _events(job_id: str, receive: Any, send: Any) -> None:
    if await receive() != {"type": "websocket.connect"}:
        return
    await send({"type": "websocket.accept"})
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel(job_id))
        # Subscribed first, then asked: a job that finished in between is
        # not missed.
        state = await asyncio.to_thread(_state, job_id)
        if state is None:
            await send({"type": "websocket.close", "code": 4404})
            return
        if state["status"] != "finished":
            gone = asyncio.ensure_future(receive())     # the client may leave first
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=1.0)
                if message is not None:
                    state = {"id": job_id, "status": "finished",
                             "result": json.loads(message["data"])}
                    break
                if gone.done():
                    return
            gone.cancel()
        await send({"type": "websocket.send", "text": json.dumps(state)})
        await send({"type": "websocket.close", "code": 1000})
    finally:
        await pubsub.aclose()
        await client.aclose()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    parts = scope["path"].strip("/").split("/")     # ["reports", ID, "events"]
    if scope["type"] == "websocket":
        if len(parts) == 3 and parts[2] == "events":
            await _events(parts[1], receive, send)
        return
    if scope["method"] == "POST" and parts == ["reports"]:
        try:
            asked = json.loads(await _read_body(receive) or b"{}")
            name, seconds = str(asked.get("name", "report")), float(asked.get("seconds", 0.2))
        except (ValueError, TypeError, AttributeError):
            await _answer(send, 400, {"error": "expected JSON {\"name\": ..., \"seconds\": ...}"})
            return
        job_id = await asyncio.to_thread(_enqueue, name, seconds)
        await _answer(send, 202, {"id": job_id, "status": "queued"},
                      ((b"location", f"/reports/{job_id}".encode()),))
        return
    if scope["method"] == "GET" and len(parts) == 2:
        state = await asyncio.to_thread(_state, parts[1])
        if state is None:
            await _answer(send, 404, {"error": "no such report"})
        else:
            await _answer(send, 200, state)
        return
    await _answer(send, 404, {"error": "not found"})

"""``GET /v1/cubes/{cube}/updates``: a cube's memory updates as server-sent events.

Each event's id is the op's position (``partition:offset``), so a client that reconnects with
``Last-Event-ID`` resumes exactly after the last event it got: nothing missed, nothing twice.
The stream reads Kafka only (any role serves it) and holds no consumer group: the position
travels with the client. Keep-alive pings are SSE comments; the consumer is closed when the
client goes away or the server shuts down.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from streams.api.deps import Service, service
from streams.transport.subscription import Subscription
from streams.transport.updates import Since, recent_updates

router = APIRouter(tags=["updates"])
ServiceDep = Annotated[Service, Depends(service)]
SHUTDOWN_GRACE_S = 2.0  # for a stream to end itself on shutdown (one poll and the commit)


def parse_since(value: str | None) -> Since:
    """``?since=``: an offset of the cube's partition (digits) or an ISO 8601 time."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"since must be an offset or an ISO time, not {value!r}") from None


@router.get(
    "/v1/cubes/{cube_id}/updates",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def updates(
    svc: ServiceDep,
    cube_id: str,
    since: Annotated[
        str | None, Query(description="start: an offset of the cube's partition or an ISO time")
    ] = None,
    ping: Annotated[float, Query(gt=0, le=300, description="keep-alive every N seconds")] = 15,
    last_event_id: Annotated[str | None, Header(description="resume after this event")] = None,
) -> EventSourceResponse:
    """Every memory op of the cube from the start point on, as it is committed to the log; each
    event's data is a JSON ``MemoryUpdate`` (op, memory_id, version, text, position, raw op).
    Without ``Last-Event-ID`` or ``since`` the stream starts at the end of the log."""
    subscription = Subscription(
        cube_id,
        since=parse_since(since),
        after=last_event_id,
        settings=svc.runtime.settings,
        commit=False,
    )
    try:
        await subscription.start()
    except ValueError as exc:  # a Last-Event-ID of another partition, or not a position
        raise HTTPException(400, str(exc)) from None

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async for update in subscription:
                yield ServerSentEvent(data=json.dumps(update.to_json()), id=update.position)
        finally:
            with anyio.CancelScope(shield=True):  # also when cancelled: close the consumer
                await subscription.aclose()

    shutdown = anyio.Event()  # set by sse-starlette when the server shuts down

    async def end_on_shutdown() -> None:
        await shutdown.wait()
        subscription.close()  # the stream ends: the client gets a complete response

    return EventSourceResponse(
        events(),
        ping=ping,
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
        data_sender_callable=end_on_shutdown,
        # Stops the reader also when the body is never iterated (a HEAD request).
        background=BackgroundTask(subscription.close),
    )


@router.get("/v1/cubes/{cube_id}/updates/recent")
async def recent(
    svc: ServiceDep,
    cube_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[dict[str, Any]]:
    """The cube's last ``limit`` updates (oldest first; among the partition's last 10,000 ops),
    in the form of the stream's events: a snapshot for clients that poll (the MCP resource)."""
    found = await run_in_threadpool(recent_updates, cube_id, svc.runtime.settings, limit)
    return [update.to_json() for update in found]

"""``GET /v1/cubes/{cube}/updates``: a cube's memory updates as server-sent events.

Each event's id is the op's position (``partition:offset``), so a client that reconnects with
``Last-Event-ID`` resumes exactly after the last event it got: nothing missed, nothing twice.
The stream reads Kafka only (any role serves it) and holds no consumer group: the position
travels with the client. Keep-alive pings are SSE comments; the consumer is closed when the
client goes away, the server shuts down or the stream reaches ``sse_max_stream_s``.

Each stream holds a Kafka consumer (four librdkafka threads, nine file descriptors) and a
thread, so a process serves at most ``sse_max_streams`` of them, ``sse_max_per_client`` per
client address: over either, 429 with ``Retry-After``. A stream's slot is freed however it ends
(the client gone, the server stopping, an error, a start that failed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from schemas.limits import POSITION_BYTES, check_offset, check_time, cut_utf8
from streams.api.deps import Service, service
from streams.api.limits import CubePath, Slot, StreamSlots, errors, invalid
from streams.settings import Settings
from streams.transport.subscription import Subscription
from streams.transport.updates import Since, parse_position, recent_updates

router = APIRouter(tags=["updates"])
ServiceDep = Annotated[Service, Depends(service)]
SHUTDOWN_GRACE_S = 2.0  # for a stream to end itself on shutdown (one poll and the commit)
RETRY_AFTER_S = 5  # a 429's Retry-After: streams end when clients leave, not on a schedule


def parse_since(value: str | None) -> Since:
    """``?since=``: an offset of the cube's partition (digits, 0 .. 2^63-1) or an ISO 8601
    time (1900 .. 2299, naive is UTC); a 422 for anything else."""
    if value is None:
        return None
    text = value.strip()
    try:
        if text.isascii() and text.isdigit():
            return check_offset("since", int(text))
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            shown = cut_utf8(value, 64) + ("..." if len(value) > 64 else "")
            raise ValueError(f"since must be an offset or an ISO time, not {shown!r}") from None
        return check_time("since", at if at.tzinfo else at.replace(tzinfo=UTC))
    except ValueError as exc:
        raise invalid("query", "since", str(exc)) from None


def check_position(value: str | None, partitions: int) -> str | None:
    """A ``Last-Event-ID``: ``<partition>:<offset>`` within the topic (a 400 otherwise; the
    subscription then checks it is the cube's partition)."""
    if value is None:
        return None
    try:
        partition, offset = parse_position(value)
        check_offset("offset", offset)
    except ValueError as exc:
        raise HTTPException(400, f"Last-Event-ID: {exc}") from None
    if partition >= partitions:
        raise HTTPException(400, f"Last-Event-ID: no partition {partition} (the topic has "
                                 f"{partitions})")  # fmt: skip
    return value


def stream_slots(request: Request, settings: Settings) -> StreamSlots:
    """The app's update stream slots (made on the first stream)."""
    slots = getattr(request.app.state, "update_streams", None)
    if slots is None:
        slots = StreamSlots(settings.sse_max_streams, settings.sse_max_per_client)
        request.app.state.update_streams = slots
    return slots


class UpdateStream(EventSourceResponse):
    """The stream's response: its slot is released however the response ends."""

    def __init__(self, *args: Any, slot: Slot, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


@router.get(
    "/v1/cubes/{cube_id}/updates",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The update stream."},
        **errors(400, 429),
    },
)
async def updates(
    request: Request,
    svc: ServiceDep,
    cube_id: CubePath,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            description="start: an offset of the cube's partition or an ISO time",
        ),
    ] = None,
    ping: Annotated[float, Query(ge=0.1, le=300, description="keep-alive every N seconds")] = 15,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=POSITION_BYTES,
            pattern=r"^[0-9]{1,10}:[0-9]{1,19}$",
            description="resume after this event (its id: <partition>:<offset>)",
        ),
    ] = None,
) -> EventSourceResponse:
    """Every memory op of the cube from the start point on, as it is committed to the log; each
    event's data is a JSON ``MemoryUpdate`` (op, memory_id, version, text, position, raw op).
    Without ``Last-Event-ID`` or ``since`` the stream starts at the end of the log. 429 (with
    ``Retry-After``) when this process or this client holds its maximum of streams."""
    settings = svc.runtime.settings
    start = parse_since(since)
    after = check_position(last_event_id, settings.partitions)
    client = request.client.host if request.client else "unknown"
    slot = stream_slots(request, settings).acquire(client)
    if isinstance(slot, str):
        raise HTTPException(429, slot, headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        subscription = Subscription(cube_id, since=start, after=after, settings=settings,
                                    commit=False)  # fmt: skip
        try:
            await subscription.start()
        except ValueError as exc:  # a Last-Event-ID of another partition
            raise HTTPException(400, str(exc)) from None
    except BaseException:
        slot.release()
        raise

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async for update in subscription:
                yield ServerSentEvent(data=json.dumps(update.to_json()), id=update.position)
        finally:
            with anyio.CancelScope(shield=True):  # also when cancelled: close the consumer
                await subscription.aclose()
            slot.release()

    shutdown = anyio.Event()  # set by sse-starlette when the server shuts down

    async def end_on_shutdown_or_due() -> None:
        with anyio.move_on_after(settings.sse_max_stream_s):  # None: never due
            await shutdown.wait()
        subscription.close()  # the stream ends: the client gets a complete response

    def close() -> None:
        subscription.close()
        slot.release()

    return UpdateStream(
        events(),
        slot=slot,
        ping=ping,
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
        data_sender_callable=end_on_shutdown_or_due,
        # Stops the reader also when the body is never iterated (a HEAD request).
        background=BackgroundTask(close),
    )


@router.get("/v1/cubes/{cube_id}/updates/recent")
async def recent(
    svc: ServiceDep,
    cube_id: CubePath,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[dict[str, Any]]:
    """The cube's last ``limit`` updates (oldest first; among the partition's last 10,000 ops),
    in the form of the stream's events: a snapshot for clients that poll (the MCP resource)."""
    found = await run_in_threadpool(recent_updates, cube_id, svc.runtime.settings, limit)
    return [update.to_json() for update in found]

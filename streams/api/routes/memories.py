"""Publishing interactions, searching a cube, and looking memories up."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from schemas.limits import BATCH_ITEMS, QUERY_BYTES, TAG_BYTES, TAGS
from sinks.milvus import row_fields
from streams.api.deps import Service, service
from streams.api.limits import CubePath, MemoryPath, QueryTime, errors
from streams.query.search import Result, build_filter
from streams.query.time_travel import PastView, Point, parse_point
from streams.transport.events import (
    Actor,
    Content,
    EventId,
    EventTime,
    Interaction,
    Metadata,
    Role,
    SessionId,
    Speaker,
    TurnId,
    text_check,
    utcnow,
)
from streams.transport.producer import ContentTooLarge, EventTooLarge, PublishError
from streams.transport.topics import QUERIES

router = APIRouter(tags=["memories"])
JSON = "application/json"
ServiceDep = Annotated[Service, Depends(service)]


class InteractionIn(BaseModel):
    """An interaction as an agent posts it; the cube comes from the path. Texts are checked in
    UTF-8 bytes against :mod:`schemas.limits` (a ``maxLength`` here is that many bytes);
    content, speaker and session must not be blank; the content's limit is the deployment's
    ``max_event_bytes`` (413 over it)."""

    content: Content
    speaker: Speaker
    session_id: SessionId = "default"
    turn_id: TurnId | None = None
    actor: Actor = "api"
    role: Role = "USER"
    event_time: EventTime | None = None
    metadata: Metadata = Field(default_factory=dict)
    event_id: EventId | None = None


class Published(BaseModel):
    event_id: str
    topic: str
    partition: int
    offset: int


class SearchHit(BaseModel):
    memory_id: str
    score: float = Field(
        description="Fused rank score over its best possible value: 1.0 is first in both the "
        "dense and the keyword ranking (and said by someone the query names)."
    )
    text: str
    cosine: float = Field(description="Dense similarity of the memory to the query (-1..1).")
    keyword: float = Field(description="BM25 score of the memory for the query (0: no term).")
    dense_rank: int | None
    keyword_rank: int | None
    version: int
    tags: list[str]
    valid_from: int
    valid_to: int
    session_id: str
    turn_id: str
    source_event_id: str


class SearchResponse(BaseModel):
    query_id: str
    hits: list[SearchHit]
    timing_ms: dict[str, float]
    as_of: dict[int, int] | None = Field(
        default=None, description="With as_of: the log offset per partition the fold stopped at."
    )


AsOf = Annotated[
    str | None,
    Query(
        max_length=64,
        description="A past point: an ISO 8601 time (what memstream had recorded by then, "
        "1900 .. 2299) or an offset of the cube's memory-ops partition (0 .. 2^63-1). The "
        "answer is folded from the log. 400 for anything else.",
    ),
]
Tag = Annotated[str, Query(max_length=TAG_BYTES), text_check(TAG_BYTES, control=False)]


def _point(as_of: str) -> Point:
    try:
        return parse_point(as_of)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc


async def _past(svc: Service, cube_id: str, as_of: str) -> PastView:
    """The cube as of a point, in the generation the views showed then (a time after a
    re-extraction folds the new extraction, a time before it the old one)."""
    point = _point(as_of)

    def fold() -> PastView:
        generation = svc.runtime.generation
        if isinstance(point, datetime) and svc.runtime.generations is not None:
            generation = svc.runtime.generations.read().at(point)
        return svc.time_travel.cube(cube_id, point, generation)

    return await run_in_threadpool(fold)


@router.post(
    "/v1/cubes/{cube_id}/interactions",
    response_model=list[Published],
    responses=errors(413, 503),
)
async def publish(
    cube_id: CubePath,
    interactions: Annotated[list[InteractionIn], Body(min_length=1, max_length=BATCH_ITEMS)],
    svc: ServiceDep,
) -> list[Published]:
    """Publish 1 .. 1,000 interactions to the log; returns once the broker acknowledged them.
    413 for content over the deployment's ``max_event_bytes``; 503 when the log did not
    acknowledge them."""
    try:
        events = [
            Interaction(
                cube_id=cube_id,
                **i.model_dump(exclude_none=True, exclude={"event_time", "event_id"}),
                event_time=i.event_time or utcnow(),
                event_id=i.event_id or str(uuid.uuid4()),
            )
            for i in interactions
        ]
    except ValidationError as exc:  # the same rules as InteractionIn: a defence, not a path
        raise RequestValidationError(exc.errors()) from exc
    try:
        delivered = await run_in_threadpool(svc.producer.publish_interactions, events)
    except (ContentTooLarge, EventTooLarge) as exc:
        raise HTTPException(413, str(exc)) from exc
    except PublishError as exc:
        raise HTTPException(503, f"the log did not take the interactions: {exc}") from exc
    return [
        Published(event_id=e.event_id, topic=d.topic, partition=d.partition, offset=d.offset)
        for e, d in zip(events, delivered, strict=True)
    ]


@router.get("/v1/cubes/{cube_id}/search", response_model=SearchResponse,
            responses=errors(400, 503))  # fmt: skip
async def search(
    cube_id: CubePath,
    svc: ServiceDep,
    q: Annotated[
        str,
        Query(min_length=1, max_length=QUERY_BYTES, description="What to look for."),
        text_check(QUERY_BYTES, blank=False),
    ],
    top_k: Annotated[int, Query(ge=1, le=200)] = 10,
    since: QueryTime | None = None,
    until: QueryTime | None = None,
    tags: Annotated[list[Tag] | None, Query(max_length=TAGS)] = None,
    include_history: bool = False,
    actor: Annotated[Actor, Query()] = "api",
    as_of: AsOf = None,
) -> Response:
    """Hybrid search (dense + BM25, fused by RRF); queues a QueryEvent on the API's publishing
    thread (the statistics it feeds are not the caller's wait). With ``as_of``: over the cube's
    memories as they were then (folded from the log)."""
    with svc.runtime.foreground.serving():  # a KV-cache build waits (runtime/foreground.py)
        searcher = svc.stores().searcher
        started = time.perf_counter()
        past = await _past(svc, cube_id, as_of) if as_of else None

        def run() -> tuple[list[Result], dict[str, float]]:
            found = searcher.search(cube_id, q, top_k, since, until, tags, include_history,
                                    memories=past.memories if past else None)  # fmt: skip
            return found, searcher.last_timing  # same thread: this search's timing

        results, timing = await svc.search(run)
        latency = (time.perf_counter() - started) * 1e3
        query_id = str(uuid.uuid4())
        settings = svc.runtime.settings
        svc.events.publish(
            settings.topic(QUERIES.name),
            cube_id,
            QUERIES.record,
            {
                "event_id": query_id,
                "cube_id": cube_id,
                "actor": actor,
                "query": q,
                "top_k": top_k,
                "event_time": utcnow(),
                "results": [{"memory_id": r.memory_id, "score": r.score} for r in results],
                "latency_ms": latency,
            },
        )
        body = {
            "query_id": query_id,
            "hits": [_hit(r) for r in results],
            "timing_ms": {**timing, "total_ms": latency},
            "as_of": past.offsets if past else None,
        }
        # Serialized here, once: returning the models would have FastAPI validate and serialize
        # them again (their schema is still the documented response, see ``response_model``).
        return Response(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), media_type=JSON)


def _hit(r: Result) -> dict[str, Any]:
    """A result as the API shows it: :class:`SearchHit`'s fields, scores rounded for reading."""
    row = r.row
    return {
        "memory_id": r.memory_id,
        "score": round(float(r.score), 4),
        "text": r.text,
        "cosine": round(float(r.cosine), 4),
        "keyword": round(float(r.keyword), 3),
        "dense_rank": r.dense_rank,
        "keyword_rank": r.keyword_rank,
        "version": int(row["version"]),
        "tags": list(row.get("tags") or []),
        "valid_from": int(row["valid_from"]),
        "valid_to": int(row["valid_to"]),
        "session_id": row["session_id"],
        "turn_id": row["turn_id"],
        "source_event_id": row["source_event_id"],
    }


@router.get("/v1/memories/{memory_id}", responses=errors(400, 404, 503))
async def memory(memory_id: MemoryPath, svc: ServiceDep, as_of: AsOf = None) -> dict[str, Any]:
    """The memory's state (any status), from the fold of the log: now, or as of a past point."""
    found = svc.views().get(memory_id)
    if found is None:
        raise HTTPException(404, f"no memory {memory_id}")
    if as_of:
        past = await _past(svc, found.cube_id, as_of)
        found = next((m for m in past.memories if m.memory_id == memory_id), None)
        if found is None:
            raise HTTPException(404, f"memory {memory_id} did not exist yet at {as_of}")
    body = asdict(found)
    body.pop("embedding")
    return body


@router.get("/v1/memories/{memory_id}/history", responses=errors(404, 503))
async def history(memory_id: MemoryPath, svc: ServiceDep) -> list[dict[str, Any]]:
    """Every version of the memory and of those it replaced or that replaced it."""
    rows = await run_in_threadpool(svc.stores().history, memory_id)
    if not rows:
        raise HTTPException(404, f"no history for {memory_id}")
    return rows


@router.get("/v1/cubes/{cube_id}/memories", responses=errors(400, 503))
async def memories(
    cube_id: CubePath,
    svc: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=16384)] = 1000,
    as_of: AsOf = None,
) -> list[dict[str, Any]]:
    """The cube's rows in the plaintext view (Milvus), without vectors; with ``as_of``, the
    rows it had then (active memories, with the versions they had), folded from the log."""
    if as_of:
        past = await _past(svc, cube_id, as_of)
        return [row_fields(m) for m in past.memories if m.searchable][:limit]
    expr = build_filter(cube_id, include_history=True)
    return await run_in_threadpool(svc.stores().rows, expr, limit)

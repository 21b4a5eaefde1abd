"""Liveness, readiness and status: what an orchestrator and an operator ask a process."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from streams.api.deps import Service, service
from streams.api.routes.chat import chat_status
from streams.runtime.lag import lags
from streams.transport.topics import COMMANDS, INTERACTIONS, MEMORY_OPS

log = logging.getLogger("memstream.api")
router = APIRouter(tags=["health"])
ServiceDep = Annotated[Service, Depends(service)]


@router.get(
    "/healthz",
    responses={503: {"description": "A processor gave up: the process should be restarted.",
                     "content": {"application/json": {"schema": {"type": "object"}}}}},
)  # fmt: skip
async def healthz(svc: ServiceDep) -> JSONResponse:
    """Liveness: 200 while the process should keep running (no processor gave up)."""
    live = svc.runtime.host.live()
    return JSONResponse({"live": live}, status_code=200 if live else 503)


@router.get(
    "/readyz",
    responses={503: {"description": "Not ready: its reason says why (topics, a processor).",
                     "content": {"application/json": {"schema": {"type": "object"}}}}},
)  # fmt: skip
async def readyz(svc: ServiceDep) -> JSONResponse:
    """Readiness: 200 when every processor runs and has caught up with its inputs; otherwise
    503 and a ``reason`` that says why (topics missing, a processor failing or catching up)."""
    host = svc.runtime.host
    health = host.health()
    ready = host.ready()
    body = {"ready": ready, "reason": None if ready else not_ready_reason(svc, health),
            "topics": {"created": list(svc.runtime.topics.created),
                       "reason": svc.runtime.topics.reason},
            "processors": {n: {k: h[k] for k in ("state", "ready", "restarts", "last_error")}
                           for n, h in health.items()}}  # fmt: skip
    return JSONResponse(body, status_code=200 if ready else 503)


def not_ready_reason(svc: Service, health: dict[str, dict[str, Any]]) -> str:
    """Why the process is not ready, in words: its topics, then each processor that is not."""
    reasons = []
    if svc.runtime.topics.reason:
        reasons.append(svc.runtime.topics.reason)
    if svc.runtime.host.failed.is_set():
        reasons.append("a processor kept failing: the process is stopping")
    for name, h in health.items():
        if h["ready"]:
            continue
        error = f": {h['last_error']}" if h["last_error"] else ""
        if h["state"] == "running":
            why = "not caught up with its inputs yet"
        elif h["state"] == "stalled":
            why = f"no step finished for {h['seconds_since_step']:.0f} s"
        elif h["state"] in ("restarting", "failed"):
            why = f"{h['state']} after {h['restarts']} restarts{error}"
        else:  # starting, stopped
            why = h["state"] + (f" (last error{error})" if error else "")
        reasons.append(f"{name}: {why}")
    return "; ".join(reasons) or "not ready"


def _lag(svc: Service) -> dict[str, int]:
    """Group lag per input; -1 where the broker could not tell (a topic not in its metadata
    yet, a broker away): unknown is never reported as drained."""
    s, generation = svc.runtime.settings, svc.runtime.generation
    reader, views = generation.reader_group(s), generation.views_group(s)
    questions = {"interactions": (reader, s.topic(INTERACTIONS.name)),
                 "commands": (reader, s.topic(COMMANDS.name)),
                 "memory_ops": (views, s.topic(MEMORY_OPS.name))}  # fmt: skip
    try:
        found = lags(s, questions)
    except Exception as exc:  # the metadata itself: nothing is known
        found = dict.fromkeys(questions, exc)
    lag = {}
    for name, value in found.items():
        if isinstance(value, Exception):
            log.warning("lag of %s unknown: %s", name, value)
            lag[name] = -1
        else:
            lag[name] = value
    return lag


@router.get("/v1/status")
async def status(svc: ServiceDep, lag: bool = True) -> dict[str, Any]:
    """Role, processors (state, restarts, counters), group lag, the search working set.

    ``counters`` are per processor (``{"reader": {"interactions": ...}, "views": {...}}``):
    two processors count things of the same name (``dead_lettered`` of the views and of the
    access agent), and one dict for all hid one of them. ``lag=false`` leaves the lag out
    (``null``): it is the one part that asks the broker, so a client that polls for progress
    asks for it only once the counters say it may be done.
    """
    host = svc.runtime.host
    health = host.health()
    counters: dict[str, dict[str, int | float]] = {}
    for name, h in health.items():
        if name.endswith("-next"):  # a replay's processors: see /v1/replay
            continue
        counters[name] = {k: v for k, v in h["stats"].items() if isinstance(v, int | float)}
    failure = None
    if host.failed.is_set():
        failure = "; ".join(f"{n}: {h['last_error']}" for n, h in health.items() if h["last_error"])
    stores = svc.runtime.stores
    return {
        "role": svc.runtime.role,
        "generation": svc.runtime.generation.id,
        "worker_id": svc.runtime.settings.worker_id,
        "caught_up": host.ready(),
        "running": host.live(),
        "failure": failure,
        "lag": await run_in_threadpool(_lag, svc) if lag else None,
        "counters": counters,
        "processors": health,
        "working_set": stores.searcher.working_set.stats() if stores else None,
        "chat": chat_status(svc),
    }

"""Replays: build the next view generation (a rebuild or a re-extraction) and follow it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from streams.api.deps import Service, service
from streams.runtime.generations import READER_SETTINGS, GenerationBusy

router = APIRouter(tags=["replay"])
ServiceDep = Annotated[Service, Depends(service)]


class ReplayRequest(BaseModel):
    mode: Literal["rebuild", "reextract"]
    reader: dict[str, Any] = Field(
        default_factory=dict,
        description="reextract: reader settings of the new generation "
        f"({', '.join(READER_SETTINGS)}).",
    )


@router.post("/v1/replay", status_code=202)
async def start(body: ReplayRequest, svc: ServiceDep) -> dict[str, Any]:
    """Start building the next generation; the live views serve until it has caught up."""
    svc.stores()  # the views process runs and switches the generations
    if body.mode == "rebuild" and body.reader:
        raise HTTPException(400, "a rebuild refolds the same ops: reader settings need reextract")
    try:
        await run_in_threadpool(svc.runtime.replay.start, body.mode, body.reader or None)
    except GenerationBusy as exc:
        raise HTTPException(409, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return await run_in_threadpool(svc.runtime.replay.progress)


@router.get("/v1/replay")
async def progress(svc: ServiceDep) -> dict[str, Any]:
    """The generation pointer (current, next, retired) and the next generation's progress."""
    return await run_in_threadpool(svc.runtime.replay.progress)

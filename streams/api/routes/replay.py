"""Replays: build the next view generation (a rebuild or a re-extraction) and follow it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from schemas.limits import cut_utf8
from streams.api.deps import Service, service
from streams.api.limits import errors
from streams.runtime.generations import (
    READER_SETTINGS,
    GenerationBusy,
    InvalidReaderSettings,
    validate_reader,
)

router = APIRouter(tags=["replay"])
ServiceDep = Annotated[Service, Depends(service)]


class ReplayRequest(BaseModel):
    mode: Literal["rebuild", "reextract"]
    reader: dict[str, Any] = Field(
        default_factory=dict,
        description="reextract: reader settings of the new generation "
        f"({', '.join(READER_SETTINGS)}), checked like the server's own settings.",
    )


def _unprocessable(exc: InvalidReaderSettings) -> HTTPException:
    """422 in FastAPI's documented shape: one error per refused setting, where it is and why
    (the setting's name cut and made valid UTF-8; the value given is not echoed back)."""
    detail = [
        {"loc": ["body", "reader", cut_utf8(str(e["field"]), 128)],
         "msg": cut_utf8(str(e["msg"]), 512), "type": "value_error"}
        for e in exc.errors
    ]  # fmt: skip
    return HTTPException(422, detail)


@router.post("/v1/replay", status_code=202, responses=errors(400, 409, 503))
async def start(body: ReplayRequest, svc: ServiceDep) -> dict[str, Any]:
    """Start building the next generation; the live views serve until it has caught up.
    Reader settings that could not start are refused (422, per setting) and nothing is stored."""
    svc.stores()  # the views process runs and switches the generations
    if body.mode == "rebuild" and body.reader:
        raise HTTPException(400, "a rebuild refolds the same ops: reader settings need reextract")
    try:
        validate_reader(body.reader, svc.runtime.settings)
        await run_in_threadpool(svc.runtime.replay.start, body.mode, body.reader or None)
    except InvalidReaderSettings as exc:
        raise _unprocessable(exc) from exc
    except GenerationBusy as exc:
        raise HTTPException(409, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return await run_in_threadpool(svc.runtime.replay.progress)


@router.get("/v1/replay", responses=errors(503))
async def progress(svc: ServiceDep) -> dict[str, Any]:
    """The generation pointer (current, next, retired, failed: the abandoned ones and why) and
    the next generation's progress."""
    return await run_in_threadpool(svc.runtime.replay.progress)

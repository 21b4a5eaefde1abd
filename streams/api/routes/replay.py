"""Replays: build the next view generation (a rebuild or a re-extraction) and follow it."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from streams.api.deps import Service, service
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
    """422 in FastAPI's own shape: one error per refused setting, where it is and why."""
    detail = [
        {"loc": ["body", "reader", e["field"]], "msg": e["msg"], "type": "value_error",
         "input": _jsonable(e["input"])}
        for e in exc.errors
    ]  # fmt: skip
    return HTTPException(422, detail)


def _jsonable(value: Any) -> Any:
    """The input as given, or its repr when JSON cannot carry it (NaN, infinity)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


@router.post("/v1/replay", status_code=202)
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


@router.get("/v1/replay")
async def progress(svc: ServiceDep) -> dict[str, Any]:
    """The generation pointer (current, next, retired, failed: the abandoned ones and why) and
    the next generation's progress."""
    return await run_in_threadpool(svc.runtime.replay.progress)

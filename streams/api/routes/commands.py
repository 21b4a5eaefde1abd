"""Sending a command to the writer (ARCHIVE, DELETE, ...) and reading what it became."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from schemas.limits import ID_BYTES, REASON_BYTES, VERSION_MAX
from streams.api.deps import Service, service
from streams.api.limits import CubePath, errors, json_int
from streams.transport.events import Actor, EventTime, bounded, utcnow
from streams.transport.producer import EventTooLarge, PublishError
from streams.transport.topics import COMMANDS

router = APIRouter(tags=["commands"])
ServiceDep = Annotated[Service, Depends(service)]
Id = bounded(ID_BYTES, 1, blank=False)
Reason = bounded(REASON_BYTES)
Version = json_int(ge=1, le=VERSION_MAX)


class CommandIn(BaseModel):
    """A request to change a memory; the writer checks it and records the outcome."""

    memory_id: Id
    command: Literal["ACTIVATE", "DEACTIVATE", "ARCHIVE", "RESTORE", "EXPIRE", "DELETE"]
    issued_by: Actor = "api"
    reason: Reason = ""
    expected_version: Version | None = Field(
        default=None,
        description="Apply only while the memory is at this version (versions start at 1).",
    )
    command_id: Id | None = Field(
        default=None, description="Deterministic id; a repeated command is applied once."
    )
    event_time: EventTime | None = None


class CommandAccepted(BaseModel):
    command_id: str
    partition: int
    offset: int


@router.post("/v1/cubes/{cube_id}/commands", response_model=CommandAccepted, status_code=202,
             responses=errors(413, 503))  # fmt: skip
async def send_command(cube_id: CubePath, body: CommandIn, svc: ServiceDep) -> CommandAccepted:
    """Publish a command on ``commands`` (keyed by cube); its result appears in the
    ``command_results`` audit table once the writer has handled it."""
    command_id = body.command_id or str(uuid.uuid4())
    record = {
        "command_id": command_id,
        "cube_id": cube_id,
        "memory_id": body.memory_id,
        "command": body.command,
        "issued_by": body.issued_by,
        "event_time": body.event_time or utcnow(),
        "reason": body.reason,
        "expected_version": body.expected_version,
        "evidence": {},
        "payload": None,
    }
    topic = svc.runtime.settings.topic(COMMANDS.name)
    try:
        delivered = await run_in_threadpool(
            svc.producer.publish, topic, cube_id, COMMANDS.record, record
        )
    except EventTooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    except PublishError as exc:
        raise HTTPException(503, f"the log did not take the command: {exc}") from exc
    return CommandAccepted(
        command_id=command_id, partition=delivered.partition, offset=delivered.offset
    )

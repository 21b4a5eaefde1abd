"""Sending a command to the writer (ARCHIVE, DELETE, ...) and reading what it became."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from streams.api.deps import Service, service
from streams.transport.events import utcnow
from streams.transport.topics import COMMANDS

router = APIRouter(tags=["commands"])
ServiceDep = Annotated[Service, Depends(service)]


class CommandIn(BaseModel):
    """A request to change a memory; the writer checks it and records the outcome."""

    memory_id: str = Field(min_length=1)
    command: Literal["ACTIVATE", "DEACTIVATE", "ARCHIVE", "RESTORE", "EXPIRE", "DELETE"]
    issued_by: str = "api"
    reason: str = ""
    expected_version: int | None = None
    command_id: str | None = Field(
        default=None, description="Deterministic id; a repeated command is applied once."
    )
    event_time: datetime | None = None


class CommandAccepted(BaseModel):
    command_id: str
    partition: int
    offset: int


@router.post("/v1/cubes/{cube_id}/commands", response_model=CommandAccepted, status_code=202)
async def send_command(cube_id: str, body: CommandIn, svc: ServiceDep) -> CommandAccepted:
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
    delivered = await run_in_threadpool(
        svc.producer.publish, topic, cube_id, COMMANDS.record, record
    )
    return CommandAccepted(
        command_id=command_id, partition=delivered.partition, offset=delivered.offset
    )

"""Typed builders for the events users publish, validated before they reach the log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

Role = Literal["USER", "ASSISTANT", "SYSTEM", "TOOL"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Interaction(BaseModel):
    """One turn an agent saw or said; the input of the whole pipeline."""

    cube_id: str = Field(min_length=1, max_length=256)
    content: str = Field(min_length=1)
    speaker: str = Field(min_length=1, max_length=256)
    session_id: str = Field(default="default", min_length=1, max_length=256)
    turn_id: str | None = None
    actor: str = "sdk"
    role: Role = "USER"
    event_time: datetime = Field(default_factory=utcnow)
    metadata: dict[str, str] = Field(default_factory=dict)
    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()))

    @field_validator("event_time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        """Naive times are taken as UTC so that relative dates resolve the same everywhere."""
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def to_record(self) -> dict[str, Any]:
        return self.model_dump()

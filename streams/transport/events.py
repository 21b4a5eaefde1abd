"""Typed builders for the events users publish, validated before they reach the log.

Every field is checked against :mod:`schemas.limits` (UTF-8 bytes, not blank where a name is
needed, times in the stores' range), by the same rules the writer applies to an interaction that
reached Kafka by another path (:func:`interaction_problem`): what the API accepts, the writer
takes, and what the writer takes, every store can hold.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from schemas.limits import (
    CUBE_ID_BYTES,
    ID_BYTES,
    METADATA_BYTES,
    METADATA_ENTRIES,
    NAME_BYTES,
    SESSION_ID_BYTES,
    TURN_ID_BYTES,
    check_text,
    check_time,
    utf8_size,
)

Role = Literal["USER", "ASSISTANT", "SYSTEM", "TOOL"]


def utcnow() -> datetime:
    return datetime.now(UTC)


#: C0 and C1 control characters (line breaks, tabs, NUL...): none in a name a store filters by
#: (a cube, a tag), which Milvus reads inside a string literal of an expression.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def text_check(max_bytes: int | None, blank: bool = True, control: bool = True) -> AfterValidator:
    """A pydantic validator: valid Unicode (no lone surrogate), at most ``max_bytes`` in UTF-8
    (None: any size), (unless ``blank``) not only whitespace, (unless ``control``) no control
    character."""

    def check(value: str) -> str:
        if max_bytes is None:
            utf8_size(value)
        else:
            check_text("text", value, max_bytes)
        if not blank and not value.strip():
            raise ValueError("must not be blank")
        if not control and CONTROL.search(value):
            raise ValueError("must not hold a control character (a line break, a tab...)")
        return value

    return AfterValidator(check)


def bounded(
    max_bytes: int, min_length: int = 0, blank: bool = True, control: bool = True, **field: Any
) -> Any:
    """``str`` of at most ``max_bytes`` UTF-8 bytes (documented as that many characters: a
    bound in bytes is also one in characters), valid Unicode, not blank unless allowed, without
    control characters where not allowed."""
    return Annotated[
        str,
        Field(min_length=min_length, max_length=max_bytes, **field),
        text_check(max_bytes, blank, control),
    ]


def iso_time(value: Any) -> Any:
    """A time is an ISO 8601 string (or a datetime): not a number, nor a string of one, whatever
    pydantic could make of it (a Unix time; the documented type is a ``date-time`` string)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _NUMBER.match(value.strip()):
        raise ValueError("a time is an ISO 8601 date-time string")
    return value


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _time(value: datetime) -> datetime:
    """Naive times are taken as UTC (relative dates then resolve the same everywhere); a time
    outside the stores' range is refused."""
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return check_time("the time", value)


def _metadata(value: dict[str, str]) -> dict[str, str]:
    size = sum(utf8_size(k) + utf8_size(v) for k, v in value.items())
    if size > METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes in UTF-8, over the limit of {METADATA_BYTES}")
    return value


#: The fields of an interaction (and of the API's requests that carry them), with their limits.
CubeId = bounded(CUBE_ID_BYTES, 1, blank=False, control=False)
SessionId = bounded(SESSION_ID_BYTES, 1, blank=False)
Speaker = bounded(NAME_BYTES, 1, blank=False)
Actor = bounded(NAME_BYTES)
TurnId = bounded(TURN_ID_BYTES)
EventId = bounded(ID_BYTES, 1, blank=False)
#: The content's limit is the deployment's ``max_event_bytes`` (the producer checks it: 413).
Content = Annotated[str, Field(min_length=1), text_check(None, blank=False)]
EventTime = Annotated[
    datetime,
    BeforeValidator(iso_time),
    AfterValidator(_time),
    Field(description="Between 1900-01-01 and 2299-12-31 (the stores' range); naive is UTC."),
]
Metadata = Annotated[
    dict[str, str],
    Field(
        max_length=METADATA_ENTRIES,
        description=f"At most {METADATA_ENTRIES} entries, {METADATA_BYTES} bytes of keys and "
        "values together.",
    ),
    AfterValidator(_metadata),
]


class Interaction(BaseModel):
    """One turn an agent saw or said; the input of the whole pipeline."""

    cube_id: CubeId
    content: Content
    speaker: Speaker
    session_id: SessionId = "default"
    turn_id: TurnId | None = None
    actor: Actor = "sdk"
    role: Role = "USER"
    event_time: EventTime = Field(default_factory=utcnow)
    metadata: Metadata = Field(default_factory=dict)
    event_id: EventId = Field(default_factory=lambda: str(uuid.uuid4()))

    def to_record(self) -> dict[str, Any]:
        return self.model_dump()


#: (field, limit in bytes, may be blank) of an Interaction record's text fields.
_TEXT_FIELDS = (
    ("cube_id", CUBE_ID_BYTES, False),
    ("speaker", NAME_BYTES, False),
    ("session_id", SESSION_ID_BYTES, False),
    ("turn_id", TURN_ID_BYTES, True),
    ("actor", NAME_BYTES, True),
    ("event_id", ID_BYTES, True),
)


def interaction_problem(record: Mapping[str, Any], max_content_bytes: int) -> str | None:
    """Why a decoded Interaction record breaks the limits of :class:`Interaction`, or None.

    The writer's check of an event that reached the log without the API (a producer of its
    own): the same limits, so nothing it takes can be refused by a store later.
    """
    for name, limit, blank in _TEXT_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        size = len(value.encode("utf-8"))  # Avro strings are valid UTF-8
        if size > limit:
            return f"{name} is {size} bytes, over the limit of {limit}"
        if not blank and not value.strip():
            return f"missing {name}"
        if name == "cube_id" and CONTROL.search(value):
            return "cube_id holds a control character"
    content = record["content"]
    if not content.strip():
        return "empty content"
    size = len(content.encode("utf-8"))
    if size > max_content_bytes:
        return f"content is {size} bytes, over the limit of {max_content_bytes}"
    metadata = record.get("metadata") or {}
    if len(metadata) > METADATA_ENTRIES:
        return f"metadata has {len(metadata)} entries, over the limit of {METADATA_ENTRIES}"
    size = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in metadata.items())
    if size > METADATA_BYTES:
        return f"metadata is {size} bytes, over the limit of {METADATA_BYTES}"
    try:
        check_time("event_time", record["event_time"])
    except ValueError as exc:
        return str(exc)
    return None

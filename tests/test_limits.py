"""The limits of schemas/limits.py where no service is needed: the reader's cut of long texts,
the writer's check of events that bypassed the API, the dead letter's schema, the API's body
limit, its 422 answers and its update stream slots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import BaseModel

from processors.extract import MemoryItem, RuleExtractor, cut_text, fit
from schemas import Codec
from schemas.limits import (
    BODY_BYTES,
    KEY_BYTES,
    MEMORY_TEXT_BYTES,
    METADATA_BYTES,
    NAME_BYTES,
    TAG_BYTES,
    TAGS,
)
from streams.api.limits import BodyLimit, StreamSlots, validation_error
from streams.pipeline.reader import interaction_validator
from streams.query.time_travel import parse_point
from streams.settings import Settings
from streams.transport.consumer import Event, InvalidEvent
from streams.transport.events import Interaction

NOW = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


# -- the reader's extraction ---------------------------------------------------------------------


def sizes(pieces: list[str]) -> list[int]:
    return [len(p.encode()) for p in pieces]


def test_a_long_text_is_cut_at_whitespace_into_pieces_within_the_limit() -> None:
    text = " ".join(f"word{i}" for i in range(40_000))
    pieces = cut_text(text, MEMORY_TEXT_BYTES)
    assert len(pieces) > 1 and max(sizes(pieces)) <= MEMORY_TEXT_BYTES
    assert " ".join(pieces) == text  # cut between words only
    assert cut_text("short", MEMORY_TEXT_BYTES) == ["short"]


@pytest.mark.parametrize("char", ["x", "é", "€", "🦓"])
def test_a_text_without_whitespace_is_cut_at_a_character_boundary(char: str) -> None:
    text = char * 100_000
    pieces = cut_text(text, 1_001)  # no multiple of 2, 3 or 4 bytes: every cut is tested
    assert max(sizes(pieces)) <= 1_001
    assert "".join(pieces) == text  # nothing lost, no character split (each piece decoded)
    assert all(p and set(p) == {char} for p in pieces)


def test_the_rule_extractor_keeps_every_memory_within_the_stores_limits() -> None:
    speaker = "S" * NAME_BYTES
    long_word = "a" * 300  # a tag over TAG_BYTES
    sentence = " ".join([long_word, *(f"Lisbon{i}" for i in range(20_000))])
    previous_text = " ".join("b" * 2_000 for _ in range(60))  # a long reply context
    from processors.extract import Turn

    interaction = {"speaker": speaker, "content": f"My favorite {'z' * 600} food is soup. "
                   f"Then {sentence} I moved to Porto last year.", "event_time": NOW}  # fmt: skip
    items = RuleExtractor().extract(interaction, Turn("Someone", previous_text, asked=True))
    first = items[0].text
    assert "soup." in first and "(replying to Someone: bbb" in first and first.endswith(" ...)")
    # A first part that fills a memory goes without the context, not over the limit.
    whole = {**interaction, "content": sentence}
    alone = RuleExtractor().extract(whole, Turn("Someone", previous_text, asked=True))
    assert all(len(i.text.encode()) <= MEMORY_TEXT_BYTES for i in alone)
    assert len(items) > 3
    for item in items:
        assert len(item.text.encode()) <= MEMORY_TEXT_BYTES
        assert len(item.tags) <= TAGS and all(len(t.encode()) <= TAG_BYTES for t in item.tags)
        assert item.key is None or len(item.key.encode()) <= KEY_BYTES
    assert any("replying to Someone" in i.text for i in items)
    assert any("Lisbon19999" in i.text for i in items)


def test_fit_cuts_what_an_llm_returned() -> None:
    tags = (*(f"t{i}" for i in range(100)), "u" * 200)
    item = MemoryItem("y " * 100_000, tags=tags, key="k" * 1_000)
    items = fit([item])
    assert len(items) == 4 and all(len(i.text.encode()) <= MEMORY_TEXT_BYTES for i in items)
    assert len(items[0].tags) == TAGS and "u" * 200 not in items[0].tags
    assert len(items[0].key or "") == KEY_BYTES and all(i.key is None for i in items[1:])


# -- the writer's check of what bypassed the API -------------------------------------------------


def event(topic: str = "t.interactions", **fields: Any) -> Event:
    value = {"event_id": "e", "cube_id": "c", "session_id": "s", "turn_id": None,
             "actor": "a", "speaker": "Caroline", "role": "USER", "content": "hello",
             "event_time": NOW, "metadata": {}, **fields}  # fmt: skip
    return Event(topic, 0, 0, b"c", "Interaction", 1, value, 0)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"content": " "}, "empty content"),
        ({"speaker": ""}, "missing speaker"),
        ({"cube_id": "c" * 257}, "cube_id is 257 bytes"),
        ({"session_id": "é" * 129}, "session_id is 258 bytes"),
        ({"turn_id": "t" * 129}, "turn_id is 129 bytes"),
        ({"event_id": "e" * 65}, "event_id is 65 bytes"),
        ({"metadata": {"k": "v" * METADATA_BYTES}}, "metadata is 16385 bytes"),
        ({"metadata": {str(i): "" for i in range(65)}}, "metadata has 65 entries"),
        ({"event_time": datetime(9999, 1, 1, tzinfo=UTC)}, "outside 1900-01-01"),
        ({"content": "x" * (256 * 1024 + 1)}, "content is 262145 bytes"),
    ],
)
def test_the_writer_refuses_an_interaction_over_a_limit(fields: dict, reason: str) -> None:
    validate = interaction_validator(Settings(topic_prefix="t."))
    validate(event())
    with pytest.raises(InvalidEvent, match=reason):
        validate(event(**fields))


def command(**fields: Any) -> Event:
    from streams.transport.topics import partition_for

    value = {"command_id": "c-1", "cube_id": "c", "memory_id": "m", "command": "ARCHIVE",
             "issued_by": "api", "event_time": NOW, "reason": "", "expected_version": None,
             "evidence": {}, "payload": None, **fields}  # fmt: skip
    return Event("t.commands", partition_for(value["cube_id"], 6), 0, b"c", "Command", 4,
                 value, 0)  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"reason": "r" * 5_000}, "reason is 5000 bytes"),
        ({"issued_by": "i" * 300}, "issued_by is 300 bytes"),
        ({"memory_id": "m" * 65}, "memory_id is 65 bytes"),
        ({"evidence": {str(i): 1.0 for i in range(65)}}, "evidence has 65 entries"),
        ({"expected_version": 0}, "expected_version 0"),
    ],
)
def test_the_writer_refuses_a_command_over_a_limit(fields: dict, reason: str) -> None:
    validate = interaction_validator(Settings(topic_prefix="t.", partitions=6))
    validate(command())
    with pytest.raises(InvalidEvent, match=reason):
        validate(command(**fields))


def test_the_api_and_the_writer_agree_on_a_valid_interaction() -> None:
    record = Interaction(cube_id="c", content="hi", speaker="s", event_time=NOW).to_record()
    interaction_validator(Settings(topic_prefix="t."))(event(**record))


# -- the dead letter's schema --------------------------------------------------------------------


def test_a_v1_dead_letter_reads_as_v2_with_nothing_cut() -> None:
    codec = Codec()
    v1 = {"event_id": "d", "source_topic": "t", "partition": 0, "offset": 1, "key": b"k",
          "value": b"v", "error_type": "DecodeError", "error": "bad", "worker": "w",
          "failed_at": NOW}  # fmt: skip
    decoded = codec.decode(codec.encode("DeadLetter", v1, version=1), reader="DeadLetter")
    assert decoded.writer_version == 1
    assert (decoded.record["key_bytes"], decoded.record["value_bytes"]) == (None, None)
    assert decoded.record["error_bytes"] is None and decoded.record["value"] == b"v"


# -- points in time and offsets ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["0001-01-01T00:00:00", "9999-12-31", str(10**30), "²", "-1", "x" * 10_000]
)
def test_a_point_out_of_range_is_a_value_error(value: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_point(value)
    assert len(str(info.value)) < 200


# -- the API's door ------------------------------------------------------------------------------


class Body(BaseModel):
    text: str


@pytest.fixture
def app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, int]:
        return {"bytes": len(body.text)}

    app.add_middleware(BodyLimit, limit=1_000)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app


def test_a_body_over_the_limit_is_413_by_its_length_or_as_it_arrives(app: FastAPI) -> None:
    client = TestClient(app)
    assert client.post("/echo", json={"text": "x" * 100}).json() == {"bytes": 100}
    big = json.dumps({"text": "x" * 2_000}).encode()
    answer = client.post("/echo", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "limit of 1000" in answer.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield from (big[i : i + 100] for i in range(0, len(big), 100))

    answer = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "limit of 1000" in answer.json()["detail"]
    bad = client.post("/echo", content=b"{}", headers={"content-length": "x"})
    assert bad.status_code == 400
    assert BODY_BYTES == 8 * 1024 * 1024


def test_a_422_never_echoes_its_input_and_is_valid_json(app: FastAPI) -> None:
    client = TestClient(app)
    answer = client.post(
        "/echo", content=b'{"text": 1}', headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422
    [item] = answer.json()["detail"]
    assert set(item) == {"loc", "msg", "type"} and item["loc"] == ["body", "text"]


def test_stream_slots_cap_per_client_and_in_all_and_release_once() -> None:
    slots = StreamSlots(total=3, per_client=2)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    assert "client a" in str(slots.acquire("a"))
    b1 = slots.acquire("b")
    assert "maximum of 3" in str(slots.acquire("c"))
    assert not isinstance(a1, str) and not isinstance(a2, str) and not isinstance(b1, str)
    a1.release()
    a1.release()  # idempotent: every way a stream ends may release it
    assert slots.held() == 2
    assert not isinstance(slots.acquire("c"), str)

"""The generation pointer refuses what cannot start and abandons, never retries, what is stored
and still cannot (pure: no MinIO)."""

from __future__ import annotations

import math

import pytest

from streams.runtime.generations import (
    Generation,
    GenerationState,
    InvalidReaderSettings,
    validate_reader,
)
from streams.settings import Settings


@pytest.mark.parametrize(
    ("reader", "field", "why"),
    [
        ({"merge_threshold": "abc"}, "merge_threshold", "valid number"),
        ({"merge_threshold": [0.9]}, "merge_threshold", "valid number"),
        ({"merge_threshold": math.nan}, "merge_threshold", "finite"),
        ({"embedder": "onnx"}, "embedder", "not a setting a re-extraction may change"),
    ],
)
def test_bad_reader_settings_are_refused_with_the_field_and_why(
    reader: dict, field: str, why: str
) -> None:
    with pytest.raises(InvalidReaderSettings) as refused:
        validate_reader(reader, Settings())
    [error] = refused.value.errors
    assert error["field"] == field and why in error["msg"]
    with pytest.raises(InvalidReaderSettings):
        GenerationState().begin("reextract", reader)


def test_good_reader_settings_are_stored_normalised() -> None:
    stored, settings = validate_reader({"merge_threshold": "0.9"}, Settings())
    assert stored == {"merge_threshold": 0.9} and settings.merge_threshold == 0.9
    state = GenerationState().begin("reextract", {"merge_threshold": "0.9"})
    assert state.next is not None and state.next.reader == {"merge_threshold": 0.9}
    assert (state.next.id, state.next.ops, state.next.base) == (1, 1, 0)


def test_a_stored_generation_that_cannot_start_says_why() -> None:
    current = Generation()
    bad = Generation(id=1, ops=1, kind="reextract", reader={"merge_threshold": "abc"})
    assert "merge_threshold" in (bad.problem(current, Settings()) or "")
    with pytest.raises(InvalidReaderSettings):
        bad.reader_settings(Settings())
    assert Generation(id=1, ops=1, kind="reextract").problem(current, Settings()) is None
    assert "not after" in (Generation(id=0, ops=1, kind="reextract").problem(current, Settings())
                           or "")  # fmt: skip
    assert "rebuild" in (Generation(id=1, ops=1, kind="rebuild").problem(current, Settings())
                         or "")  # fmt: skip


def test_an_abandoned_generation_is_on_record_and_its_numbers_are_not_reused() -> None:
    state = GenerationState().begin("reextract", {"merge_threshold": 0.8})
    failed = state.abandoned("its reader failed")
    assert failed.next is None and failed.failed[-1]["reason"] == "its reader failed"
    assert failed.failed[-1]["generation"]["id"] == 1
    again = GenerationState.from_json(failed.to_json()).begin("reextract")
    assert again.next is not None and (again.next.id, again.next.ops, again.next.base) == (2, 2, 0)
    rebuild = failed.begin("rebuild")
    assert rebuild.next is not None and (rebuild.next.id, rebuild.next.ops) == (2, 0)


def test_an_unreadable_next_generation_is_abandoned_when_read() -> None:
    data = GenerationState().to_json()
    for garbage in ("soon", {"id": "x", "ops": 1}, {"id": 1, "ops": 1, "reader": "abc"}):
        state = GenerationState.from_json({**data, "next": garbage})
        assert state.next is None and state.repaired and "unreadable" in state.repaired
        assert state.failed[-1]["generation"] == garbage
    older = {**data, "next": {"id": 1, "ops": 1, "kind": "reextract", "reader": {},
                              "started_at": "x", "gone_field": 1}}  # fmt: skip
    assert GenerationState.from_json(older).next == Generation(id=1, ops=1, kind="reextract",
                                                               started_at="x")  # fmt: skip

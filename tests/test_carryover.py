"""A re-extraction carries over what commands did: deletes, archives and expiries of the old
generation reach the memories re-extracted from the same source items (pure: no broker)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from processors.commands import Carryover, apply_command
from processors.fusion import CubeMemories
from processors.ops import embedding_bytes, make_op, memory_id, plaintext_payload

T0 = datetime(2024, 1, 1, tzinfo=UTC)
CUBE = "alice"


def vector(i: int) -> bytes:
    v = np.zeros(4, dtype=np.float32)
    v[i % 4] = 1.0
    return embedding_bytes(v)


def add(event: str, index: int, generation: int, text: str, version: int = 1) -> dict[str, Any]:
    mid = memory_id(CUBE, event, index, generation)
    return make_op(event_id=f"add/{mid}", cube_id=CUBE, memory_id=mid, version=version,
                   op="ADD", event_time=T0, actor="memreader/test", caused_by=[event],
                   payload=plaintext_payload(text, vector(index), "m", source={"event_id": event}),
                   generation=generation)  # fmt: skip


def merge(old: str, event: str, index: int, generation: int, text: str) -> list[dict[str, Any]]:
    """The reader's two ops when item ``index`` of ``event`` repeats memory ``old`` (v1)."""
    new = memory_id(CUBE, event, index, generation)
    return [
        make_op(event_id=f"merge/{old}", cube_id=CUBE, memory_id=old, version=2, op="MERGE",
                event_time=T0, actor="memreader/test", caused_by=[event], superseded_by=new,
                generation=generation),
        make_op(event_id=f"merge/{new}", cube_id=CUBE, memory_id=new, version=1, op="MERGE",
                event_time=T0, actor="memreader/test", caused_by=["e-old", event],
                supersedes=[old], generation=generation,
                payload=plaintext_payload(text, vector(index), "m", source={"event_id": event})),
    ]  # fmt: skip


def command(kind: str, cid: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"command_id": cid, "cube_id": CUBE, "memory_id": target, "command": kind,
            "issued_by": "api", "event_time": T0 + timedelta(days=1), "reason": "user asked",
            "expected_version": extra.get("expected_version"), "evidence": {},
            "payload": None}  # fmt: skip


def old_generation() -> tuple[CubeMemories, list[dict[str, Any]]]:
    """Generation 0: e1 item 0 deleted; e2 item 0 merged into e3 item 0, which was deleted;
    e4 item 0 archived then restored then archived; e5 kept."""
    fold, log = CubeMemories(4), []

    def emit(ops: list[dict[str, Any]]) -> None:
        for op in ops:
            fold.apply(op)
            log.append(op)

    emit([add("e1", 0, 0, "one"), add("e2", 0, 0, "two"), add("e4", 0, 0, "four"),
          add("e5", 0, 0, "five")])  # fmt: skip
    emit(merge(memory_id(CUBE, "e2", 0, 0), "e3", 0, 0, "two again"))
    for kind, cid, event in (("DELETE", "c1", "e1"), ("DELETE", "c2", "e3"),
                             ("ARCHIVE", "c3", "e4"), ("RESTORE", "c4", "e4"),
                             ("ARCHIVE", "c5", "e4")):  # fmt: skip
        outcome = apply_command(fold, command(kind, cid, memory_id(CUBE, event, 0, 0)))
        assert outcome.status == "APPLIED", outcome.reason
        log.extend(outcome.ops)
    return fold, log


def carryover(log: list[dict[str, Any]]) -> Carryover:
    carry = Carryover(0, 1)
    for position, op in enumerate(log):
        carry.observe(op, position)
    return carry


def test_effects_reach_the_memories_of_the_same_items_and_the_merged_ones() -> None:
    _, log = old_generation()
    carry, new = carryover(log), CubeMemories(4)
    # Generation 1 never merges: e2 and e3 are two memories, both held by the deleted one.
    statuses = {}
    for event in ("e1", "e2", "e3", "e4", "e5"):
        op = add(event, 0, 1, event)
        new.apply(op)
        ops = carry.carry(new, op["memory_id"])
        statuses[event] = new.get(op["memory_id"]).status
        assert all(o["generation"] == 1 for o in ops)
    assert statuses == {"e1": "deleted", "e2": "deleted", "e3": "deleted", "e4": "archived",
                        "e5": "active"}  # fmt: skip
    e4 = new.get(memory_id(CUBE, "e4", 0, 1))
    assert e4.version == 4 and {"c3", "c4", "c5"} <= set(e4.caused_by)
    e2 = new.get(memory_id(CUBE, "e2", 0, 1))
    assert "carried over from ops generation 0: DELETE" in carry_reason(new, log, "e2")
    assert "c2" in e2.caused_by


def carry_reason(new: CubeMemories, log: list[dict[str, Any]], event: str) -> str:
    carry = carryover(log)
    fresh = CubeMemories(4)
    op = add(event, 0, 1, event)
    fresh.apply(op)
    return carry.carry(fresh, op["memory_id"])[-1]["reason"]


def test_carrying_twice_changes_nothing_and_ids_are_deterministic() -> None:
    _, log = old_generation()
    runs = []
    for _ in range(2):
        carry, new = carryover(log), CubeMemories(4)
        op = add("e4", 0, 1, "four")
        new.apply(op)
        first = carry.carry(new, op["memory_id"])
        assert carry.carry(new, op["memory_id"]) == []
        runs.append([(o["event_id"], o["version"], o["op"]) for o in first])
    assert runs[0] == runs[1] and [k for _, _, k in runs[0]] == ["ARCHIVE", "RESTORE", "ARCHIVE"]


def test_an_effect_read_after_the_item_is_carried_to_it() -> None:
    fold, log = old_generation()
    carry, new = carryover(log), CubeMemories(4)
    op = add("e5", 0, 1, "five")
    new.apply(op)
    assert carry.carry(new, op["memory_id"]) == []
    outcome = apply_command(fold, command("EXPIRE", "c9", memory_id(CUBE, "e5", 0, 0)))
    touched = carry.observe(outcome.ops[0], len(log))
    targets = carry.counterparts_of(new, CUBE, touched)
    assert targets == [op["memory_id"]]
    [expired] = carry.carry(new, op["memory_id"])
    assert expired["op"] == "EXPIRE" and new.get(op["memory_id"]).status == "expired"


def test_a_command_naming_an_old_memory_applies_to_its_items() -> None:
    _, log = old_generation()
    carry, new = carryover(log), CubeMemories(4)
    op = add("e5", 0, 1, "five")
    new.apply(op)
    old = memory_id(CUBE, "e5", 0, 0)
    outcome = carry.command(new, command("DELETE", "c10", old))
    assert outcome.status == "APPLIED" and new.get(op["memory_id"]).status == "deleted"
    assert carry.command(new, command("DELETE", "c10", old)).status == "DUPLICATE"
    versioned = carry.command(new, command("ARCHIVE", "c11", old, expected_version=1))
    assert versioned.status == "REJECTED" and "expects v1" in versioned.reason
    unborn = carry.command(new, command("DELETE", "c12", memory_id(CUBE, "e9", 0, 0)))
    assert unborn.status == "REJECTED" and "carried over" in unborn.reason


def test_only_the_base_generation_counts() -> None:
    carry = Carryover(1, 2)
    op = make_op(event_id="x", cube_id=CUBE, memory_id="m", version=2, op="DELETE",
                 event_time=T0, actor="api", caused_by=["c"], generation=0)  # fmt: skip
    assert carry.observe(op, 0) == set()
    assert carry.observe({**op, "generation": 1}, 1) == {"m"}

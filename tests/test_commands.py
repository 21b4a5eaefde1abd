"""Commands checked against the writer's fold: applied once, refused with a reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from processors.commands import apply_command, command_id, result_record
from processors.fusion import CubeMemories
from processors.ops import embedding_bytes, make_op, plaintext_payload

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SOURCE = {"topic": "t", "partition": 0, "offset": 7}


@pytest.fixture
def memories() -> CubeMemories:
    table = CubeMemories(4)
    vector = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    table.apply(
        make_op(event_id="e1", cube_id="cube", memory_id="m1", version=1, op="ADD",
                event_time=T0, actor="test",
                payload=plaintext_payload("a fact", embedding_bytes(vector), "model"))
    )  # fmt: skip
    return table


def command(kind: str, cid: str = "c1", memory: str = "m1", **extra: object) -> dict:
    return {"command_id": cid, "cube_id": extra.pop("cube_id", "cube"), "memory_id": memory,
            "command": kind, "issued_by": "scheduler/test", "event_time": T0 + timedelta(1),
            "reason": "hot", "expected_version": extra.pop("expected_version", None),
            "evidence": {}, "payload": None}  # fmt: skip


def test_applied_command_becomes_the_next_version(memories: CubeMemories) -> None:
    outcome = apply_command(memories, command("ACTIVATE"))
    assert outcome.status == "APPLIED" and outcome.version == 2
    [op] = outcome.ops
    assert (op["op"], op["version"], op["caused_by"], op["actor"]) == (
        "ACTIVATE", 2, ["c1"], "scheduler/test",
    )  # fmt: skip
    assert memories.get("m1").activated and memories.get("m1").version == 2


def test_a_repeated_command_is_applied_once(memories: CubeMemories) -> None:
    first = apply_command(memories, command("ARCHIVE"))
    again = apply_command(memories, command("ARCHIVE"))
    assert first.status == "APPLIED" and again.status == "DUPLICATE" and not again.ops
    assert memories.get("m1").version == 2 and memories.get("m1").status == "archived"


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        (command("DELETE", memory="nope"), "no memory nope"),
        (command("DELETE", cube_id="other"), "belongs to another cube"),
        (command("RESTORE"), "RESTORE is not allowed on a active memory"),
        (command("DEACTIVATE"), "not activated"),
        (command("EXPIRE", expected_version=5), "at v1, the command expected v5"),
    ],
)
def test_refused_commands_say_why_and_change_nothing(
    memories: CubeMemories, cmd: dict, reason: str
) -> None:
    outcome = apply_command(memories, cmd)
    assert outcome.status == "REJECTED" and reason in outcome.reason and not outcome.ops
    assert memories.get("m1").version == 1


def test_results_and_ids_are_deterministic(memories: CubeMemories) -> None:
    assert command_id("scheduler", "m1", "hot") == command_id("scheduler", "m1", "hot")
    assert command_id("scheduler", "m1", "hot") != command_id("scheduler", "m1", "cold")
    cmd = command("ARCHIVE")
    outcome = apply_command(memories, cmd)
    one, two = result_record(cmd, outcome, SOURCE), result_record(cmd, outcome, SOURCE)
    assert one == two and one["status"] == "APPLIED"
    moved = result_record(cmd, outcome, {**SOURCE, "offset": 8})
    assert moved["event_id"] != one["event_id"]

"""CREATE of activation and parameter memories through the writer's checks, rollback as one
ARCHIVE (RESTORE rolls forward), evidence kept in the op's reason, Command v1/v2 read as v3, and
the views that must not take a non-plaintext memory for a searchable one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from processors.commands import (
    apply_command,
    create_command,
    created_memory_id,
    current_memory,
    evidence_of,
    with_evidence,
)
from processors.fold import MemoryTable
from processors.fusion import CubeMemories
from processors.ops import (
    ACTIVATION_PAYLOAD,
    PARAMETER_PAYLOAD,
    embedding_bytes,
    make_op,
    plaintext_payload,
)
from schemas import Codec
from streams.query.working_set import WorkingSet, snapshot_of

T0 = datetime(2024, 1, 1, tzinfo=UTC)
VECTOR = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


def adapter(sha: str, trained_on: tuple[str, ...] = ("m1",)) -> tuple[str, dict]:
    return (
        PARAMETER_PAYLOAD,
        {
            "uri": f"s3://memstream/lora/{sha}.safetensors",
            "base_model_id": "smollm2-135m@abc",
            "base_weights_sha256": "ab" * 32,
            "rank": 8,
            "sha256": sha,
            "trained_on": list(trained_on),
        },
    )


def kv(sha: str) -> tuple[str, dict]:
    return (
        ACTIVATION_PAYLOAD,
        {
            "uri": f"s3://memstream/kv/{sha}.safetensors",
            "model_id": "smollm2-135m@abc",
            "weights_sha256": "ab" * 32,
            "token_count": 256,
            "dtype": "float32",
            "sha256": sha,
            "memory_ids": ["m1"],
        },
    )


@pytest.fixture
def memories() -> CubeMemories:
    table = CubeMemories(4)
    table.apply(
        make_op(
            event_id="e1",
            cube_id="cube",
            memory_id="m1",
            version=1,
            op="ADD",
            event_time=T0,
            actor="test",
            payload=plaintext_payload("a fact", embedding_bytes(VECTOR), "model"),
        )
    )
    return table


def create(payload: tuple[str, dict], days: int, supersedes: tuple[str, ...] = ()) -> dict:
    return create_command("cube", payload, "lora/1", T0 + timedelta(days), supersedes=supersedes)


def test_create_adds_a_parameter_memory_at_v1_with_its_payload(memories: CubeMemories) -> None:
    cmd = create(adapter("aa" * 32), 1)
    assert cmd["memory_id"] == created_memory_id("cube", "PARAMETER", "aa" * 32)
    outcome = apply_command(memories, cmd)
    assert outcome.status == "APPLIED" and outcome.version == 1
    [op] = outcome.ops
    assert (op["op"], op["version"], op["memory_type"], op["caused_by"], op["supersedes"]) == (
        "ADD",
        1,
        "PARAMETER",
        [cmd["command_id"]],
        [],
    )
    assert op["payload"] == adapter("aa" * 32)
    state = memories.get(cmd["memory_id"])
    assert state.status == "active" and state.payload["rank"] == 8 and state.text == ""
    # The op is a valid MemoryOp and folds the same way from the log.
    codec = Codec()
    decoded = codec.decode(codec.encode("MemoryOp", op)).record
    assert MemoryTable().apply(decoded)[0].payload == state.payload
    # The same command again: DUPLICATE, nothing new.
    again = apply_command(memories, cmd)
    assert again.status == "DUPLICATE" and not again.ops


def test_create_ids_follow_the_content_and_the_cube() -> None:
    one, two = create(kv("bb" * 32), 1), create(kv("bb" * 32), 5)
    assert one["command_id"] == two["command_id"] and one["memory_id"] == two["memory_id"]
    assert create(kv("cc" * 32), 1)["memory_id"] != one["memory_id"]
    assert created_memory_id("other", "ACTIVATION", "bb" * 32) != one["memory_id"]
    assert created_memory_id("cube", "PARAMETER", "bb" * 32) != one["memory_id"]
    with pytest.raises(ValueError, match="activation or parameter"):
        create_command("cube", plaintext_payload("x", b"", "m"), "lora/1", T0)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda c: {**c, "memory_id": "m-chosen"}, "is not the id of this content"),
        (lambda c: {**c, "payload": None}, "carries no payload"),
        (lambda c: {**c, "supersedes": ["nope"]}, "supersedes nope, which is not a memory"),
        (lambda c: {**c, "supersedes": ["m1"]}, "a PLAINTEXT memory, not PARAMETER"),
        (lambda c: {**c, "cube_id": "other"}, "is not the id of this content"),
        (lambda c: {**c, "payload": plaintext_payload("x", b"", "m")}, "ACTIVATION or PARAMETER"),
    ],
)
def test_refused_creates_say_why(memories: CubeMemories, mutate: object, reason: str) -> None:
    cmd = mutate(create(adapter("dd" * 32), 1))  # type: ignore[operator]
    outcome = apply_command(memories, cmd)
    assert outcome.status == "REJECTED" and reason in outcome.reason and not outcome.ops
    assert memories.get(create(adapter("dd" * 32), 1)["memory_id"]) is None


def test_the_same_content_under_another_command_is_refused(memories: CubeMemories) -> None:
    first = create(adapter("ee" * 32), 1)
    assert apply_command(memories, first).status == "APPLIED"
    other = create(adapter("ff" * 32), 2)
    assert apply_command(memories, other).status == "APPLIED"
    # The first adapter again, now claiming to replace the second: same id, another command.
    again = create(adapter("ee" * 32), 3, supersedes=(other["memory_id"],))
    outcome = apply_command(memories, again)
    assert outcome.status == "REJECTED" and "already exists (v1, active)" in outcome.reason


def test_rollback_is_one_archive_and_roll_forward_one_restore(memories: CubeMemories) -> None:
    v1 = create(adapter("01" * 32), 1)
    v2 = create(adapter("02" * 32, ("m1", "m2")), 2, supersedes=(v1["memory_id"],))
    for cmd in (v1, v2):
        assert apply_command(memories, cmd).status == "APPLIED"
    assert memories.get(v2["memory_id"]).supersedes == (v1["memory_id"],)
    assert memories.get(v1["memory_id"]).status == "active"  # nothing written on the old one

    def current() -> str | None:
        found = current_memory(memories.table.memories.values(), "cube", "PARAMETER")
        return found.memory_id if found else None

    assert current() == v2["memory_id"]
    rollback = {
        "command_id": "rollback-1",
        "cube_id": "cube",
        "memory_id": v2["memory_id"],
        "command": "ARCHIVE",
        "issued_by": "api",
        "event_time": T0 + timedelta(3),
        "reason": "adapter v2 answers worse",
        "expected_version": 1,
        "evidence": {},
        "payload": None,
    }
    outcome = apply_command(memories, rollback)
    assert outcome.status == "APPLIED" and outcome.ops[0]["memory_type"] == "PARAMETER"
    assert current() == v1["memory_id"]
    forward = {
        **rollback,
        "command_id": "forward-1",
        "command": "RESTORE",
        "expected_version": 2,
        "event_time": T0 + timedelta(4),
    }
    assert apply_command(memories, forward).status == "APPLIED"
    assert current() == v2["memory_id"]
    assert memories.get(v2["memory_id"]).payload["trained_on"] == ["m1", "m2"]
    # Activation memories follow the same rule, separately from parameter ones.
    cache = create(kv("03" * 32), 5)
    assert apply_command(memories, cache).status == "APPLIED"
    assert (
        current_memory(memories.table.memories.values(), "cube", "ACTIVATION").memory_id
        == (cache["memory_id"])
    )
    assert current() == v2["memory_id"]
    assert current_memory(memories.table.memories.values(), "other", "PARAMETER") is None


def test_the_evidence_of_a_command_stays_in_its_op(memories: CubeMemories) -> None:
    evidence = {"heat": 2.5, "hits": 4.0, "best_rank": 1.0, "last_hit_ms": 1709283600123.0}
    cmd = {
        "command_id": "c-hot",
        "cube_id": "cube",
        "memory_id": "m1",
        "command": "ACTIVATE",
        "issued_by": "scheduler/0",
        "event_time": T0 + timedelta(1),
        "reason": "hot",
        "expected_version": 1,
        "evidence": evidence,
        "payload": None,
    }
    [op] = apply_command(memories, cmd).ops
    assert op["reason"].startswith("hot [evidence {")
    assert evidence_of(op["reason"]) == evidence
    assert evidence_of("hot") == {} and with_evidence("hot", {}) == "hot"


def test_a_payload_on_anything_but_an_activate_of_a_kv_cache_is_refused(
    memories: CubeMemories,
) -> None:
    cmd = {
        "command_id": "c-p",
        "cube_id": "cube",
        "memory_id": "m1",
        "command": "ACTIVATE",
        "issued_by": "x",
        "event_time": T0,
        "reason": "",
        "expected_version": None,
        "evidence": {},
        "payload": adapter("09" * 32)[1],
    }
    outcome = apply_command(memories, cmd)
    assert outcome.status == "REJECTED" and "payload" in outcome.reason
    assert apply_command(memories, {**cmd, "payload": kv("09" * 32)[1]}).status == "APPLIED"


def test_older_commands_read_as_the_latest_and_a_create_round_trips() -> None:
    codec = Codec()
    assert codec.registry.latest("Command").version == 4
    old = {
        "command_id": "c",
        "cube_id": "cube",
        "memory_id": "m1",
        "command": "ARCHIVE",
        "issued_by": "lifecycle",
        "event_time": T0,
        "reason": "cold",
        "expected_version": 2,
        "evidence": {"age_days": 40.0},
        "payload": None,
    }
    for version in (1, 2, 3):
        decoded = codec.decode(codec.encode("Command", old, version=version))
        assert decoded.writer_version == version
        assert decoded.record["supersedes"] == [] and decoded.record["source_op"] is None
        assert {k: decoded.record[k] for k in old} == old
    cmd = create(adapter("0a" * 32), 1, supersedes=("prev",))
    record = codec.decode(codec.encode("Command", cmd)).record
    assert record["command"] == "CREATE" and record["supersedes"] == ["prev"]
    assert record["payload"] == adapter("0a" * 32)[1]
    cache = codec.decode(codec.encode("Command", create(kv("0b" * 32), 1))).record
    assert cache["payload"] == kv("0b" * 32)[1]
    # A decoded (untagged) payload is applied like a built one.
    table = CubeMemories(4)
    assert apply_command(table, record).status == "REJECTED"  # "prev" is not in the cube
    assert apply_command(table, {**record, "supersedes": []}).ops[0]["payload"][0] == (
        PARAMETER_PAYLOAD
    )


def test_non_plaintext_memories_stay_out_of_search_and_fusion(memories: CubeMemories) -> None:
    cache = create(kv("0c" * 32), 1)
    assert apply_command(memories, cache).status == "APPLIED"
    state = memories.get(cache["memory_id"])
    assert not state.searchable and not state.current
    # Fusion's index of the cube holds the plaintext memory only.
    found, score = memories.nearest("cube", VECTOR)
    assert found.memory_id == "m1" and score == pytest.approx(1.0)
    # The search working set takes the plaintext state in and leaves the cache out.
    wide = CubeMemories(384)
    wide.apply(
        make_op(
            event_id="e2",
            cube_id="cube",
            memory_id="m2",
            version=1,
            op="ADD",
            event_time=T0,
            actor="test",
            payload=plaintext_payload("a fact", embedding_bytes(np.ones(384) / 384**0.5), "model"),
        )
    )
    working = WorkingSet(lambda cube_id: [], budget_rows=100)
    working.apply([state])  # a cube with only a cache is not made resident by it
    assert not working.resident("cube")
    working.apply([wide.get("m2"), state])
    snapshot, loaded = working.snapshot("cube")
    assert snapshot.ids == ["m2"] and not loaded
    assert snapshot_of([wide.get("m2"), state]).ids == ["m2"]

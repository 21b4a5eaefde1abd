"""When a cube gets a LoRA adapter: the pure policy and the stability tracker."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from processors.fold import Memory
from processors.lora_policy import (
    LoraPolicy,
    StabilityTracker,
    cube_ops,
    decide_training,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)
POLICY = LoraPolicy(min_memories=3, stable_ops=5)


def memory(n: int, cube: str = "alice", version: int = 1, **kw: object) -> Memory:
    return Memory(memory_id=f"m{n:02d}", cube_id=cube, memory_type="PLAINTEXT", version=version,
                  status="active", created_at=T0, updated_at=T0, text=f"fact number {n}",
                  **kw)  # type: ignore[arg-type]  # fmt: skip


def test_enough_stable_memories_train_on_them_sorted() -> None:
    mems = [memory(3), memory(1), memory(2)]
    decision = decide_training("alice", mems, ops=10, changed_at={"m01": 0, "m02": 2, "m03": 5},
                               policy=POLICY)  # fmt: skip
    assert decision.train, decision.reason
    assert decision.memory_ids == ("m01", "m02", "m03")
    assert decision.texts == ("fact number 1", "fact number 2", "fact number 3")
    assert "no adapter yet" in decision.reason


def test_too_few_memories() -> None:
    decision = decide_training("alice", [memory(1), memory(2)], ops=100, changed_at={},
                               policy=POLICY)  # fmt: skip
    assert not decision.train
    assert decision.memory_ids == ()
    assert "3 needed" in decision.reason


def test_recently_changed_memories_are_not_stable() -> None:
    mems = [memory(1), memory(2), memory(3)]
    # m03 changed 4 ops ago (< 5); a memory missing from changed_at changed just now
    decision = decide_training("alice", mems, ops=10, changed_at={"m01": 0, "m02": 5, "m03": 6},
                               policy=POLICY)  # fmt: skip
    assert not decision.train
    assert decision.reason.startswith("2 of 3")
    assert not decide_training("alice", mems, 10, {"m01": 0, "m02": 0}, policy=POLICY).train


def test_only_current_plaintext_memories_of_the_cube_count() -> None:
    at0 = {f"m{n:02d}": 0 for n in range(10)}
    mems = [
        memory(1),
        memory(2),
        replace(memory(3), status="archived"),
        replace(memory(4), valid_to=T0),  # closed by a newer fact
        replace(memory(5), memory_type="ACTIVATION"),
        memory(6, cube="bob"),
        replace(memory(7), text="   "),
    ]
    decision = decide_training("alice", mems, ops=50, changed_at=at0, policy=POLICY)
    assert not decision.train
    assert decision.reason.startswith("2 of 2")
    decision = decide_training("alice", [*mems, memory(8)], ops=50, changed_at=at0, policy=POLICY)
    assert decision.train and decision.memory_ids == ("m01", "m02", "m08")


def test_not_retrained_on_what_the_adapter_learned() -> None:
    mems = [memory(1), memory(2), memory(3)]
    at0 = {m.memory_id: 0 for m in mems}
    same = decide_training("alice", mems, 20, at0, trained_on=("m01", "m02", "m03"),
                           policy=POLICY)  # fmt: skip
    assert not same.train and "learned these memories" in same.reason
    more = decide_training("alice", [*mems, memory(4)], 20, {**at0, "m04": 0},
                           trained_on=("m01", "m02", "m03"), policy=POLICY)  # fmt: skip
    assert more.train and "new memories since the last adapter" in more.reason
    strict = replace(POLICY, min_changed=2)
    assert not decide_training("alice", [*mems, memory(4)], 20, {**at0, "m04": 0},
                               trained_on=("m01", "m02", "m03"), policy=strict).train  # fmt: skip


def test_cube_ops_is_the_sum_of_versions() -> None:
    assert cube_ops([memory(1, version=3), memory(2, version=1)]) == 4
    assert cube_ops([]) == 0


def test_tracker_counts_ops_since_each_memory_changed() -> None:
    tracker = StabilityTracker()
    first = [memory(1), memory(2), memory(3)]
    ops, changed = tracker.observe("alice", first)
    assert ops == 3
    assert changed == {"m01": 0, "m02": 0, "m03": 0}  # already in the log: stable from op 0
    # m02 is updated (v2) and m04 added: both changed at the cube's op count then
    later = [memory(1), memory(2, version=2), memory(3), memory(4)]
    ops, changed = tracker.observe("alice", later)
    assert ops == 5
    assert changed == {"m01": 0, "m02": 5, "m03": 0, "m04": 5}
    assert not decide_training("alice", later, ops, changed, policy=POLICY).train
    grown = [*later, *(memory(n) for n in range(10, 15))]  # five more ops on the cube
    ops, changed = tracker.observe("alice", grown)
    assert ops == 10 and changed["m02"] == 5 and changed["m10"] == 10
    decision = decide_training("alice", grown, ops, changed, policy=POLICY)
    assert decision.train and decision.memory_ids == ("m01", "m02", "m03", "m04")
    ops, changed = tracker.observe("alice", [memory(1)])  # forgotten memories are dropped
    assert set(changed) == {"m01"}

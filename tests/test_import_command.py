"""IMPORT commands checked against the writer's fold: a cube's history replayed into another
cube with mapped ids, applied once, refused where the target's fold disallows it."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from processors.commands import (
    apply_command,
    command_id,
    import_command,
    import_memory_id,
    result_record,
)
from processors.fusion import CubeMemories
from processors.ops import (
    ACTIVATION_PAYLOAD,
    embedding_bytes,
    make_op,
    plaintext_payload,
)
from schemas import Codec

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SOURCE = {"topic": "t", "partition": 0, "offset": 7}
REF = {"event_id": "i1", "session_id": "s1", "turn_id": "D1:1", "topic": "x.interactions",
       "partition": 3, "offset": 11}  # fmt: skip


def vector(*values: float) -> bytes:
    v = np.array(values, dtype=np.float32)
    return embedding_bytes(v / np.linalg.norm(v))


def fact(text: str, vec: bytes, **extra: Any) -> tuple[str, dict[str, Any]]:
    return plaintext_payload(text, vec, "minilm", tags=["home"], source=REF, **extra)


def history() -> list[dict[str, Any]]:
    """A source cube's log: a fact, a changed fact (UPDATE closes it, ADD of the new one), a
    repeat (MERGE retires one memory, a MERGE creates its successor), an archive."""
    t1, t2, t3 = T0 + timedelta(days=1), T0 + timedelta(days=2), T0 + timedelta(days=3)
    boston, lisbon, cat = vector(1, 0, 0, 0), vector(0, 1, 0, 0), vector(0, 0, 1, 0)
    op = make_op
    return [
        op(event_id="s1", cube_id="src", memory_id="a", version=1, op="ADD", event_time=T0,
           actor="memreader/rules", caused_by=["i1"],
           payload=fact("Ann moved to Boston.", boston, key="ann/home", valid_from=T0)),
        op(event_id="s2", cube_id="src", memory_id="c", version=1, op="ADD", event_time=T0,
           actor="memreader/rules", caused_by=["i2"], payload=fact("Ann has a cat.", cat)),
        op(event_id="s3", cube_id="src", memory_id="a", version=2, op="UPDATE", event_time=t1,
           actor="memreader/rules", caused_by=["i3"], superseded_by="b", reason="newer fact",
           payload=fact("Ann moved to Boston.", boston, key="ann/home", valid_from=T0,
                        valid_to=t1)),
        op(event_id="s4", cube_id="src", memory_id="b", version=1, op="ADD", event_time=t1,
           actor="memreader/rules", caused_by=["i3"], supersedes=["a"],
           payload=fact("Ann moved to Lisbon.", lisbon, key="ann/home", valid_from=t1)),
        op(event_id="s5", cube_id="src", memory_id="c", version=2, op="MERGE", event_time=t2,
           actor="memreader/rules", caused_by=["i4"], superseded_by="d", reason="repeat"),
        op(event_id="s6", cube_id="src", memory_id="d", version=1, op="MERGE", event_time=t2,
           actor="memreader/rules", caused_by=["i2", "i4"], supersedes=["c"], reason="repeat",
           payload=fact("Ann has a cat named Luna.", cat)),
        op(event_id="s7", cube_id="src", memory_id="a", version=3, op="ARCHIVE", event_time=t3,
           actor="scheduler/1", caused_by=["cmd-1"]),
    ]  # fmt: skip


def fold_of(ops: list[dict[str, Any]]) -> CubeMemories:
    memories = CubeMemories(4)
    for op in ops:
        memories.apply(op)
    return memories


def view(memories: CubeMemories, cube: str, ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What an imported cube must equal: each memory's content and lineage, ids named by the
    source memory they came from."""
    back = {target: source for source, target in ids.items()}
    out = {}
    for m in memories.table.in_cube(cube):
        state = asdict(m)
        out[back[m.memory_id]] = {
            **{k: state[k] for k in ("version", "status", "text", "key", "tags", "embedding",
                                     "embedding_model", "valid_from", "valid_to", "source",
                                     "memory_type", "created_at", "updated_at")},
            "supersedes": [back[s] for s in m.supersedes],
            "superseded_by": back.get(m.superseded_by),
        }  # fmt: skip
    return out


def test_a_replayed_history_folds_to_the_source_view_with_mapped_ids() -> None:
    ops = history()
    source = fold_of(ops)
    target = CubeMemories(4)
    outcomes = [apply_command(target, import_command("dst", op, "import/src")) for op in ops]
    assert [o.status for o in outcomes] == ["APPLIED"] * len(ops)
    assert [o.version for o in outcomes] == [op["version"] for op in ops]
    ids = {m: import_memory_id("dst", m) for m in "abcd"}
    assert view(target, "dst", ids) == view(source, "src", {m: m for m in "abcd"})
    assert target.get(ids["b"]).supersedes == (ids["a"],)
    assert target.get(ids["c"]).status == "merged" and target.get(ids["a"]).status == "archived"
    # the fusion indexes follow: the imported current fact is found by its key
    assert target.by_key("dst", "ann/home").memory_id == ids["b"]


def test_the_op_is_the_writers_with_deterministic_ids_and_provenance() -> None:
    [add, *_] = history()
    cmd = import_command("dst", add, "import/src")
    assert cmd["command_id"] == command_id("import", "dst", "s1")
    assert cmd["memory_id"] == import_memory_id("dst", "a") != import_memory_id("other", "a")
    [op] = apply_command(CubeMemories(4), cmd).ops
    [again] = apply_command(CubeMemories(4), import_command("dst", add, "import/src")).ops
    assert op == again and op["event_id"] != add["event_id"]
    assert (op["cube_id"], op["version"], op["actor"], op["event_time"]) == (
        "dst", 1, "import/src", T0,
    )  # fmt: skip
    assert op["caused_by"] == [cmd["command_id"], "i1"]
    assert op["payload"][1] == add["payload"][1]  # text, vector, key, tags, validity, source


def test_importing_the_same_ops_again_is_duplicate_and_adds_nothing() -> None:
    ops = history()
    target = CubeMemories(4)
    for op in ops:
        apply_command(target, import_command("dst", op, "import/src"))
    before = {m.memory_id: m for m in target.table.in_cube("dst")}
    again = [apply_command(target, import_command("dst", op, "import/src")) for op in ops]
    assert {o.status for o in again} == {"DUPLICATE"} and not any(o.ops for o in again)
    assert {m.memory_id: m for m in target.table.in_cube("dst")} == before


def archived_target() -> tuple[CubeMemories, list[dict[str, Any]]]:
    """A target that imported the first two ops, then archived the imported memory itself."""
    ops = history()
    target = CubeMemories(4)
    apply_command(target, import_command("dst", ops[0], "import/src"))
    archive = {"command_id": "local", "cube_id": "dst", "memory_id": import_memory_id("dst", "a"),
               "command": "ARCHIVE", "issued_by": "scheduler/dst", "event_time": T0,
               "reason": "", "expected_version": None, "evidence": {}, "payload": None}  # fmt: skip
    assert apply_command(target, archive).status == "APPLIED"
    return target, ops


@pytest.mark.parametrize(
    ("fresh", "build", "reason"),
    [
        # the update of a memory whose ADD the target never got
        (True, lambda ops: import_command("dst", ops[2], "i"),
         "UPDATE v2 of a memory the cube does not hold"),
        # the target's fold moved on: its memory is archived, the source updates it
        (False, lambda ops: import_command("dst", ops[2], "i"),
         "UPDATE is not allowed on a archived memory"),
        # the same source memory created again by another op (another export of it)
        (False, lambda ops: import_command("dst", {**ops[0], "event_id": "other"}, "i"),
         "ADD of a memory the cube already holds (v2, archived)"),
        (False, lambda ops: {**import_command("dst", ops[1], "i"), "memory_id": "m-x"},
         "memory m-x is not the import of c into dst"),
        (False, lambda ops: {**import_command("dst", ops[1], "i"), "source_op": None},
         "IMPORT carries no source op"),
    ],
)  # fmt: skip
def test_refused_imports_say_why_and_change_nothing(fresh: bool, build: Any, reason: str) -> None:
    target, ops = (CubeMemories(4), history()) if fresh else archived_target()
    before = {m.memory_id: m for m in target.table.in_cube("dst")}
    outcome = apply_command(target, build(ops))
    assert outcome.status == "REJECTED" and reason in outcome.reason, outcome.reason
    assert not outcome.ops and {m.memory_id: m for m in target.table.in_cube("dst")} == before


def test_an_activation_memory_keeps_its_blob_and_maps_the_memories_it_was_computed_from() -> None:
    cache = {"uri": "s3://memstream/kv/ab.bin", "model_id": "qwen", "token_count": 12,
             "dtype": "float16", "sha256": "ab", "memory_ids": ["a", "b"]}  # fmt: skip
    op = make_op(event_id="k1", cube_id="src", memory_id="k", version=1, op="ADD",
                 memory_type="ACTIVATION", event_time=T0, actor="scheduler/1",
                 payload=(ACTIVATION_PAYLOAD, cache))  # fmt: skip
    [imported] = apply_command(CubeMemories(4), import_command("dst", op, "i")).ops
    branch, payload = imported["payload"]
    assert branch == ACTIVATION_PAYLOAD and imported["memory_type"] == "ACTIVATION"
    assert payload["memory_ids"] == [import_memory_id("dst", "a"), import_memory_id("dst", "b")]
    assert {k: payload[k] for k in ("uri", "sha256", "token_count")} == {
        "uri": cache["uri"], "sha256": "ab", "token_count": 12,
    }  # fmt: skip


def test_an_import_command_survives_the_codec_and_a_v1_command_reads_without_source_op() -> None:
    codec = Codec()
    ops = history()
    cmd = import_command("dst", ops[2], "import/src")
    decoded = codec.decode(codec.encode("Command", cmd), reader="Command")
    assert decoded.writer_version == codec.registry.latest("Command").version
    assert decoded.record["command"] == "IMPORT"
    assert decoded.record["source_op"]["payload"]["valid_to"] == T0 + timedelta(days=1)
    target = fold_of([apply_command(CubeMemories(4), import_command("dst", ops[0], "i")).ops[0]])
    outcome = apply_command(target, decoded.record)
    assert outcome.status == "APPLIED" and outcome.version == 2
    assert target.get(import_memory_id("dst", "a")).valid_to == T0 + timedelta(days=1)
    result = result_record(decoded.record, outcome, SOURCE)
    assert codec.decode(codec.encode("CommandResult", result)).record["command"] == "IMPORT"
    v1 = {k: cmd[k] for k in ("command_id", "cube_id", "memory_id", "issued_by", "event_time")}
    old = codec.decode(codec.encode("Command", {**v1, "command": "ARCHIVE"}, version=1))
    assert old.writer_version == 1 and old.record["source_op"] is None

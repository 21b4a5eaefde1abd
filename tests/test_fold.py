"""The op fold: every op kind, duplicates, out-of-order delivery, invalid transitions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from processors.fold import FoldError, MemoryTable, VersionGap, fold
from processors.ops import embedding_bytes, make_op, plaintext_payload

T0 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


def op(kind: str, version: int, text: str | None = None, **extra: object) -> dict:
    payload = None
    if text is not None:
        payload = plaintext_payload(
            text,
            embedding_bytes([1.0, 0.0]),
            "test-model",
            key=extra.pop("key", None),
            tags=extra.pop("tags", ()),
            valid_from=T0 + timedelta(days=version),
        )
    return make_op(
        event_id=f"ev-{version}-{kind}",
        cube_id="cube",
        memory_id="m1",
        version=version,
        op=kind,
        event_time=T0 + timedelta(days=version),
        actor="test",
        caused_by=[f"src-{version}"],
        payload=payload,
        **extra,
    )


def test_add_creates_an_active_memory() -> None:
    m = fold(None, op("ADD", 1, "Caroline lives in Boston.", key="caroline/city", tags=["boston"]))
    assert m is not None
    assert (m.version, m.status, m.text, m.key, m.tags) == (
        1,
        "active",
        "Caroline lives in Boston.",
        "caroline/city",
        ("boston",),
    )
    assert m.searchable and m.caused_by == ("src-1",)
    assert m.created_at == m.updated_at == T0 + timedelta(days=1)


def test_update_replaces_the_fact_and_keeps_provenance() -> None:
    m = fold(None, op("ADD", 1, "Caroline lives in Boston.", key="caroline/city"))
    m = fold(m, op("UPDATE", 2, "Caroline lives in Lisbon.", key="caroline/city"))
    assert m.text == "Caroline lives in Lisbon."
    assert m.version == 2 and m.valid_from == T0 + timedelta(days=2) and m.valid_to is None
    assert m.caused_by == ("src-1", "src-2")


def test_merge_creates_the_merged_memory_and_retires_the_old_one() -> None:
    old = fold(None, op("ADD", 1, "Caroline paints.", tags=["painting"]))
    new = fold(None, op("MERGE", 1, "Caroline paints a lot.", supersedes=["m1"]))
    assert new.status == "active" and new.supersedes == ("m1",) and new.searchable
    old = fold(old, op("MERGE", 2, superseded_by="m2"))
    assert old.status == "merged" and old.superseded_by == "m2" and not old.searchable
    assert old.text == "Caroline paints." and old.caused_by == ("src-1", "src-2")


def test_merge_without_successor_is_invalid() -> None:
    with pytest.raises(FoldError, match="names no successor"):
        fold(fold(None, op("ADD", 1, "a fact")), op("MERGE", 2))


def test_update_that_closes_a_fact_keeps_it_searchable_but_not_current() -> None:
    m = fold(None, op("ADD", 1, "Caroline lives in Boston.", key="caroline/home"))
    closing = op("UPDATE", 2, "Caroline lives in Boston.", superseded_by="m2")
    closing["payload"][1]["valid_to"] = T0 + timedelta(days=9)
    m = fold(m, closing)
    assert m.searchable and not m.current
    assert m.valid_to == T0 + timedelta(days=9) and m.superseded_by == "m2"


@pytest.mark.parametrize(
    ("kinds", "status", "searchable"),
    [
        (["ARCHIVE"], "archived", False),
        (["ARCHIVE", "RESTORE"], "active", True),
        (["EXPIRE"], "expired", False),
        (["ARCHIVE", "EXPIRE"], "expired", False),
        (["DELETE"], "deleted", False),
        (["ARCHIVE", "DELETE"], "deleted", False),
        (["ACTIVATE"], "active", True),
        (["ACTIVATE", "DEACTIVATE"], "active", True),
    ],
)
def test_lifecycle_ops(kinds: list[str], status: str, searchable: bool) -> None:
    m = fold(None, op("ADD", 1, "a fact"))
    for version, kind in enumerate(kinds, start=2):
        m = fold(m, op(kind, version))
    assert m.status == status
    assert m.searchable is searchable
    assert m.version == len(kinds) + 1
    assert m.activated is (kinds[-1] == "ACTIVATE")


def test_expire_closes_validity() -> None:
    m = fold(fold(None, op("ADD", 1, "a fact")), op("EXPIRE", 2))
    assert m.valid_to == T0 + timedelta(days=2)


@pytest.mark.parametrize(
    ("kinds", "bad"),
    [(["DELETE"], "RESTORE"), (["EXPIRE"], "UPDATE"), (["ARCHIVE"], "MERGE"), ([], "RESTORE")],
)
def test_invalid_transitions_raise(kinds: list[str], bad: str) -> None:
    m = fold(None, op("ADD", 1, "a fact"))
    for version, kind in enumerate(kinds, start=2):
        m = fold(m, op(kind, version))
    with pytest.raises(FoldError, match=f"{bad} is not allowed"):
        fold(m, op(bad, len(kinds) + 2, "x"))


def test_first_op_must_be_add() -> None:
    with pytest.raises(FoldError, match="never added"):
        fold(None, op("UPDATE", 1, "x"))


def test_duplicate_of_an_applied_version_changes_nothing() -> None:
    m1 = fold(None, op("ADD", 1, "a fact"))
    m2 = fold(m1, op("UPDATE", 2, "a newer fact"))
    assert fold(m2, op("UPDATE", 2, "a newer fact")) is m2
    assert fold(m2, op("ADD", 1, "a fact")) is m2


def test_a_skipped_version_is_a_gap() -> None:
    with pytest.raises(VersionGap, match="got v3 of ARCHIVE, expected v2"):
        fold(fold(None, op("ADD", 1, "a fact")), op("ARCHIVE", 3))


def test_table_holds_out_of_order_ops_until_the_gap_fills() -> None:
    ops = [op("ADD", 1, "a"), op("UPDATE", 2, "b"), op("ACTIVATE", 3), op("ARCHIVE", 4)]
    table = MemoryTable()
    assert table.apply(ops[2]) == [] and table.apply(ops[3]) == []
    assert table.get("m1") is None
    assert [m.version for m in table.apply(ops[0])] == [1]
    assert [m.version for m in table.apply(ops[1])] == [2, 3, 4]
    assert table.get("m1").status == "archived" and not table.pending
    assert table.seen == {o["event_id"] for o in ops}


def test_any_delivery_order_with_duplicates_gives_the_in_order_state() -> None:
    ops = [
        op("ADD", 1, "a", tags=["x"]),
        op("UPDATE", 2, "b"),
        op("ACTIVATE", 3),
        op("ARCHIVE", 4),
        op("RESTORE", 5),
        op("MERGE", 6, superseded_by="m9"),
    ]
    expected = None
    for o in ops:
        expected = fold(expected, o)
    rng = random.Random(5)
    for _ in range(50):
        delivery = ops + rng.sample(ops, 3)
        rng.shuffle(delivery)
        table = MemoryTable()
        for o in delivery:
            table.apply(o)
        assert table.get("m1") == expected


def test_an_op_that_fills_a_gap_applies_whatever_its_held_successor_does() -> None:
    """A bad op ahead of a gap (injected, or a writer bug) and then the legitimate op that fills
    the gap: the legitimate one applies, the bad one alone is rejected with its position."""
    table = MemoryTable()
    table.apply(op("ADD", 1, "Caroline lives in Boston."), position=0)
    assert table.apply(op("UPDATE", 3, "planted"), position=1) == []
    assert table.pending
    changed = table.apply(op("DELETE", 2), position=2)
    assert [m.status for m in changed] == ["deleted"]
    assert table.get("m1").status == "deleted" and table.get("m1").version == 2
    assert not table.pending
    [rejected] = table.rejected
    assert rejected.op["op"] == "UPDATE" and rejected.position == 1
    assert "not allowed on a deleted memory" in rejected.reason


def test_a_gap_that_is_never_filled_releases_its_op_after_a_bounded_wait() -> None:
    table = MemoryTable(gap_ops=5)
    table.apply(op("ADD", 1, "Caroline lives in Boston."), position=0)
    table.apply(op("UPDATE", 4, "planted"), position=1)
    for i in range(4):  # other memories' ops: the held op waits
        table.apply({**op("ADD", 1, f"fact {i}"), "memory_id": f"o{i}", "event_id": f"o{i}"})
    assert table.pending and not table.rejected
    table.apply({**op("ADD", 1, "fact 5"), "memory_id": "o5", "event_id": "o5"})
    assert not table.pending  # a snapshot waits for no held op any more
    [rejected] = table.rejected
    assert rejected.position == 1 and "within 5 ops" in rejected.reason
    # The version it skipped still applies when it comes.
    assert [m.version for m in table.apply(op("UPDATE", 2, "Caroline lives in Lisbon."))] == [2]


def test_release_pending_rejects_every_held_op() -> None:
    table = MemoryTable()
    table.apply(op("ADD", 1, "Caroline lives in Boston."))
    table.apply(op("UPDATE", 3, "a"), position=7)
    table.apply(op("UPDATE", 4, "b"), position=8)
    assert table.release_pending("quiet") == 2
    assert not table.pending
    assert sorted(r.position for r in table.rejected) == [7, 8]
    assert table.get("m1").version == 1

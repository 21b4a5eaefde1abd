"""MemScheduler's pure part: heat is the exact decayed sum in any order, the policy keeps the
top-N hot memories activated and demotes the cooled and the displaced, ops are followed like the
fold follows them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.scheduler import (
    Heat,
    SchedulerPolicy,
    Tracked,
    add_hit,
    decay,
    decide,
    track,
)

HALF = 10.0  # seconds
POLICY = SchedulerPolicy(top_n=2, min_heat=1.0, half_life_s=HALF, interval_s=1.0, hysteresis=0.1)
T0 = 1_700_000_000_000
LIVE = Tracked(version=1)

hits = st.lists(
    st.tuples(st.integers(1, 10), st.integers(0, 120_000)), min_size=1, max_size=30
)  # (rank, ms after T0)


def direct(hit_list: list[tuple[int, int]], now_ms: int) -> float:
    return sum((1 / r) * 2 ** (-(now_ms - (T0 + t)) / (HALF * 1000)) for r, t in hit_list)


def folded(hit_list: list[tuple[int, int]]) -> Heat:
    state = Heat()
    for rank, t in hit_list:
        state = add_hit(state, rank, T0 + t, HALF)
    return state


@given(hits, st.randoms())
@settings(max_examples=200, deadline=None)
def test_heat_is_the_decayed_sum_in_any_order(hit_list: list, rng: object) -> None:
    now = T0 + 130_000
    state = folded(hit_list)
    assert state.at(now, HALF) == pytest.approx(direct(hit_list, now), rel=1e-9)
    shuffled = list(hit_list)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    other = folded(shuffled)
    assert other.at(now, HALF) == pytest.approx(state.at(now, HALF), rel=1e-9)
    assert (other.hits, other.best_rank, other.last_hit_ms) == (
        len(hit_list),
        min(r for r, _ in hit_list),
        T0 + max(t for _, t in hit_list),
    )
    assert Heat.from_dict(state.as_dict()) == state


def test_a_hit_halves_every_half_life() -> None:
    state = add_hit(Heat(), 1, T0, HALF)
    assert state.at(T0, HALF) == 1.0
    assert state.at(T0 + 10_000, HALF) == pytest.approx(0.5)
    assert state.at(T0 + 30_000, HALF) == pytest.approx(0.125)
    assert add_hit(Heat(), 4, T0, HALF).heat == 0.25
    assert decay(2.0, 0, 20_000, HALF) == pytest.approx(0.5)
    assert Heat().at(T0, HALF) == 0.0
    with pytest.raises(ValueError):
        add_hit(Heat(), 0, T0, HALF)


def heats(**ranks_at: list[tuple[int, int]]) -> dict[str, Heat]:
    return {m: folded(h) for m, h in ranks_at.items()}


def test_top_n_hot_memories_are_activated_with_their_evidence() -> None:
    h = heats(a=[(1, 0), (1, 0), (1, 0)], b=[(1, 0), (2, 0)], c=[(1, 0), (3, 0)], d=[(5, 0)])
    decisions = decide(POLICY, T0, h, {m: LIVE for m in h})
    assert [(d.kind, d.memory_id) for d in decisions] == [("ACTIVATE", "a"), ("ACTIVATE", "b")]
    a = decisions[0]
    assert a.version == 1 and a.reason.startswith("hot: heat 3.000")
    assert a.evidence["heat"] == 3.0 and a.evidence["hits"] == 3 and a.evidence["best_rank"] == 1
    assert a.evidence["last_hit_ms"] == T0 and a.evidence["place"] == 1
    assert (a.evidence["top_n"], a.evidence["min_heat"], a.evidence["half_life_s"]) == (2, 1, HALF)


def test_cooled_and_displaced_memories_are_deactivated() -> None:
    h = heats(a=[(1, 0), (1, 0)], b=[(1, 0), (1, 0)], c=[(1, 60_000)] * 4)
    on = Tracked(version=2, activated=True)
    tracked = {"a": on, "b": on, "c": LIVE}
    now = T0 + 60_000  # a and b: 2 * 2**-6 = 0.03 < 1, c: 4
    decisions = decide(POLICY, now, h, tracked)
    assert [(d.kind, d.memory_id, d.version) for d in decisions] == [
        ("DEACTIVATE", "a", 2),
        ("DEACTIVATE", "b", 2),
        ("ACTIVATE", "c", 1),
    ]
    assert decisions[0].reason.startswith("cooled: heat 0.031 < 1")
    # Still hot, but two hotter ones take the places: displaced.
    h = heats(a=[(1, 0)] * 2, b=[(1, 0)] * 5, c=[(1, 0)] * 5)
    decisions = decide(POLICY, T0, h, {"a": on, "b": LIVE, "c": LIVE})
    assert next((d.kind, d.memory_id) for d in decisions) == ("DEACTIVATE", "a")
    assert decisions[0].reason.startswith("displaced: heat 2.000 ranks 3")


def test_hysteresis_keeps_an_activated_memory_against_a_slightly_hotter_one() -> None:
    policy = SchedulerPolicy(top_n=1, min_heat=0.5, half_life_s=HALF, interval_s=1.0)
    h = {"old": Heat(1.0, T0, 1, 1, T0), "new": Heat(1.05, T0, 2, 1, T0)}
    on = Tracked(version=3, activated=True)
    assert decide(policy, T0, h, {"old": on, "new": LIVE}) == []
    h["new"] = Heat(1.2, T0, 2, 1, T0)
    kinds = [(d.kind, d.memory_id) for d in decide(policy, T0, h, {"old": on, "new": LIVE})]
    assert kinds == [("DEACTIVATE", "old"), ("ACTIVATE", "new")]


def test_only_active_plaintext_memories_are_candidates() -> None:
    h = heats(a=[(1, 0)] * 3, b=[(1, 0)] * 3, c=[(1, 0)] * 3)
    tracked = {
        "a": Tracked(version=2, status="archived"),
        "b": Tracked(version=1, memory_type="ACTIVATION"),
        "c": Tracked(version=4, status="merged", activated=True),
    }
    # Nothing to activate, and the merged one cannot be deactivated by anyone but a DELETE.
    assert decide(POLICY, T0, h, tracked) == []


@given(
    st.dictionaries(
        st.sampled_from("abcdefgh"),
        st.tuples(st.floats(0, 10), st.booleans()),
        max_size=8,
    ),
    st.integers(0, 4),
)
@settings(max_examples=300, deadline=None)
def test_after_the_decisions_the_activated_set_is_the_top_n_hot(
    table: dict[str, tuple[float, bool]], top_n: int
) -> None:
    policy = SchedulerPolicy(top_n=top_n, min_heat=1.0, half_life_s=HALF, interval_s=1.0)
    h = {m: Heat(heat, T0, 1, 1, T0) for m, (heat, _on) in table.items() if heat > 0}
    tracked = {m: Tracked(version=1, activated=on) for m, (_heat, on) in table.items()}
    decisions = decide(policy, T0, h, tracked)
    after = {m for m, t in tracked.items() if t.activated}
    for d in decisions:
        assert d.version == 1
        if d.kind == "ACTIVATE":
            assert d.memory_id not in after
            after.add(d.memory_id)
        else:
            assert d.memory_id in after
            after.remove(d.memory_id)
    assert len(after) <= top_n
    assert all(h[m].heat >= 1.0 for m in after)
    # Every hot memory left out is no hotter than every one kept (up to the hysteresis).
    kept = [h[m].heat * (1 + policy.hysteresis) for m in after]
    for _m, heat in ((m, x.heat) for m, x in h.items() if x.heat >= 1.0 and m not in after):
        assert len(after) == top_n and all(heat <= k for k in kept)
    # A second decision on the result changes nothing.
    settled = {m: Tracked(version=2, activated=m in after) for m in tracked}
    assert decide(policy, T0, h, settled) == []


def op(kind: str, version: int, memory_type: str = "PLAINTEXT", **extra: object) -> dict:
    return {
        "op": kind,
        "version": version,
        "memory_type": memory_type,
        "actor": "scheduler/0",
        **extra,
    }


def test_ops_are_followed_like_the_fold_and_redeliveries_change_nothing() -> None:
    state = track(Tracked(), op("ADD", 1))
    assert state == Tracked(1, "active", "PLAINTEXT", False) and state.candidate
    state = track(state, op("ACTIVATE", 2))
    assert state.activated and track(state, op("ACTIVATE", 2)) is state
    assert track(state, op("ADD", 1)) is state
    archived = track(state, op("ARCHIVE", 3))
    assert (archived.status, archived.activated, archived.candidate) == ("archived", False, False)
    restored = track(archived, op("RESTORE", 4))
    assert restored.status == "active" and not restored.activated
    assert not track(restored, op("DEACTIVATE", 5)).activated
    assert track(restored, op("UPDATE", 5)).version == 5
    assert track(state, op("MERGE", 3, superseded_by="x")).status == "merged"
    assert track(Tracked(), op("MERGE", 1)).status == "active"  # the new memory of a MERGE
    assert track(state, op("DELETE", 3)).status == "deleted"
    assert not Tracked(1, "active", "PARAMETER").candidate
    # An op whose memory's start this scheduler never saw still gives its version.
    assert track(Tracked(), op("ACTIVATE", 7)) == Tracked(7, "active", "PLAINTEXT", True)
    assert Tracked.from_dict(state.as_dict()) == state and Tracked.from_dict({}) == Tracked()


def test_a_policy_refuses_nonsense() -> None:
    for bad in (
        {"top_n": -1},
        {"min_heat": 0},
        {"half_life_s": 0},
        {"interval_s": 0},
        {"hysteresis": -0.5},
    ):
        with pytest.raises(ValueError):
            SchedulerPolicy(**bad)  # type: ignore[arg-type]
    assert math.isclose(SchedulerPolicy().evidence()["half_life_s"], 1800.0)


def test_a_memory_someone_else_activated_is_pinned() -> None:
    pinned = track(track(Tracked(), op("ADD", 1)), op("ACTIVATE", 2, actor="api"))
    assert pinned.activated and not pinned.by_scheduler
    assert Tracked.from_dict(pinned.as_dict()) == pinned
    h = heats(cold=[(5, 0)], a=[(1, 0)] * 3, b=[(1, 0)] * 3)
    # Cold but pinned: not demoted; and it takes none of the top-2 places.
    decisions = decide(POLICY, T0, h, {"cold": pinned, "a": LIVE, "b": LIVE})
    assert [(d.kind, d.memory_id) for d in decisions] == [("ACTIVATE", "a"), ("ACTIVATE", "b")]
    hot_pinned = {**h, "cold": folded([(1, 0)] * 9)}
    decisions = decide(POLICY, T0, hot_pinned, {"cold": pinned, "a": LIVE, "b": LIVE})
    assert [d.memory_id for d in decisions] == ["a", "b"]

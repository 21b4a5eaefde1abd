"""MemScheduler's pure part: heat, the policy, and the decision of what to (de)activate.

**Heat** is an exponentially decayed sum of rank weights: every time a search returns a memory at
rank ``r`` (a QueryEvent at event time ``t_i``) it adds ``1/r``, and everything decays with a
half-life ``h``::

    heat(now) = sum_i (1 / r_i) * 2 ** (-(now - t_i) / h)

Why this one:

- **Frequency and rerank score in one number.** ``1/r`` is the weight reciprocal-rank fusion
  gives a result in search and the one the access statistics count (the first result is likely
  the one the agent used, the tenth of a top-10 probably skipped), so a memory that leads a few
  searches outranks one that trails many, and MemOS's "rerank score" signal is in it without a
  second scale to balance.
- **Recency without a window edge.** The decay makes a hit lose half its weight every ``h``:
  a memory cools smoothly when the queries move elsewhere, instead of dropping off the end of a
  fixed window (the access agent's 10-minute buckets quantize time too coarsely for a policy
  whose half-life may be seconds, as in the tests, or hours).
- **O(1) state, exact, order-free.** Two floats per memory (the heat and the instant it is
  expressed at) fold any number of hits exactly (:func:`add_hit`); hits delivered out of event
  time order give the same value, so a redelivery or a late event cannot change the decision.
- **No interaction length** (MemoryOS's third term): a QueryEvent does not carry how much of the
  memory the agent used, and text length would favour long memories, which are also the ones
  that cost most to hold as a KV-cache prefix.

Event time drives the hits, the wall clock the decay to "now" at a decision, so a cube stops
being hot when its searches stop.

**The decision** (:func:`decide`): the cube's target set is its ``top_n`` memories by heat among
those at ``min_heat`` or more; memories in it that are not activated get ACTIVATE, activated
memories not in it get DEACTIVATE ("cooled" below ``min_heat``, or "displaced" by hotter ones).
An activated memory ranks with its heat times ``1 + hysteresis``, so two memories of nearly the
same heat do not swap places every interval. The scheduler knows what is activated from the
ACTIVATE / DEACTIVATE ops on memory-ops (:func:`track`), never from its own past commands, which
the writer may have rejected. A memory activated by someone else (an operator's ACTIVATE through
the API) is pinned: the scheduler neither demotes it nor counts it in its ``top_n``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["ACTIVATE", "DEACTIVATE"]


@dataclass(frozen=True)
class SchedulerPolicy:
    """How one cube's activation memory is chosen (from the settings; per-cube policies later).

    ``top_n``: memories kept activated at most; ``min_heat``: the heat a memory needs to be (and
    stay) activated, in units of "one first-ranked hit just now"; ``half_life_s``: how fast heat
    decays; ``interval_s``: how often the cube is decided; ``hysteresis``: the advantage an
    activated memory keeps when ranked against a challenger.
    """

    top_n: int = 8
    min_heat: float = 2.0
    half_life_s: float = 1800.0
    interval_s: float = 30.0
    hysteresis: float = 0.1

    def __post_init__(self) -> None:
        if self.top_n < 0 or self.min_heat <= 0 or self.half_life_s <= 0 or self.interval_s <= 0:
            raise ValueError(f"invalid scheduler policy {self}")
        if self.hysteresis < 0:
            raise ValueError(f"invalid scheduler policy {self}")

    def evidence(self) -> dict[str, float]:
        return {"top_n": float(self.top_n), "min_heat": self.min_heat,
                "half_life_s": self.half_life_s}  # fmt: skip


def decay(heat: float, from_ms: int, to_ms: int, half_life_s: float) -> float:
    """``heat`` expressed at ``from_ms``, decayed (or, backwards, grown) to ``to_ms``."""
    return heat * math.pow(2.0, -(to_ms - from_ms) / (half_life_s * 1000.0))


@dataclass(frozen=True)
class Heat:
    """One memory's decayed heat (as of ``at_ms``) and the plain statistics shown as evidence."""

    heat: float = 0.0
    at_ms: int = 0
    hits: int = 0
    best_rank: int = 0
    last_hit_ms: int = 0

    def at(self, now_ms: int, half_life_s: float) -> float:
        """The heat decayed to ``now_ms``."""
        return decay(self.heat, self.at_ms, now_ms, half_life_s) if self.hits else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"heat": self.heat, "at_ms": self.at_ms, "hits": self.hits,
                "best_rank": self.best_rank, "last_hit_ms": self.last_hit_ms}  # fmt: skip

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Heat:
        if not value.get("hits"):
            return cls()
        return cls(float(value["heat"]), int(value["at_ms"]), int(value["hits"]),
                   int(value["best_rank"]), int(value["last_hit_ms"]))  # fmt: skip


def add_hit(state: Heat, rank: int, when_ms: int, half_life_s: float) -> Heat:
    """Fold one hit at ``rank`` (1 = first) and event time ``when_ms`` into ``state``.

    The sum stays expressed at the latest hit's time, so an out-of-order hit is decayed to it
    and an in-order one decays the sum forward: either way the value equals the direct sum.
    """
    if rank < 1:
        raise ValueError(f"rank {rank} < 1")
    weight = 1.0 / rank
    if not state.hits:
        return Heat(weight, when_ms, 1, rank, when_ms)
    at = max(state.at_ms, when_ms)
    heat = decay(state.heat, state.at_ms, at, half_life_s) + decay(weight, when_ms, at, half_life_s)
    return Heat(heat, at, state.hits + 1, min(state.best_rank, rank),
                max(state.last_hit_ms, when_ms))  # fmt: skip


@dataclass(frozen=True)
class Tracked:
    """What the scheduler knows of a memory from memory-ops: enough to decide, not its content."""

    version: int = 0
    status: str = "active"
    memory_type: str = "PLAINTEXT"
    activated: bool = False
    #: Whether the scheduler's own command activated it; one activated by anyone else (an
    #: operator, the API) is pinned: the scheduler neither counts nor demotes it.
    by_scheduler: bool = True

    @property
    def candidate(self) -> bool:
        """Whether it may be activated: an active plaintext memory (ACTIVATION and PARAMETER
        memories are already the product of activation, not candidates for it)."""
        return self.version > 0 and self.status == "active" and self.memory_type == "PLAINTEXT"

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "status": self.status, "memory_type": self.memory_type,
                "activated": self.activated, "by_scheduler": self.by_scheduler}  # fmt: skip

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Tracked:
        if not value.get("version"):
            return cls()
        return cls(int(value["version"]), str(value["status"]), str(value["memory_type"]),
                   bool(value["activated"]), bool(value.get("by_scheduler", True)))  # fmt: skip


#: What an ADD makes of a memory, and what most memories stay: the scheduler's table leaves this
#: state out (nine ops in ten are plain ADDs; each stored state is a changelog record), and a
#: memory with heat but no stored state is taken to be in it. A wrong guess (its newer op not
#: followed yet) is harmless: the command's ``expected_version`` is then stale, the writer
#: refuses it, and the newer op brings a new decision.
FRESH = Tracked(1, "active", "PLAINTEXT", False)

_STATUS = {"ARCHIVE": "archived", "RESTORE": "active", "EXPIRE": "expired", "DELETE": "deleted"}


def track(state: Tracked, op: Mapping[str, Any]) -> Tracked:
    """Follow one op the way :func:`processors.fold.fold` does, for the fields the scheduler
    needs: a version already seen changes nothing (redeliveries), so does an op of a version
    the scheduler missed the start of (it then only learns from later ops)."""
    kind, version = op["op"], int(op["version"])
    if version <= state.version:
        return state
    if state.version == 0 and version != 1:
        # Ops of a memory whose start this scheduler never saw (e.g. a log trimmed before it):
        # take the version and the status the op implies, as the fold would after them.
        state = Tracked(version - 1, "active", op["memory_type"], False)
    if version == 1:
        return Tracked(1, "merged" if kind == "MERGE" and op.get("superseded_by") else "active",
                       op["memory_type"], False)  # fmt: skip
    if kind == "ACTIVATE":
        by_scheduler = str(op.get("actor", "")).startswith("scheduler/")
        return Tracked(version, state.status, state.memory_type, True, by_scheduler)
    if kind == "DEACTIVATE":
        return Tracked(version, state.status, state.memory_type, False)
    if kind == "MERGE":
        return Tracked(version, "merged", state.memory_type, state.activated)
    if kind in _STATUS:
        activated = state.activated and kind not in {"ARCHIVE", "DELETE"}
        return Tracked(version, _STATUS[kind], state.memory_type, activated)
    return Tracked(version, state.status, state.memory_type, state.activated)  # UPDATE


@dataclass(frozen=True)
class Decision:
    """One command to send: ACTIVATE or DEACTIVATE ``memory_id`` at ``version``, and why."""

    kind: Kind
    memory_id: str
    version: int
    reason: str
    evidence: dict[str, float] = field(default_factory=dict)


def decide(
    policy: SchedulerPolicy,
    now_ms: int,
    heats: Mapping[str, Heat],
    tracked: Mapping[str, Tracked],
) -> list[Decision]:
    """What one cube needs: ACTIVATE for its hot memories not activated yet, DEACTIVATE for the
    activated ones that cooled or were displaced (see the module docstring). Deterministic:
    ties break by best rank, then memory id; DEACTIVATEs come first (they free the places)."""
    # Only what the scheduler may change: an activated memory that was merged, archived or is
    # not plaintext cannot be deactivated by it (the writer would refuse), so it is left alone.
    # Nor one someone else activated: it is pinned, outside the scheduler's places.
    activated = {m for m, t in tracked.items() if t.activated and t.candidate and t.by_scheduler}
    pinned = {m for m, t in tracked.items() if t.activated and not t.by_scheduler}
    now = {m: h.at(now_ms, policy.half_life_s) for m, h in heats.items()}
    hot = [m for m, heat in now.items() if heat >= policy.min_heat
           and tracked.get(m, Tracked()).candidate and m not in pinned]  # fmt: skip

    def standing(memory_id: str) -> tuple[float, int, str]:
        bonus = 1.0 + policy.hysteresis if memory_id in activated else 1.0
        return (-now[memory_id] * bonus, heats[memory_id].best_rank, memory_id)

    ranked = sorted(hot, key=standing)
    target = ranked[: policy.top_n]
    place = {m: i + 1 for i, m in enumerate(ranked)}
    decisions: list[Decision] = []
    for memory_id in sorted(activated - set(target)):
        heat = now.get(memory_id, 0.0)
        if memory_id in place:
            why = f"displaced: heat {heat:.3f} ranks {place[memory_id]}, top {policy.top_n} kept"
        else:
            why = f"cooled: heat {heat:.3f} < {policy.min_heat:g}"
        decisions.append(_decision("DEACTIVATE", memory_id, tracked, heats, heat, policy, why,
                                   place.get(memory_id, 0)))  # fmt: skip
    for memory_id in target:
        if memory_id in activated:
            continue
        heat = now[memory_id]
        why = (f"hot: heat {heat:.3f} >= {policy.min_heat:g}, "
               f"rank {place[memory_id]} of the top {policy.top_n}")  # fmt: skip
        decisions.append(_decision("ACTIVATE", memory_id, tracked, heats, heat, policy, why,
                                   place[memory_id]))  # fmt: skip
    return decisions


def _decision(
    kind: Kind,
    memory_id: str,
    tracked: Mapping[str, Tracked],
    heats: Mapping[str, Heat],
    heat: float,
    policy: SchedulerPolicy,
    why: str,
    place: int,
) -> Decision:
    stats = heats.get(memory_id, Heat())
    evidence = {
        "heat": round(heat, 6),
        "hits": float(stats.hits),
        "best_rank": float(stats.best_rank),
        "last_hit_ms": float(stats.last_hit_ms),
        "place": float(place),
        **policy.evidence(),
    }
    return Decision(kind, memory_id, tracked[memory_id].version, why, evidence)

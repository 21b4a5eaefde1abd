"""When a cube gets a new LoRA adapter (parameter memory): pure functions over folded memories.

A cube is trained when it has at least ``min_memories`` **stable** memories: current plaintext
memories (active, not closed by a newer fact) that no op has touched for ``stable_ops`` ops of
their cube. A cube's op count is a function of its fold: every op adds one version to one memory
(an ADD or a MERGE's new memory starts at 1), so the sum of its memories' versions is the number
of ops folded for it (:func:`cube_ops`). When a memory last changed is not in the fold, so
:class:`StabilityTracker` records the cube's op count when it first sees a memory's version.

A cube whose stable set is what its current adapter learned (or differs from it by fewer than
``min_changed`` memories) is not retrained: the same texts would give the same adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from processors.fold import Memory


@dataclass(frozen=True)
class LoraPolicy:
    min_memories: int = 8
    stable_ops: int = 20
    min_changed: int = 1


@dataclass(frozen=True)
class TrainingDecision:
    """Whether to train a cube now, on which memories (sorted ids, their texts), and why."""

    cube_id: str
    train: bool
    reason: str
    memory_ids: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()


def cube_ops(memories: Iterable[Memory]) -> int:
    """How many ops a cube's fold has applied: the sum of its memories' versions."""
    return sum(m.version for m in memories)


def decide_training(
    cube_id: str,
    memories: Iterable[Memory],
    ops: int,
    changed_at: Mapping[str, int],
    trained_on: Sequence[str] = (),
    policy: LoraPolicy = LoraPolicy(),
) -> TrainingDecision:
    """Decide whether ``cube_id`` gets a new adapter.

    ``ops`` is the cube's op count now; ``changed_at[memory_id]`` the op count when the memory
    got its current version (a memory missing from it changed just now); ``trained_on`` the
    memory ids of the cube's current adapter.
    """
    current = [m for m in memories if m.cube_id == cube_id and m.current and m.text.strip()]
    stable = sorted(
        (m for m in current if ops - changed_at.get(m.memory_id, ops) >= policy.stable_ops),
        key=lambda m: m.memory_id,
    )
    if len(stable) < policy.min_memories:
        return TrainingDecision(
            cube_id, False,
            f"{len(stable)} of {len(current)} current memories stable for {policy.stable_ops} "
            f"ops, {policy.min_memories} needed",
        )  # fmt: skip
    ids = tuple(m.memory_id for m in stable)
    changed = len(set(ids) ^ set(trained_on))
    if trained_on and changed < policy.min_changed:
        return TrainingDecision(
            cube_id, False,
            f"the current adapter learned these memories ({changed} changed, "
            f"{policy.min_changed} needed)",
        )  # fmt: skip
    why = "new memories since the last adapter" if trained_on else "no adapter yet"
    return TrainingDecision(
        cube_id, True,
        f"{len(stable)} memories stable for {policy.stable_ops} ops ({why}; {changed} changed)",
        ids, tuple(m.text for m in stable),
    )  # fmt: skip


@dataclass
class StabilityTracker:
    """Per cube, the op count at which each memory was last seen changing (its version).

    On the first look at a cube (``observe`` of a cube it has not seen), its memories are taken
    to have changed at op 0: they were in the log before this process, which cannot tell when.
    """

    changed_at: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    def observe(self, cube_id: str, memories: Sequence[Memory]) -> tuple[int, dict[str, int]]:
        """Record ``memories`` (the cube's fold now); return (the cube's ops, changed_at)."""
        ops = cube_ops(memories)
        first = cube_id not in self.changed_at
        seen = self.changed_at.setdefault(cube_id, {})
        for memory in memories:
            known = seen.get(memory.memory_id)
            if known is None or known[0] != memory.version:
                seen[memory.memory_id] = (memory.version, 0 if first else ops)
        live = {m.memory_id for m in memories}
        for memory_id in [k for k in seen if k not in live]:
            del seen[memory_id]
        return ops, {k: at for k, (_, at) in seen.items()}

"""Fusion (MemOperator): is a new item a repeat, a change, or a new fact?

Decisions read only the reader's own fold of the log (:class:`CubeMemories`), never a view, so
they do not depend on how far the sinks have caught up, and reprocessing an event sees the same
state it saw the first time (its item's memory already exists: the item is done, not a repeat).
"""

from __future__ import annotations

import bisect
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np

from processors.extract import own_words
from processors.fold import Memory, MemoryTable, Rejected
from processors.ops import embedding_vector

Decision = Literal["ADD", "MERGE", "UPDATE"]
TurnKey = tuple[int, str]  # a turn's place in its session: (event time in ms, event id)


def turn_key(event_time: datetime, event_id: str) -> TurnKey:
    """Event time, not log offset, orders a session's turns: the same input gives the same key
    in any log, batch or process (milliseconds, as the Avro events carry them)."""
    return int(event_time.timestamp() * 1000), event_id


_DATES = re.compile(r"\(([^()]*\d{4})\)")
REPEAT_OVERLAP = 0.5  # share of the smaller keyword set a repeat must have in common


class VectorIndex:
    """Unit vectors of one cube's current memories, for exact cosine search (grows by doubling)."""

    def __init__(self, dim: int) -> None:
        self._vectors = np.zeros((64, dim), dtype=np.float32)
        self._alive = np.zeros(64, dtype=bool)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}

    def put(self, memory_id: str, vector: np.ndarray) -> None:
        row = self._rows.get(memory_id)
        if row is None:
            row = len(self._ids)
            if row == len(self._alive):
                self._vectors = np.concatenate([self._vectors, np.zeros_like(self._vectors)])
                self._alive = np.concatenate([self._alive, np.zeros_like(self._alive)])
            self._ids.append(memory_id)
            self._rows[memory_id] = row
        self._vectors[row] = vector
        self._alive[row] = True

    def remove(self, memory_id: str) -> None:
        row = self._rows.get(memory_id)
        if row is not None:
            self._alive[row] = False

    def nearest(self, vector: np.ndarray) -> tuple[str | None, float]:
        n = len(self._ids)
        if n == 0 or not self._alive[:n].any():
            return None, -1.0
        scores = self._vectors[:n] @ vector
        scores[~self._alive[:n]] = -2.0
        best = int(np.argmax(scores))
        return self._ids[best], float(scores[best])


class CubeMemories:
    """The reader's view of every cube: the fold of memory-ops plus lookup indexes for fusion.

    Shared by the thread that follows the log and the reader thread; all access holds a lock.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.table = MemoryTable()
        self._vectors: dict[str, VectorIndex] = {}
        self._keys: dict[str, dict[str, str]] = {}
        # (cube, session) -> the turns that made memories, as (event time in ms, event id),
        # sorted: what the reader asks for "the turn before this one".
        self._turns: dict[tuple[str, str], list[TurnKey]] = {}
        self.lock = threading.RLock()

    @property
    def rejected(self) -> deque[Rejected]:
        """Ops the fold held back for a version gap and then refused (see MemoryTable)."""
        return self.table.rejected

    def apply(self, op: dict[str, Any], position: int | None = None) -> list[Memory]:
        """Fold one op and keep the indexes in step; return the memories that changed."""
        with self.lock:
            changed = self.table.apply(op, position)
            for memory in changed:
                self._index(memory)
            return changed

    def get(self, memory_id: str) -> Memory | None:
        with self.lock:
            return self.table.get(memory_id)

    def load(self, states: Iterable[Memory]) -> None:
        """Start from states folded elsewhere (a snapshot of the log), indexes included."""
        with self.lock:
            for memory in states:
                self.table.load([memory])
                self._index(memory)

    def drop_cubes(self, gone: Callable[[str], bool]) -> int:
        """Forget every cube for which ``gone(cube_id)`` holds (its partition moved to another
        worker, whose fold is now the one that decides); return the memories dropped."""
        with self.lock:
            dropped = self.table.drop(lambda m: not gone(m.cube_id))
            for cube_id in [c for c in self._vectors if gone(c)]:
                del self._vectors[cube_id]
            for cube_id in [c for c in self._keys if gone(c)]:
                del self._keys[cube_id]
            for session in [s for s in self._turns if gone(s[0])]:
                del self._turns[session]
            return len(dropped)

    def __len__(self) -> int:
        return len(self.table.memories)

    def turn_before(self, cube_id: str, session_id: str, key: TurnKey) -> TurnKey | None:
        """The latest turn of the session before ``key`` that made a memory, whatever became
        of that memory since."""
        with self.lock:
            turns = self._turns.get((cube_id, session_id), [])
            at = bisect.bisect_left(turns, key)
            return turns[at - 1] if at else None

    def _index(self, memory: Memory) -> None:
        source = memory.source or {}
        if source.get("session_id") and source.get("event_id"):
            turns = self._turns.setdefault((memory.cube_id, source["session_id"]), [])
            key = turn_key(memory.created_at, source["event_id"])
            at = bisect.bisect_left(turns, key)
            if at == len(turns) or turns[at] != key:
                turns.insert(at, key)
        vectors = self._vectors.setdefault(memory.cube_id, VectorIndex(self.dim))
        keys = self._keys.setdefault(memory.cube_id, {})
        if memory.current and memory.embedding:
            vectors.put(memory.memory_id, embedding_vector(memory.embedding))
            if memory.key:
                keys[memory.key] = memory.memory_id
        else:
            vectors.remove(memory.memory_id)
            if memory.key and keys.get(memory.key) == memory.memory_id:
                del keys[memory.key]

    def by_key(self, cube_id: str, key: str) -> Memory | None:
        with self.lock:
            memory_id = self._keys.get(cube_id, {}).get(key)
            return self.table.get(memory_id) if memory_id else None

    def nearest(self, cube_id: str, vector: np.ndarray) -> tuple[Memory | None, float]:
        with self.lock:
            index = self._vectors.get(cube_id)
            if index is None:
                return None, -1.0
            memory_id, score = index.nearest(vector)
            return (self.table.get(memory_id) if memory_id else None), score


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    target: Memory | None = None
    similarity: float = 0.0


def dates_in(text: str) -> set[str]:
    return set(_DATES.findall(text))


def repeats(known: Memory, text: str, tags: Iterable[str]) -> bool:
    """Whether ``text`` can be a repeat of ``known`` besides being close in meaning: the same
    speaker, the same dates (the same words about another day are another event), and most of
    the same content words of their own (a reply quotes the turn it answers, so two memories can
    be close through that quote alone)."""
    if own_words(known.text).speaker != own_words(text).speaker:
        return False
    if dates_in(known.text) != dates_in(text):
        return False
    mine, theirs = set(tags), set(known.tags)
    if not mine and not theirs:
        return True
    return len(mine & theirs) >= REPEAT_OVERLAP * min(len(mine), len(theirs)) > 0


def decide(
    memories: CubeMemories,
    cube_id: str,
    text: str,
    key: str | None,
    vector: np.ndarray,
    merge_threshold: float,
    tags: Iterable[str] = (),
) -> Verdict:
    """ADD a new fact, MERGE a repeat into its earlier copy, or UPDATE a changed fact.

    A repeat is a current memory at cosine >= ``merge_threshold`` that :func:`repeats` allows.
    A change is a current memory with the same subject key whose content differs.
    """
    tags = list(tags)
    if key:
        known = memories.by_key(cube_id, key)
        if known is not None:
            similarity = float(embedding_vector(known.embedding) @ vector)
            if similarity >= merge_threshold and repeats(known, text, tags):
                return Verdict("MERGE", known, similarity)
            return Verdict("UPDATE", known, similarity)
    nearest, similarity = memories.nearest(cube_id, vector)
    if nearest is not None and similarity >= merge_threshold and repeats(nearest, text, tags):
        return Verdict("MERGE", nearest, similarity)
    return Verdict("ADD")


def union(*groups: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(x for group in groups for x in group))

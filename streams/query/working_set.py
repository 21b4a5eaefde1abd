"""The search working set: each hot cube's memories, vectors and BM25 index in process memory.

Every search is scoped to one cube, but an embedded vector store filters by scanning all rows:
milvus-lite answered a cube-filtered search in ~60 ms at 100k memories and ~260 ms at 200k, and
took over a second at 1M: the cost grows with the whole collection, not with the cube. A cube is
a tenant's memory (tens of thousands of items, rarely more), so exact cosine over the cube's own
matrix costs a millisecond or two and ranks exactly (no ANN recall loss). The worker keeps the
working set current from the same memory states it writes to Milvus (:meth:`WorkingSet.apply`),
so a memory is searchable the moment its op is folded; a cube that is not resident (a process
that does not follow the log, or one evicted by the row budget) is loaded from Milvus, the store
of record, on its first search. The budget bounds memory: least recently searched cubes leave
first.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

from processors.embedder import DIM
from processors.extract import own_words
from processors.fold import Memory
from processors.ops import embedding_vector
from sinks.milvus import NO_TIME, epoch_ms, row_fields

Loader = Callable[[str], list[dict[str, Any]]]
# "painted" finds "painting", "de-stress" finds "destress": Snowball English on both sides.
STEMMER = Stemmer.Stemmer("english")


def tokenize(texts: list[str], return_ids: bool = True) -> Any:
    return bm25s.tokenize(texts, stopwords="en", stemmer=STEMMER.stemWords,
                          return_ids=return_ids, show_progress=False)  # fmt: skip


_TERM = re.compile(r"(?u)\b\w\w+\b")  # bm25s.tokenize's default token pattern
_STOPWORDS = frozenset(STOPWORDS_EN)


def query_terms(query: str) -> list[str]:
    """The terms :func:`tokenize` finds in one text, in order, without what it costs per call
    (three progress bars, a stopword set, vocabulary dicts): a fifth of a search's keyword
    ranking. ``tests/test_query_terms.py`` holds the two equal."""
    return STEMMER.stemWords([w for w in _TERM.findall(query.lower()) if w not in _STOPWORDS])


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of one cube: searches read it while the worker prepares the next."""

    ids: list[str]
    rows: list[dict[str, Any]]
    matrix: np.ndarray
    valid_from: np.ndarray
    valid_to: np.ndarray
    bm25: bm25s.BM25 | None
    #: Per row, who said it (the words of the speaker's name, lower case) and whether it only
    #: asks: what ranking weighs, parsed once per build instead of once per hit per search.
    speakers: list[frozenset[str]]
    asked: list[bool]

    def mask(
        self,
        since: datetime | None,
        until: datetime | None,
        tags: list[str] | None,
        include_history: bool,
    ) -> np.ndarray:
        """Rows that pass the filter: the same rules as the Milvus expression in ``search``."""
        keep = np.ones(len(self.ids), dtype=bool)
        if not include_history:
            keep &= self.valid_to == NO_TIME
        if since is not None:
            keep &= self.valid_from >= epoch_ms(since)
        if until is not None:
            keep &= self.valid_from <= epoch_ms(until)
        if tags:
            wanted = {t.lower() for t in tags}
            keep &= np.fromiter(
                (not wanted.isdisjoint(r.get("tags") or ()) for r in self.rows),
                dtype=bool,
                count=len(self.rows),
            )
        return keep

    def dense(self, vector: np.ndarray, keep: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """Exact cosine top-``limit`` among the kept rows (vectors are unit length)."""
        candidates = np.flatnonzero(keep)
        if not len(candidates):
            return []
        scores = self.matrix[candidates] @ vector if len(candidates) < len(keep) else (
            self.matrix @ vector
        )  # fmt: skip
        return _top(candidates, scores, limit)

    def keyword(self, query: str, keep: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """BM25 top-``limit`` among the kept rows, only rows that share a term with the query."""
        if self.bm25 is None:
            return []
        known = [t for t in query_terms(query) if t in self.bm25.vocab_dict]
        if not known:
            return []
        scores = self.bm25.get_scores(known)
        candidates = np.flatnonzero(keep & (scores > 0))
        return _top(candidates, scores[candidates], limit)


def _top(candidates: np.ndarray, scores: np.ndarray, limit: int) -> list[tuple[int, float]]:
    if len(candidates) > limit:
        best = np.argpartition(-scores, limit - 1)[:limit]
        candidates, scores = candidates[best], scores[best]
    order = np.argsort(-scores, kind="stable")
    return [(int(candidates[i]), float(scores[i])) for i in order]


class _Cube:
    """One resident cube: its rows and vectors by memory id, and the snapshot built from them.

    ``version`` counts changes: a snapshot built from an older version is used once, not kept.
    """

    def __init__(self, rows: Iterable[dict[str, Any]] = ()) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.vectors: dict[str, np.ndarray] = {}
        for row in rows:
            self.put({k: v for k, v in row.items() if k != "vector"}, row["vector"])
        self.snapshot: Snapshot | None = None
        self.version = 0
        self.build_lock = threading.Lock()

    def put(self, row: dict[str, Any], vector: np.ndarray) -> None:
        self.rows[row["memory_id"]] = row
        self.vectors[row["memory_id"]] = _unit(np.asarray(vector, dtype=np.float32))

    def remove(self, memory_id: str) -> None:
        self.rows.pop(memory_id, None)
        self.vectors.pop(memory_id, None)

    def restated(self, row: dict[str, Any], vector: np.ndarray) -> bool:
        """Whether ``row`` is a new state of a resident memory whose searchable content (text,
        tags, validity, vector) is unchanged: a version bump, an ACTIVATE or DEACTIVATE. Such a
        change needs no new matrix or BM25 index, only the row a hit shows."""
        old = self.rows.get(row["memory_id"])
        if old is None or any(old[k] != row[k] for k in ("text", "tags", "valid_from", "valid_to")):
            return False
        unit = _unit(np.asarray(vector, dtype=np.float32))
        return bool(np.array_equal(self.vectors[row["memory_id"]], unit))

    def restate(self, rows: dict[str, dict[str, Any]]) -> None:
        """Patch the built snapshot with restated rows (see :meth:`restated`, already in
        ``self.rows``): it becomes a copy of itself with those rows replaced, so the next search
        does not rebuild the cube's index (the scheduler's decisions would otherwise rebuild a
        hot cube after every interval)."""
        if self.snapshot is None or not rows:
            return
        shown = list(self.snapshot.rows)
        for memory_id, row in rows.items():
            shown[bisect_left(self.snapshot.ids, memory_id)] = row
        self.snapshot = replace(self.snapshot, rows=shown)


def _build(rows: dict[str, dict[str, Any]], vectors: dict[str, np.ndarray]) -> Snapshot:
    ids = sorted(rows)
    ordered = [rows[i] for i in ids]
    matrix = np.zeros((len(ids), DIM), dtype=np.float32)
    for n, memory_id in enumerate(ids):
        matrix[n] = vectors[memory_id]
    turns = [own_words(r["text"]) for r in ordered]
    bm25 = None
    if ordered:
        corpus = [f"{r['text']} {' '.join(r.get('tags') or [])}" for r in ordered]
        bm25 = bm25s.BM25()
        bm25.index(tokenize(corpus), show_progress=False)
    return Snapshot(
        ids=ids,
        rows=ordered,
        matrix=matrix,
        valid_from=np.array([r["valid_from"] for r in ordered], dtype=np.int64),
        valid_to=np.array([r["valid_to"] for r in ordered], dtype=np.int64),
        bm25=bm25,
        speakers=[frozenset(t.speaker.lower().split()) for t in turns],
        asked=[t.asked for t in turns],
    )


def snapshot_of(states: Iterable[Memory]) -> Snapshot:
    """A snapshot of the searchable ones of some memory states (a cube as of a past point)."""
    cube = _Cube()
    for m in states:
        if m.searchable and m.memory_type == "PLAINTEXT":
            cube.put(row_fields(m), embedding_vector(m.embedding))
    return _build(cube.rows, cube.vectors)


class WorkingSet:
    """Resident cubes under a row budget, least recently searched evicted first; thread-safe."""

    def __init__(self, loader: Loader, budget_rows: int) -> None:
        self._loader = loader
        self.budget_rows = budget_rows
        self._cubes: OrderedDict[str, _Cube] = OrderedDict()
        self._cold: set[str] = set()
        self._loading: set[str] = set()
        self._changes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.loads = 0
        #: Whether a cube loaded from the store may stay resident: only if this process follows
        #: its changes (the views processor sets it to "my partitions' cubes").
        self.retain: Callable[[str], bool] = lambda cube_id: True

    def stats(self) -> dict[str, int]:
        """Resident cubes and memories, the budget, and cubes read from the store so far."""
        with self._lock:
            rows = sum(len(c.rows) for c in self._cubes.values())
            return {"cubes": len(self._cubes), "memories": rows,
                    "budget": self.budget_rows, "loads": self.loads}  # fmt: skip

    def resident(self, cube_id: str) -> bool:
        with self._lock:
            return cube_id in self._cubes

    def apply(self, states: Iterable[Memory]) -> None:
        """Take the memory states the view was just given: searchable ones in, others out.

        The caller must pass every state of a cube from its first one on, as the ops follower
        does (it folds the log from offset 0); a cube evicted since is left to the store.
        """
        touched: dict[str, list[Memory]] = {}
        for m in states:
            if m.memory_type == "PLAINTEXT":
                touched.setdefault(m.cube_id, []).append(m)
        with self._lock:
            for cube_id, memories in touched.items():
                self._changes[cube_id] = self._changes.get(cube_id, 0) + 1
                cube = self._cubes.get(cube_id)
                if cube is None:
                    if cube_id in self._cold or cube_id in self._loading:
                        continue  # the store has it; a load in flight reads it again
                    cube = self._cubes[cube_id] = _Cube()
                restated: dict[str, dict[str, Any]] = {}
                changed = False
                for m in memories:
                    if not m.searchable:
                        changed |= m.memory_id in cube.rows
                        cube.remove(m.memory_id)
                        continue
                    row, vector = row_fields(m), embedding_vector(m.embedding)
                    if cube.restated(row, vector):
                        cube.rows[m.memory_id] = restated[m.memory_id] = row
                    else:
                        cube.put(row, vector)
                        changed = True
                if changed:
                    cube.snapshot = None
                else:
                    cube.restate(restated)
                cube.version += 1
            self._evict()

    def release(self, gone: Callable[[str], bool]) -> int:
        """Let go of the cubes for which ``gone(cube_id)`` holds (their partition moved to
        another views worker, which now keeps the store current): they are read back from the
        store on their next search. Returns how many were resident."""
        with self._lock:
            leaving = [c for c in self._cubes if gone(c)]
            for cube_id in leaving:
                del self._cubes[cube_id]
                self._cold.add(cube_id)
            return len(leaving)

    def snapshot(self, cube_id: str) -> tuple[Snapshot, bool]:
        """The cube's current snapshot, and whether it had to be loaded from the store."""
        loaded = False
        while True:
            with self._lock:
                cube = self._cubes.get(cube_id)
                if cube is not None:
                    self._cubes.move_to_end(cube_id)
                    break
                seen = self._changes.get(cube_id, 0)
                self._loading.add(cube_id)
            rows = self._loader(cube_id)
            loaded = True
            with self._lock:
                self.loads += 1
                if self._changes.get(cube_id, 0) != seen:
                    continue  # the view changed while it was read: read it again
                self._loading.discard(cube_id)
                if not self.retain(cube_id):
                    # Another worker keeps this cube's view current and this one would not see
                    # its changes: answer from the store, keep nothing that could go stale.
                    transient = _Cube(rows)
                    return _build(transient.rows, transient.vectors), loaded
                cube = self._cubes.setdefault(cube_id, _Cube(rows))
                self._cold.discard(cube_id)
                self._evict()
                break
        with cube.build_lock:  # one build per cube at a time; the follower never waits on it
            with self._lock:
                snapshot, version = cube.snapshot, cube.version
                if snapshot is None:
                    rows, vectors = dict(cube.rows), dict(cube.vectors)
            if snapshot is None:
                snapshot = _build(rows, vectors)
                with self._lock:
                    if cube.version == version:
                        cube.snapshot = snapshot
                        # Each vector becomes a view of the matrix: one copy of them is kept.
                        for n, memory_id in enumerate(snapshot.ids):
                            cube.vectors[memory_id] = snapshot.matrix[n]
        return snapshot, loaded

    def _evict(self) -> None:
        total = sum(len(c.rows) for c in self._cubes.values())
        while total > self.budget_rows and len(self._cubes) > 1:
            cube_id, cube = self._cubes.popitem(last=False)
            self._cold.add(cube_id)
            total -= len(cube.rows)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else vector

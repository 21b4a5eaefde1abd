"""Hybrid search over a cube's memories: dense (exact cosine) and keyword (BM25) fused by RRF.

Dense vectors find paraphrases; BM25 finds exact names, places and dates that a small embedding
model blurs. Reciprocal-rank fusion needs no score calibration between the two. Both rankings
come from the cube's snapshot in the :class:`~streams.query.working_set.WorkingSet`, so they see the
same rows; the plaintext view in Milvus is the store those snapshots load from.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from processors.embedder import Embedder
from processors.fold import Memory
from sinks.milvus import MilvusSink, epoch_ms, quote
from streams.query.working_set import Snapshot, WorkingSet, snapshot_of

DEFAULT_BUDGET_ROWS = 2_000_000
_NAME = re.compile(r"\b[A-Z][a-z]+\b")


@dataclass(frozen=True)
class Ranking:
    """How dense and keyword rankings become one (cross-validated on LoCoMo's dev conversations,
    see ``bench/quality.py --cv``).

    - ``rrf_k``, ``dense_weight``: weighted reciprocal-rank fusion, ``w / (rrf_k + rank)``.
    - ``candidates``: how deep each ranking is read.
    - ``speaker``: a memory in the words of someone the query names scores ``1 + speaker``
      times as much ("What does Melanie do to destress?" is about what Melanie said).
    - ``questions``: the factor of a memory that only asks (context for its answer, which
      carries the question too).

    A turn is shown once: its best memory (a dated sentence or the whole turn).

    Measured and dropped (no gain in cross-validation): lending score to a hit's neighbouring
    turns, pseudo-relevance feedback, a per-session diversity penalty.
    """

    rrf_k: float = 10.0
    dense_weight: float = 1.0
    candidates: int = 50
    speaker: float = 1.0
    questions: float = 0.7


@dataclass(frozen=True)
class Result:
    """One hit. ``score``: the fused score over its best possible value (1.0: first in both
    rankings); ``cosine``: the dense similarity to the query; ``keyword``: the BM25 score."""

    memory_id: str
    score: float
    text: str
    dense_rank: int | None
    keyword_rank: int | None
    row: dict[str, Any] = field(repr=False)
    cosine: float = 0.0
    keyword: float = 0.0


def build_filter(
    cube_id: str,
    since: datetime | None = None,
    until: datetime | None = None,
    tags: list[str] | None = None,
    include_history: bool = False,
) -> str:
    """Milvus boolean expression for the cube, time range (by valid_from) and tags."""
    parts = [f"cube_id == {quote(cube_id)}"]
    if not include_history:
        parts.append("valid_to == -1")
    if since is not None:
        parts.append(f"valid_from >= {epoch_ms(since)}")
    if until is not None:
        parts.append(f"valid_from <= {epoch_ms(until)}")
    if tags:
        parts.append(f"array_contains_any(tags, [{', '.join(quote(t.lower()) for t in tags)}])")
    return " and ".join(parts)


class Searcher:
    """Answers searches from the working set; the ops follower keeps it current (``apply``)."""

    def __init__(
        self,
        milvus: MilvusSink,
        embedder: Embedder,
        budget_rows: int = DEFAULT_BUDGET_ROWS,
        ranking: Ranking = Ranking(),
    ) -> None:
        self.milvus = milvus
        self.embedder = embedder
        # A cube's matrix-vector product is memory-bound: OpenBLAS's thread pool only adds
        # hand-offs (10k x 384: 5.9 ms pooled, 1.3 ms on one thread here), and concurrent searches
        # each waking the pool oversubscribe the cores (8 clients: 115 ms against 1.8 ms). The
        # limit is process-wide; the worker's other BLAS work (fusion's cosines) is the same kind.
        threadpool_limits(limits=1, user_api="blas")
        self.working_set = WorkingSet(milvus.cube_rows, budget_rows)
        self.ranking = ranking
        self._local = threading.local()

    @property
    def last_timing(self) -> dict[str, float]:
        """Where this thread's last search spent its time (ms)."""
        return getattr(self._local, "timing", {})

    def apply(self, states: Iterable[Memory]) -> None:
        """Memory states just written to the view: searchable from now on."""
        self.working_set.apply(states)

    def search(
        self,
        cube_id: str,
        query: str,
        top_k: int = 10,
        since: datetime | None = None,
        until: datetime | None = None,
        tags: list[str] | None = None,
        include_history: bool = False,
        memories: Iterable[Memory] | None = None,
    ) -> list[Result]:
        """The cube's best ``top_k`` for ``query``: from the working set, or from the given
        memory states (the cube as of a past point, see :mod:`streams.query.time_travel`)."""
        t0 = time.perf_counter()
        vector = self.embedder.encode([query])[0]
        t1 = time.perf_counter()
        if memories is not None:
            snapshot = snapshot_of(memories)
        else:
            snapshot, _ = self.working_set.snapshot(cube_id)
        keep = snapshot.mask(since, until, tags, include_history)
        t2 = time.perf_counter()
        timing = {"embed_ms": (t1 - t0) * 1e3, "snapshot_ms": (t2 - t1) * 1e3}
        ranked = rank(snapshot, query, vector, keep, top_k, self.ranking, timing)
        self._local.timing = timing
        return ranked


def rank(
    snapshot: Snapshot,
    query: str,
    vector: np.ndarray,
    keep: np.ndarray,
    top_k: int,
    ranking: Ranking = Ranking(),
    timing: dict[str, float] | None = None,
) -> list[Result]:
    """The best ``top_k`` kept rows of a snapshot for a query and its vector; ``timing`` gets
    the milliseconds of the dense and keyword rankings and of their fusion."""
    limit = max(ranking.candidates, top_k)
    t0 = time.perf_counter()
    dense = snapshot.dense(vector, keep, limit)
    t1 = time.perf_counter()
    keyword = snapshot.keyword(query, keep, limit)
    t2 = time.perf_counter()
    fused: dict[int, float] = {}
    dense_rank = {row: n for n, (row, _) in enumerate(dense, start=1)}
    keyword_rank = {row: n for n, (row, _) in enumerate(keyword, start=1)}
    for ranks, weight in ((dense_rank, ranking.dense_weight), (keyword_rank, 1.0)):
        for row, n in ranks.items():
            fused[row] = fused.get(row, 0.0) + weight / (ranking.rrf_k + n)
    named = {w.lower() for w in _NAME.findall(query)}
    for row in fused:
        speaker = snapshot.speakers[row]
        if speaker and speaker <= named:
            fused[row] *= 1 + ranking.speaker
        if snapshot.asked[row]:
            fused[row] *= ranking.questions
    best_possible = (ranking.dense_weight + 1.0) * (1 + ranking.speaker) / (ranking.rrf_k + 1)
    ordered = _one_per_turn(snapshot, sorted(fused.items(), key=lambda kv: (-kv[1],
                            snapshot.ids[kv[0]])), top_k)  # fmt: skip
    cosines = dict(dense)
    keywords = dict(keyword)
    if timing is not None:
        timing |= {"dense_ms": (t1 - t0) * 1e3, "keyword_ms": (t2 - t1) * 1e3,
                   "fuse_ms": (time.perf_counter() - t2) * 1e3}  # fmt: skip
    return [
        Result(snapshot.ids[row], min(1.0, value / best_possible), snapshot.rows[row]["text"],
               dense_rank.get(row), keyword_rank.get(row), snapshot.rows[row],
               cosine=cosines[row] if row in cosines else float(snapshot.matrix[row] @ vector),
               keyword=keywords.get(row, 0.0))
        for row, value in ordered
    ]  # fmt: skip


def _one_per_turn(snapshot: Snapshot, ordered: list[tuple[int, float]],
                  top_k: int) -> list[tuple[int, float]]:  # fmt: skip
    """The first ``top_k`` of ``ordered`` with one memory per source turn (a turn's dated or
    keyed sentence and the turn itself say the same thing twice: the better one is shown)."""
    picked: list[tuple[int, float]] = []
    turns: set[str] = set()
    for row, value in ordered:
        turn = snapshot.rows[row].get("source_event_id") or ""
        if turn and turn in turns:
            continue
        turns.add(turn)
        picked.append((row, value))
        if len(picked) == top_k:
            break
    return picked

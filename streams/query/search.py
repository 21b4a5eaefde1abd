"""Hybrid search over a cube's memories: dense (exact cosine) and keyword (BM25) fused by RRF.

Dense vectors find paraphrases; BM25 finds exact names, places and dates that a small embedding
model blurs. Reciprocal-rank fusion needs no score calibration between the two. Both rankings
come from the cube's snapshot in the :class:`~streams.query.working_set.WorkingSet`, so they see the
same rows; the plaintext view in Milvus is the store those snapshots load from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from threadpoolctl import threadpool_limits

from processors.embedder import Embedder
from processors.fold import Memory
from sinks.milvus import MilvusSink, epoch_ms, quote
from streams.query.working_set import WorkingSet, snapshot_of

RRF_K = 60
CANDIDATES = 50
DEFAULT_BUDGET_ROWS = 2_000_000


@dataclass(frozen=True)
class Result:
    memory_id: str
    score: float
    text: str
    dense_rank: int | None
    keyword_rank: int | None
    row: dict[str, Any] = field(repr=False)


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
        self, milvus: MilvusSink, embedder: Embedder, budget_rows: int = DEFAULT_BUDGET_ROWS
    ) -> None:
        self.milvus = milvus
        self.embedder = embedder
        # A cube's matrix-vector product is memory-bound: OpenBLAS's thread pool only adds
        # hand-offs (10k x 384: 5.9 ms pooled, 1.3 ms on one thread here), and concurrent searches
        # each waking the pool oversubscribe the cores (8 clients: 115 ms against 1.8 ms). The
        # limit is process-wide; the worker's other BLAS work (fusion's cosines) is the same kind.
        threadpool_limits(limits=1, user_api="blas")
        self.working_set = WorkingSet(milvus.cube_rows, budget_rows)
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
        limit = max(CANDIDATES, top_k)
        dense = snapshot.dense(vector, keep, limit)
        t3 = time.perf_counter()
        keyword = snapshot.keyword(query, keep, limit)
        t4 = time.perf_counter()
        self._local.timing = {
            "embed_ms": (t1 - t0) * 1e3,
            "snapshot_ms": (t2 - t1) * 1e3,
            "dense_ms": (t3 - t2) * 1e3,
            "keyword_ms": (t4 - t3) * 1e3,
        }

        fused: dict[int, float] = {}
        dense_rank = {row: rank for rank, (row, _) in enumerate(dense, start=1)}
        keyword_rank = {row: rank for rank, (row, _) in enumerate(keyword, start=1)}
        for ranks in (dense_rank, keyword_rank):
            for row, rank in ranks.items():
                fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank)
        ranked = sorted(fused.items(), key=lambda kv: (-kv[1], snapshot.ids[kv[0]]))[:top_k]
        return [
            Result(snapshot.ids[row], score, snapshot.rows[row]["text"], dense_rank.get(row),
                   keyword_rank.get(row), snapshot.rows[row])
            for row, score in ranked
        ]  # fmt: skip

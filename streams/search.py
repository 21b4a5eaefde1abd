"""Hybrid search over the plaintext view: dense (Milvus) and keyword (BM25) fused by RRF.

Dense vectors find paraphrases; BM25 finds exact names, places and dates that a small embedding
model blurs. Reciprocal-rank fusion needs no score calibration between the two.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import bm25s

from processors.embedder import Embedder
from sinks.milvus import MilvusSink

RRF_K = 60
CANDIDATES = 50


@dataclass(frozen=True)
class Result:
    memory_id: str
    score: float
    text: str
    dense_rank: int | None
    keyword_rank: int | None
    row: dict[str, Any] = field(repr=False)


@dataclass
class _KeywordIndex:
    ids: list[str]
    rows: list[dict[str, Any]]
    bm25: bm25s.BM25 | None


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def build_filter(
    cube_id: str,
    since: datetime | None = None,
    until: datetime | None = None,
    tags: list[str] | None = None,
    include_history: bool = False,
) -> str:
    """Milvus boolean expression for the cube, time range (by valid_from) and tags."""
    parts = [f"cube_id == {_quote(cube_id)}"]
    if not include_history:
        parts.append("valid_to == -1")
    if since is not None:
        parts.append(f"valid_from >= {_ms(since)}")
    if until is not None:
        parts.append(f"valid_from <= {_ms(until)}")
    if tags:
        parts.append(f"array_contains_any(tags, [{', '.join(_quote(t.lower()) for t in tags)}])")
    return " and ".join(parts)


class Searcher:
    """Answers searches; keeps one BM25 index per (cube, filter), rebuilt when the cube changes."""

    def __init__(self, milvus: MilvusSink, embedder: Embedder) -> None:
        self.milvus = milvus
        self.embedder = embedder
        self._keyword: dict[str, tuple[int, _KeywordIndex]] = {}
        self._generation: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def last_timing(self) -> dict[str, float]:
        """Where this thread's last search spent its time (ms)."""
        return getattr(self._local, "timing", {})

    def invalidate(self, cube_ids: set[str]) -> None:
        """Called after the sink wrote these cubes: their keyword indexes are stale."""
        with self._lock:
            for cube in cube_ids:
                self._generation[cube] = self._generation.get(cube, 0) + 1

    def search(
        self,
        cube_id: str,
        query: str,
        top_k: int = 10,
        since: datetime | None = None,
        until: datetime | None = None,
        tags: list[str] | None = None,
        include_history: bool = False,
    ) -> list[Result]:
        expr = build_filter(cube_id, since, until, tags, include_history)
        t0 = time.perf_counter()
        vector = self.embedder.encode([query])[0]
        t1 = time.perf_counter()
        dense = self.milvus.search(vector, expr, max(CANDIDATES, top_k))
        t2 = time.perf_counter()
        index = self._keyword_index(cube_id, expr)
        keyword_ids: list[str] = []
        if index.bm25 is not None:
            tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
            if tokens.vocab:
                k = min(CANDIDATES, len(index.ids))
                docs, scores = index.bm25.retrieve(tokens, k=k, show_progress=False)
                keyword_ids = [
                    index.ids[d] for d, s in zip(docs[0], scores[0], strict=True) if s > 0
                ]
        t3 = time.perf_counter()
        self._local.timing = {"embed_ms": (t1 - t0) * 1e3, "dense_ms": (t2 - t1) * 1e3,
                              "keyword_ms": (t3 - t2) * 1e3}  # fmt: skip

        fused: dict[str, float] = {}
        dense_rank = {hit.memory_id: rank for rank, hit in enumerate(dense, start=1)}
        keyword_rank = {mid: rank for rank, mid in enumerate(keyword_ids, start=1)}
        for ranks in (dense_rank, keyword_rank):
            for mid, rank in ranks.items():
                fused[mid] = fused.get(mid, 0.0) + 1.0 / (RRF_K + rank)
        rows = {hit.memory_id: hit.row for hit in dense}
        position = {mid: i for i, mid in enumerate(index.ids)}
        rows.update({mid: index.rows[position[mid]] for mid in keyword_ids if mid not in rows})
        ranked = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        return [
            Result(mid, score, rows[mid]["text"], dense_rank.get(mid), keyword_rank.get(mid),
                   rows[mid])
            for mid, score in ranked
        ]  # fmt: skip

    def _keyword_index(self, cube_id: str, expr: str) -> _KeywordIndex:
        with self._lock:
            generation = self._generation.get(cube_id, 0)
            cached = self._keyword.get(expr)
            if cached is not None and cached[0] == generation:
                return cached[1]
        rows = self.milvus.rows(expr)
        ids = [r["memory_id"] for r in rows]
        bm25 = None
        if rows:
            corpus = [f"{r['text']} {' '.join(r.get('tags') or [])}" for r in rows]
            bm25 = bm25s.BM25()
            bm25.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False),
                       show_progress=False)  # fmt: skip
        index = _KeywordIndex(ids, rows, bm25)
        with self._lock:
            self._keyword[expr] = (generation, index)
        return index

"""Retrieval quality without the services: the reader, the fold and the search, in process.

The same code the pipeline runs (``MemReader`` over batches of interactions, the fold, the
search ranking over a snapshot of the cube), minus Kafka and the stores, so a configuration is
scored on every dev conversation in seconds and cross-validation can afford a grid. Query and
memory vectors come from the configured embedder through a text -> vector cache (the embedder is
deterministic per text, so the cache changes no number, only the time).
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from processors.embedder import DIM, Embedder
from processors.extract import RuleExtractor
from processors.fold import Memory
from processors.fusion import CubeMemories
from processors.reader import MemReader, Sourced
from streams.query.search import Ranking, rank
from streams.query.working_set import Snapshot, snapshot_of
from streams.transport.events import Interaction

if TYPE_CHECKING:
    from bench.quality import Asked, Conversation


class CachedEmbedder:
    """An embedder that remembers every vector it computed (on disk between runs)."""

    def __init__(self, inner: Embedder, folder: Path) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        digest = hashlib.sha1(inner.model_id.encode()).hexdigest()[:10]
        self.path = folder / f"quality-vectors-{digest}.pkl"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            self.vectors = pickle.loads(self.path.read_bytes())
        self._new = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            for text, vector in zip(missing, self.inner.encode(missing), strict=True):
                self.vectors[text] = vector
            self._new += len(missing)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.vectors[t] for t in texts])

    def save(self) -> None:
        if self._new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".partial")
            partial.write_bytes(pickle.dumps(self.vectors))
            partial.rename(self.path)
            self._new = 0


def ingest(name: str, interactions: list[Interaction], reader_factory: Any, batch: int = 64
           ) -> list[Memory]:  # fmt: skip
    """Fold one conversation through a fresh reader, in the reader's batches; its memories."""
    reader: MemReader = reader_factory()
    records = [i.model_dump() | {"metadata": {}} for i in interactions]
    for offset, record in enumerate(records):
        record["event_id"] = f"{name}-{offset}"  # ids (and tie-breaks) repeatable
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        reader.process([Sourced(r, "interactions", 0, start + n) for n, r in enumerate(chunk)])
    return list(reader.memories.table.memories.values())


GRID: dict[str, tuple[float, ...]] = {
    "rrf_k": (10.0, 20.0, 60.0),
    "dense_weight": (0.7, 1.0, 1.4),
    "speaker": (0.0, 0.5, 1.0),
    "questions": (0.7, 1.0),
}


@dataclass
class Prepared:
    """One ingested conversation, ready to be ranked many times over."""

    name: str
    snapshot: Snapshot
    keep: np.ndarray
    questions: list[tuple[Asked, np.ndarray]]  # every question, and its vector
    baselines: Any


def prepare(conversations: list[Conversation], embedder: CachedEmbedder, progress: Any
            ) -> list[Prepared]:  # fmt: skip
    from bench.quality import Baselines

    out = []
    task = progress.add_task("ingesting in process", total=len(conversations))

    def reader() -> MemReader:
        return MemReader(RuleExtractor(), embedder, CubeMemories(DIM))

    for conversation in conversations:
        states = ingest(conversation.name, conversation.interactions(conversation.cube), reader)
        snapshot = snapshot_of(states)
        vectors = embedder.encode([a.question for a in conversation.questions])
        out.append(Prepared(
            conversation.name, snapshot, snapshot.mask(None, None, None, False),
            list(zip(conversation.questions, vectors, strict=True)),
            Baselines(conversation.turns, embedder),
        ))  # fmt: skip
        embedder.save()
        progress.advance(task)
    return out


def ranked_turns(conversation: Prepared, question: str, vector: np.ndarray,
                 ranking: Ranking) -> list[str]:  # fmt: skip
    hits = rank(conversation.snapshot, question, vector, conversation.keep, 50, ranking)
    return list(dict.fromkeys(h.row["turn_id"] for h in hits if h.row["turn_id"]))[:20]


def scores(conversation: Prepared, ranking: Ranking) -> list[tuple[str, dict[str, float]]]:
    """(category, scores) of every question with evidence."""
    from bench.quality import score

    return [(a.category, score(ranked_turns(conversation, a.question, v, ranking), a.gold))
            for a, v in conversation.questions if a.gold]  # fmt: skip


def grid() -> list[Ranking]:
    names = list(GRID)
    return [Ranking(**dict(zip(names, values, strict=True)))
            for values in itertools.product(*GRID.values())]  # fmt: skip


Rows = dict[str, list[tuple[str, str, dict[str, float] | None]]]


def cross_validate(conversations: list[Prepared], progress: Any, metric: str = "recall_all@10"
                   ) -> tuple[Rows, list[dict[str, Any]], dict[str, list[str]]]:  # fmt: skip
    """Leave one conversation out: the ranking that scores best (``metric``, over the questions
    of the others) is chosen and reported on the one left out; every conversation is left out
    once. Returns each system's (conversation, category, scores) rows (scores None: a question
    without evidence, counted, not scored), the choices, and the cross-validated ranking's
    turn ids per question (every question, by its key)."""
    from bench.quality import score_or_none

    candidates = grid()
    task = progress.add_task("cross-validating", total=len(candidates) * len(conversations))
    table: dict[tuple[int, int], float] = {}  # (candidate, conversation) -> metric sum
    for c, ranking in enumerate(candidates):
        for n, conversation in enumerate(conversations):
            table[c, n] = sum(s[metric] for _, s in scores(conversation, ranking))
            progress.advance(task)
    rows: Rows = {"cv": [], "default": [], "bm25": [], "dense": []}
    choices = []
    ranked: dict[str, list[str]] = {}
    for held, conversation in enumerate(conversations):
        best = max(range(len(candidates)), key=lambda c: (sum(
            table[c, n] for n in range(len(conversations)) if n != held), -c))  # fmt: skip
        choices.append({"held_out": conversation.name} | asdict(candidates[best]))
        name = conversation.name
        for asked, vector in conversation.questions:
            q, gold = asked.question, asked.gold
            ours = ranked_turns(conversation, q, vector, candidates[best])
            ranked[asked.key] = ours
            for system, turns in (
                ("cv", ours),
                ("default", ranked_turns(conversation, q, vector, Ranking())),
                ("bm25", conversation.baselines.bm25_rank(q)),
                ("dense", conversation.baselines.dense_rank(q)),
            ):
                rows[system].append((name, asked.category, score_or_none(turns, gold)))
    return rows, choices, ranked

"""Retrieval quality without the services: the reader, the fold and the search, in process.

The same code the pipeline runs (``MemReader`` over batches of interactions, the fold, the
search ranking over a snapshot of the cube), minus Kafka and the stores, so a configuration is
scored on every dev conversation in seconds and cross-validation can afford a grid. Query and
memory vectors come from the configured embedder through a text -> vector cache (the embedder is
deterministic per text, so the cache changes no number, only the time).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from processors.embedder import Embedder
from processors.fold import Memory
from processors.reader import MemReader, Sourced
from streams.sdk import locomo


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


def ingest(sample: locomo.Sample, reader_factory: Any, batch: int = 64) -> tuple[str, list[Memory]]:
    """Fold one conversation through a fresh reader, in the reader's batches; its memories."""
    cube = f"locomo-{sample.sample_id}"
    reader: MemReader = reader_factory()
    records = [i.model_dump() | {"metadata": {}, "role": "USER"}
               for i in locomo.interactions(sample, cube)]  # fmt: skip
    for offset, record in enumerate(records):
        record["event_id"] = f"{sample.sample_id}-{offset}"  # ids (and tie-breaks) repeatable
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        reader.process([Sourced(r, "interactions", 0, start + n) for n, r in enumerate(chunk)])
    return cube, list(reader.memories.table.memories.values())

"""Synthetic data: memory vectors for search at scale (the same for memstream and for the
peer), and a synthetic op log for the restart benchmark.

Beyond the real vectors, memory ``i`` is real vector ``i mod n`` plus Gaussian noise (sigma
0.05), renormalised: realistic neighbourhoods, no duplicate points. Only numpy, so that the
peer's own environment imports it too; the noise comes from one generator per store, drawn in
memory order, so any chunking gives the same vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

SEED = 7


def vectors(base: np.ndarray, start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
    """Vectors of memories ``start`` to ``stop - 1``; call with consecutive ranges from 0."""
    out = base[np.arange(start, stop) % len(base)].astype(np.float32, copy=True)
    synthetic = np.arange(start, stop) >= len(base)
    if synthetic.any():
        noisy = out[synthetic] + rng.normal(0, 0.05, (int(synthetic.sum()), base.shape[1]))
        out[synthetic] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def ops(
    memories: int, ops_per_memory: int, cubes: int, seed: int = SEED, dim: int = 384
) -> Iterator[tuple[str, dict[str, Any]]]:
    """A synthetic op log: ``memories`` ADDs (real-sized 384-dim vectors and texts), each
    followed by ``ops_per_memory - 1`` ACTIVATE/DEACTIVATE ops, interleaved across memories as a
    scheduler's would be. Yields ``(cube_id, op)`` in log order; deterministic."""
    from processors.ops import embedding_bytes, make_op, plaintext_payload

    rng = np.random.default_rng(seed)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    batch = 1000
    for first in range(0, memories, batch):
        ids = range(first, min(first + batch, memories))
        vecs = rng.normal(size=(len(ids), dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        for version in range(1, ops_per_memory + 1):
            for n, i in enumerate(ids):
                cube = f"synthetic-{i % cubes}"
                at = t0 + timedelta(seconds=i, minutes=version)
                kind = "ADD" if version == 1 else ("ACTIVATE" if version % 2 == 0 else "DEACTIVATE")
                payload = None
                if kind == "ADD":
                    payload = plaintext_payload(
                        f"synthetic memory {i} of {cube}: a sentence of ordinary length here",
                        embedding_bytes(vecs[n]), "synthetic", tags=[f"t{i % 17}"], valid_from=at,
                    )  # fmt: skip
                yield cube, make_op(
                    event_id=f"synthetic-{i}-{version}", cube_id=cube, memory_id=f"m-{i}",
                    version=version, op=kind, event_time=at, actor="bench/synthetic",
                    caused_by=[f"source-{i}"], payload=payload,
                )  # fmt: skip

"""Synthetic memory vectors for search at scale: the same for memstream and for the peer.

Beyond the real vectors, memory ``i`` is real vector ``i mod n`` plus Gaussian noise (sigma
0.05), renormalised: realistic neighbourhoods, no duplicate points. Only numpy, so that the
peer's own environment imports it too; the noise comes from one generator per store, drawn in
memory order, so any chunking gives the same vectors.
"""

from __future__ import annotations

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

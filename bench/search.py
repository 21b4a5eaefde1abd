"""Search latency at 10k and 100k memories (1M with `--size 1000000`: slow on milvus-lite),
one client and 8 concurrent clients.

Memories are written straight into a fresh milvus-lite view (the pipeline's own sink, the
pipeline's ingest is measured by ``bench pipeline``): real LoCoMo memory texts with their real
MiniLM vectors for the first 10k, then the same texts with perturbed copies of their vectors
(synthetic, unit length) up to the size. Memories are spread over cubes of 10k each, as tenants
would be; every query is a LoCoMo question searched in one cube through the same
:class:`~streams.search.Searcher` the API uses (query embedding + Milvus + BM25, fused by RRF).
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from bench.report import percentiles, write
from processors.extract import RuleExtractor
from processors.fold import Memory
from processors.ops import embedding_bytes
from sinks.milvus import MilvusSink
from sinks.stores import milvus_client
from streams import locomo
from streams.search import Searcher
from streams.settings import Settings
from streams.worker import embedder_for

PER_CUBE = 10_000
T0 = datetime(2023, 5, 8, tzinfo=UTC)


def corpus(limit: int = PER_CUBE) -> list[str]:
    texts = []
    extractor = RuleExtractor()
    for sample in locomo.load():
        for interaction in locomo.interactions(sample, "x"):
            texts.extend(item.text for item in extractor.extract(interaction.to_record()))
    return (texts * (limit // len(texts) + 1))[:limit]


def fill(sink: MilvusSink, texts: list[str], vectors: np.ndarray, total: int,
         progress: Progress) -> None:  # fmt: skip
    rng = np.random.default_rng(7)
    task = progress.add_task(f"writing {total:,} memories", total=total)
    for start in range(0, total, 5000):
        rows = []
        for i in range(start, min(total, start + 5000)):
            base = vectors[i % len(vectors)]
            if i >= len(vectors):
                base = base + rng.normal(0, 0.05, base.shape).astype(np.float32)
                base /= np.linalg.norm(base)
            rows.append(Memory(
                memory_id=f"m{i}", cube_id=f"cube-{i // PER_CUBE}", memory_type="PLAINTEXT",
                version=1, status="active", created_at=T0, updated_at=T0,
                text=texts[i % len(texts)], embedding=embedding_bytes(base), valid_from=T0,
            ))  # fmt: skip
        sink.write(rows)
        progress.advance(task, len(rows))
    sink.flush()


def measure(searcher: Searcher, questions: list[str], cubes: int, clients: int,
            per_client: int) -> dict[str, Any]:  # fmt: skip
    def one(index: int) -> tuple[float, dict[str, float]]:
        started = time.perf_counter()
        searcher.search(f"cube-{index % cubes}", questions[index % len(questions)], 10)
        return (time.perf_counter() - started) * 1e3, dict(searcher.last_timing)

    for i in range(min(cubes, 20)):  # build each cube's BM25 index outside the timing
        one(i)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    wall = time.perf_counter() - started
    latencies = [r[0] for r in results]
    embed = float(np.median([r[1]["embed_ms"] for r in results]))
    store = float(np.median([r[1]["dense_ms"] for r in results]))
    keyword = float(np.median([r[1]["keyword_ms"] for r in results]))
    return {
        **percentiles(latencies),
        "qps": round(len(results) / wall, 1),
        "embed_ms_median": round(embed, 2),
        "milvus_ms_median": round(store, 2),
        "bm25_ms_median": round(keyword, 2),
        "embed_share": round(embed / max(embed + store + keyword, 1e-9), 3),
    }


def run(sizes: tuple[int, ...] = (10_000, 100_000), queries: int = 200) -> dict[str, Any]:
    console = Console()
    base = Settings()
    embedder = embedder_for(base)
    texts = corpus()
    with console.status(f"embedding {len(texts):,} real memory texts..."):
        vectors = embedder.encode(texts)
    questions = [qa["question"] for s in locomo.load() for qa in s.qa]
    results: dict[str, Any] = {}
    for size in sizes:
        settings = base.model_copy(update={"data_dir": Path(tempfile.mkdtemp(prefix="ms-search-"))})
        sink = MilvusSink(milvus_client(settings))
        started = time.perf_counter()
        with Progress(console=console) as progress:
            fill(sink, texts, vectors, size, progress)
        load_s = time.perf_counter() - started
        searcher = Searcher(sink, embedder)
        cubes = max(1, size // PER_CUBE)
        # milvus-lite scans a million rows per search (~0.7 s): fewer queries keep the run short.
        n = queries if size <= 100_000 else queries // 4
        results[f"{size}"] = {
            "cubes": cubes,
            "write_s": round(load_s, 1),
            "one_client": measure(searcher, questions, cubes, 1, n),
            "eight_clients": measure(searcher, questions, cubes, 8, max(1, n // 8)),
        }
        sink.client.close()
        write("search", results, console)  # after every size: a cut-short run keeps its numbers
    return results


if __name__ == "__main__":
    run()

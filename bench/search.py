"""Search latency at 10k, 100k and 1M memories, one client and 8 concurrent clients, next to mem0.

Memories are written the way the worker writes them: into a fresh milvus-lite view (the store of
record) and into the searcher's working set (``Searcher.apply``); the pipeline's own ingest is
measured by ``bench ingest``. The first 10k are real LoCoMo memory texts with their real MiniLM
vectors, the rest the same texts with perturbed copies of their vectors (synthetic, unit length).
Memories are spread over cubes of 10k each, as tenants would be; every query is a LoCoMo
question searched in one cube through the same :class:`~streams.query.search.Searcher` the API uses
(query embedding, exact cosine and BM25 over the cube, fused by RRF). Each cube is searched once
before the timing (its snapshot built); a cube read back from Milvus (not resident: after an
eviction or a restart of a process that does not follow the log) is timed on its own.

mem0 gets the same memories (through its own vector store, local Qdrant, its default) and the
same questions; a size whose fill would overrun the peer's time budget is reported as skipped.
"""

from __future__ import annotations

import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from bench import synthetic
from bench.report import latency_summary, percentiles, timing_split, write
from processors.extract import RuleExtractor
from processors.fold import Memory
from processors.ops import embedding_bytes
from sinks.milvus import MilvusSink
from sinks.stores import milvus_view
from streams.pipeline.build import embedder_for
from streams.query.search import Searcher
from streams.sdk import locomo
from streams.settings import Settings

PER_CUBE = 10_000
SIZES = (10_000, 100_000, 1_000_000)
T0 = datetime(2023, 5, 8, tzinfo=UTC)


def corpus(limit: int = PER_CUBE) -> list[str]:
    texts = []
    extractor = RuleExtractor()
    for sample in locomo.load():
        for interaction in locomo.interactions(sample, "x"):
            texts.extend(item.text for item in extractor.extract(interaction.to_record()))
    return (texts * (limit // len(texts) + 1))[:limit]


def fill(sink: MilvusSink, searcher: Searcher, texts: list[str], base: np.ndarray,
         total: int, progress: Progress) -> None:  # fmt: skip
    rng = np.random.default_rng(synthetic.SEED)
    task = progress.add_task(f"writing {total:,} memories", total=total)
    for start in range(0, total, 5000):
        stop = min(total, start + 5000)
        states = [
            Memory(
                memory_id=f"m{i}", cube_id=f"cube-{i // PER_CUBE}", memory_type="PLAINTEXT",
                version=1, status="active", created_at=T0, updated_at=T0,
                text=texts[i % len(texts)], embedding=embedding_bytes(vector), valid_from=T0,
            )
            for i, vector in enumerate(synthetic.vectors(base, start, stop, rng), start)
        ]  # fmt: skip
        sink.put(states)
        searcher.apply(states)
        progress.advance(task, len(states))
    sink.flush()


def measure(searcher: Searcher, questions: list[str], cubes: int, clients: int,
            n: int) -> dict[str, Any]:  # fmt: skip
    def one(index: int) -> tuple[float, dict[str, float]]:
        started = time.perf_counter()
        searcher.search(f"cube-{index % cubes}", questions[index % len(questions)], 10)
        return (time.perf_counter() - started) * 1e3, dict(searcher.last_timing)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    return {
        **latency_summary([r[0] for r in results], wall),
        **timing_split([r[1] for r in results]),
    }


def cold_loads(sink: MilvusSink, embedder: Any, questions: list[str], cubes: int,
               n: int = 3) -> dict[str, Any]:  # fmt: skip
    """A search whose cube is not resident: read from Milvus, snapshot built, then answered."""
    searcher = Searcher(sink, embedder)
    latencies = []
    for i in range(min(n, cubes)):
        started = time.perf_counter()
        searcher.search(f"cube-{i}", questions[i], 10)
        latencies.append((time.perf_counter() - started) * 1e3)
    return percentiles(latencies)


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_memstream(sizes: tuple[int, ...], texts: list[str], vectors: np.ndarray,
                  questions: list[str], queries: int, console: Console,
                  results: dict[str, Any]) -> None:  # fmt: skip
    base = Settings()
    embedder = embedder_for(base)
    for size in sizes:
        settings = base.model_copy(update={"data_dir": Path(tempfile.mkdtemp(prefix="ms-search-"))})
        sink = milvus_view(settings)
        searcher = Searcher(sink, embedder, budget_rows=max(size, base.search_budget_rows))
        started = time.perf_counter()
        with Progress(console=console) as progress:
            fill(sink, searcher, texts, vectors, size, progress)
        write_s = time.perf_counter() - started
        cubes = max(1, size // PER_CUBE)
        started = time.perf_counter()
        for cube in range(cubes):
            searcher.working_set.snapshot(f"cube-{cube}")
        build_s = time.perf_counter() - started
        results[str(size)] = {
            "cubes": cubes,
            "write_s": round(write_s, 1),
            "snapshot_build_ms_per_cube": round(build_s * 1e3 / cubes, 1),
            "one_client": measure(searcher, questions, cubes, 1, queries),
            "eight_clients": measure(searcher, questions, cubes, 8, queries),
            "cold_cube": cold_loads(sink, embedder, questions, cubes),
            "rss_peak_mb": rss_mb(),
        }
        del searcher
        sink.client.close()
        write("search", {"memstream": results}, console)  # a cut-short run keeps each size


def run(sizes: tuple[int, ...] = SIZES, queries: int = 400, peers: tuple[str, ...] = ("mem0",),
        peer_budget_s: float = 120.0) -> dict[str, Any]:  # fmt: skip
    console = Console()
    settings = Settings()
    texts = corpus()
    with console.status(f"embedding {len(texts):,} real memory texts..."):
        vectors = embedder_for(settings).encode(texts)
    questions = [qa["question"] for s in locomo.load() for qa in s.qa]
    results: dict[str, Any] = {"memstream": {}}
    run_memstream(sizes, texts, vectors, questions, queries, console, results["memstream"])
    if "mem0" in peers:
        from bench.peers import mem0

        with console.status("mem0: the same memories and questions..."):
            results["mem0"] = mem0.search(
                vectors, texts, questions, sizes, PER_CUBE, queries, peer_budget_s,
                settings.tools_dir / "onnx", settings.embedder == "onnx-int8",
            )  # fmt: skip
    write("search", results, console, side_by_side=("memstream", "mem0"))
    return results


if __name__ == "__main__":
    run()

"""Where the worker's time goes: py-spy samples of `memstream serve`, by component.

Two phases on a fresh worker: ingest (N LoCoMo turns published, sampled until every op is in
the views) and search (one client searching the ingested cubes). Samples are py-spy's
(every thread that holds or waits for the CPU; idle threads excluded); each sample is charged
to the innermost frame that belongs to a known component, so "milvus-lite" includes pymilvus
and gRPC work done for it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from itertools import cycle
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.ingest import workload
from bench.report import write
from streams.sdk import locomo
from streams.sdk.local import ServeProcess
from streams.settings import Settings
from streams.transport.producer import EventProducer

# (component, substrings of a frame "function (file:line)"), tried from the innermost frame out.
COMPONENTS = [
    ("embedder: ONNX Runtime inference", ("onnxruntime",)),
    ("embedder: tokenizer and pooling", ("onnx_embedder.py", "tokenizers")),
    ("milvus-lite (+ pymilvus, gRPC)", ("milvus_lite", "pymilvus", "grpc")),
    ("ClickHouse (chdb)", ("chdb", "clickhouse_connect")),
    ("MinIO vault", ("minio", "urllib3", "vault.py")),
    ("Kafka client and Avro codec", ("confluent_kafka", "fastavro", "codec.py")),
    ("search: working set (cosine, BM25, snapshot)", ("working_set.py", "bm25s", "threadpoolctl")),
    ("HTTP API (FastAPI, uvicorn)", ("fastapi", "starlette", "uvicorn", "anyio", "h11")),
    ("MemReader: extraction and dates", ("extract.py", "dates.py", "reader.py")),
    ("fold and fusion", ("fold.py", "fusion.py", "ops.py")),
    ("worker loop", ("worker.py", "search.py")),
]


def component(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    return "other"


def shares(raw: Path) -> dict[str, float]:
    """Fraction of samples per component from py-spy's raw (collapsed stack) output."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[component(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {name: round(n / total, 3) for name, n in counts.most_common()}


class Sampler:
    """py-spy recording a process until stopped."""

    def __init__(self, pid: int, out: Path) -> None:
        py_spy = shutil.which("py-spy") or str(Path(__file__).parents[1] / ".venv/bin/py-spy")
        self.out = out
        self.proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
             "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> dict[str, float]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-1000:]}")
        return shares(self.out)


def run(n: int = 5_000, searches: int = 1_000) -> dict[str, Any]:
    console = Console()
    data = Path(tempfile.mkdtemp(prefix="memstream-profile-"))
    worker = ServeProcess(Settings(), data).start()
    assert worker.proc is not None
    try:
        interactions = workload(n, cubes=10)
        sampler = Sampler(worker.proc.pid, data / "ingest.txt")
        started = time.perf_counter()
        with console.status(f"ingesting {n:,} interactions under py-spy..."):
            with EventProducer(worker.settings) as producer:
                producer.publish_interactions(interactions)
            worker.client.wait_drained(1800)
        ingest_s = time.perf_counter() - started
        ingest = sampler.stop()

        cubes = sorted({i.cube_id for i in interactions})
        for cube in cubes:  # snapshots built before the search phase
            worker.client.search(cube, "hello", 1)
        questions = [qa["question"] for s in locomo.load() for qa in s.qa]
        sampler = Sampler(worker.proc.pid, data / "search.txt")
        with console.status(f"{searches:,} searches under py-spy..."):
            for _, q, cube in zip(range(searches), cycle(questions), cycle(cubes), strict=False):
                worker.client.search(cube, q, 10)
        search = sampler.stop()
    finally:
        worker.discard()
    results = {
        "interactions": n,
        "ingest_s": round(ingest_s, 1),
        "ingest_share": ingest,
        "searches": searches,
        "search_share": search,
    }
    write("profile", results, console)
    return results


if __name__ == "__main__":
    run()

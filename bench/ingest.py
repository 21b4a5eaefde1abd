"""Ingest and search through the real pipeline, next to its ceilings and to mem0.

Starts a worker (`memstream serve`) on fresh topics against the running Kafka and MinIO,
publishes N LoCoMo turns spread over cubes as fast as the producer goes, and measures (after a
warm-up of the broker's JIT through throwaway workers, :data:`WARM_UP`):

- ingest throughput: interactions per second from the first publish until every op is in the
  views (Milvus, ClickHouse);
- event-to-searchable latency: a single new interaction, published to an idle pipeline, until a
  search finds it (p50/p95/p99);
- search latency at the resulting memory count, one client (p50/p95/p99, QPS) and where the
  time goes (query embedding, Milvus, BM25);
- the ceilings: MiniLM alone on the same memory texts, in this process, once the workers have
  stopped; Kafka producing and consuming the same events;
- mem0, side by side: the same interactions through ``Memory.add`` (``infer=False``: no LLM here)
  with the same embedder, and its add-to-searchable latency.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
import zlib
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from bench.cpu import CpuMeter
from bench.report import latency_summary, percentiles, timing_split, write
from streams.pipeline.build import embedder_for
from streams.sdk import locomo
from streams.sdk.local import ServeProcess
from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.events import Interaction
from streams.transport.producer import EventProducer
from streams.transport.topics import INTERACTIONS, ensure_topics


def workload(n: int, cubes: int) -> list[Interaction]:
    """N real turns, the LoCoMo conversations cycled, each pass into its own set of cubes."""
    turns = [t for s in locomo.load() for t in locomo.interactions(s, "x")]
    out = []
    for index, t in enumerate(islice(cycle(turns), n)):
        out.append(t.model_copy(update={
            "cube_id": f"bench-{index // len(turns)}-{zlib.crc32(t.session_id.encode()) % cubes}",
            "event_id": str(uuid.uuid4()),
        }))  # fmt: skip
    return out


def kafka_ceiling(settings: Settings, interactions: list[Interaction]) -> dict[str, float]:
    """The broker's own rate for the same events: produce them all, then consume them all."""
    topic_settings = settings.model_copy(
        update={"topic_prefix": f"{settings.topic_prefix}ceiling."}
    )
    ensure_topics(topic_settings)
    started = time.perf_counter()
    with EventProducer(topic_settings) as producer:
        producer.publish_interactions(interactions)
    produce_s = time.perf_counter() - started
    started = time.perf_counter()
    with EventConsumer([topic_settings.topic(INTERACTIONS.name)], f"ceiling-{uuid.uuid4()}",
                       topic_settings) as consumer:  # fmt: skip
        got = len(consumer.take(len(interactions), timeout=10))
    consume_s = time.perf_counter() - started
    return {
        "produce_per_s": round(len(interactions) / produce_s, 1),
        "consume_decode_per_s": round(got / consume_s, 1),
    }


def start_workers(
    base: Settings, data: Path, readers: int, split: bool = False
) -> list[ServeProcess]:
    """One ``all`` process, or one ``views`` process and ``readers`` reader processes sharing
    the partitions (scale-out on one machine: the embedder is what they split; ``split`` with
    one reader: the writer in a process of its own, its embedder not sharing an interpreter
    with the sinks and agents)."""
    if readers <= 1 and not split:
        return [ServeProcess(base, data).start()]
    prefix = f"run-{uuid.uuid4().hex[:8]}."
    views = ServeProcess(base, data / "views", prefix=prefix, role="views", worker_id="views")
    workers = [views] + [
        ServeProcess(base, data / f"reader-{i}", prefix=prefix, role="reader", worker_id=str(i))
        for i in range(readers)
    ]
    for worker in workers:
        worker.start()
    return workers


def reader_counters(statuses: list[dict[str, Any]]) -> dict[str, int]:
    """The writer's counters summed over the statuses of every process that runs a reader."""
    total: dict[str, int] = {"interactions": 0, "ops_emitted": 0}
    for status in statuses:
        reader = status["processors"].get("reader")
        if reader is not None:
            for key in total:
                total[key] += reader["stats"].get(key, 0)
    return total


def writer_seconds(statuses: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each writer's seconds so far per stage (a worker counts from its start: the idle polls
    before an ingest too, so a window's time is the difference of two of these)."""
    return [s["processors"]["reader"]["stats"]["time_s"] for s in statuses
            if "reader" in s["processors"]]  # fmt: skip


def statuses(workers: list[ServeProcess]) -> list[dict[str, Any]]:
    """Each worker's status without the group lag (the part that asks the broker)."""
    return [w.client.status(lag=False) for w in workers]


#: The embedder ceiling is the median of this many runs: on a shared 2-core VM one run's speed
#: drifts by up to 12 % from the next (the CPU time per text itself changes, not the threads' use).
CEILING_RUNS = 3


def ingest(workers: list[ServeProcess], interactions: list[Interaction],
           console: Console) -> tuple[float, float]:  # fmt: skip
    """Publish the interactions and wait until every one is in the views: (publish s, total s)."""
    n = len(interactions)
    client = workers[0].client
    started = time.perf_counter()
    with EventProducer(workers[0].settings) as producer, Progress(console=console) as progress:
        task = progress.add_task("publishing", total=n)
        for start in range(0, n, 1000):
            producer.publish_interactions(interactions[start : start + 1000])
            progress.advance(task, min(1000, n - start))
    published = time.perf_counter() - started
    with Progress(console=console) as progress:
        task = progress.add_task("ingesting", total=n)
        # Progress from the counters alone; the lag (broker requests: a cost to the pipeline
        # being measured) is asked only once the reader has counted every interaction.
        while True:
            now = statuses(workers)
            read = reader_counters(now)["interactions"]
            progress.update(task, completed=read)
            status = client.status() if read >= n else now[0]
            if status["failure"]:
                raise RuntimeError(status["failure"])
            if read >= n and status["caught_up"] and not any(status["lag"].values()):
                break
            time.sleep(0.2)
    return published, time.perf_counter() - started


#: Interactions ingested by throwaway workers before the measured run. The broker is a JVM: on
#: a fresh one, the first transactions and fetches run partly interpreted while its JIT compiles
#: them. With C2 that took up to 3.6 CPU-s of a 3,000-turn ingest on 2 cores (the first run
#: after ``memstream infra up`` measured 0.70 of the ceiling, the next ones 0.82-0.84); the local
#: broker now runs C1 only (``infra/kafka.py``), and a fresh one still costs 0.4 CPU-s more than
#: a warm one. The warm-up makes the number the pipeline's, not the broker's JIT's.
WARM_UP = 600


def warm_up(base: Settings, readers: int, split: bool, console: Console) -> float:
    """Run :data:`WARM_UP` interactions through workers of the measured layout, then discard
    them (own topics, own data dir); returns how long it took."""
    data = Path(tempfile.mkdtemp(prefix="memstream-bench-warm-"))
    console.print(f"warming up the broker with {WARM_UP} interactions (not measured)...")
    started = time.perf_counter()
    workers = start_workers(base, data, readers, split)
    try:
        ingest(workers, workload(WARM_UP, 5), console)
    finally:
        for w in workers:
            w.discard()
    return time.perf_counter() - started


def run(n: int = 20_000, cubes: int = 10, probes: int = 30, queries: int = 300,
        peers: tuple[str, ...] = ("mem0",), readers: int = 1,
        split: bool = False) -> dict[str, Any]:  # fmt: skip
    console = Console()
    base = Settings()
    warm_up_s = warm_up(base, readers, split, console)
    data = Path(tempfile.mkdtemp(prefix="memstream-bench-"))
    workers = start_workers(base, data, readers, split)
    layout = "all" if len(workers) == 1 else f"views + {len(workers) - 1} reader(s)"
    worker = workers[0]
    client = worker.client
    try:
        interactions = workload(n, cubes)
        meter = CpuMeter({f"{w.settings.role} {w.settings.worker_id}": w.proc.pid
                          for w in workers if w.proc is not None}).start()  # fmt: skip
        before = writer_seconds(statuses(workers))
        published, ingest_s = ingest(workers, interactions, console)
        ingest_cpu = meter.stop()
        after = statuses(workers)
        counters = reader_counters(after)
        # Where each writer's thread spent the ingest (poll, extract, embed: waiting for a
        # batch's vectors, fuse, commit_wait).
        writer_time_s = [{k: round(v - b.get(k, 0.0), 2) for k, v in a.items()}
                         for b, a in zip(before, writer_seconds(after), strict=True)]  # fmt: skip
        # The texts the reader embedded (replies carry their question): the ceiling's input.
        memory_texts = [m["text"] for c in sorted({i.cube_id for i in interactions})
                        for m in client.memories(c, 16384)]  # fmt: skip
        memory_count = len(memory_texts)

        latencies = []
        for probe in range(probes):
            token = f"zq{uuid.uuid4().hex[:10]}"
            cube = "bench-probe"
            sent = time.perf_counter()
            client.publish(cube, [{"content": f"My locker code word is {token} for the gym.",
                                   "speaker": "Probe"}])  # fmt: skip
            while not any(token in h["text"] for h in client.search(cube, token, 100)["hits"]):
                if time.perf_counter() - sent > 60:
                    raise TimeoutError(f"probe {token} not searchable after 60 s")
                time.sleep(0.01)
            latencies.append((time.perf_counter() - sent) * 1e3)
            del probe

        questions = [qa["question"] for s in locomo.load() for qa in s.qa][:queries]
        cube_ids = sorted({i.cube_id for i in interactions})
        search_ms, timings = [], []
        meter = CpuMeter({f"{w.settings.role} {w.settings.worker_id}": w.proc.pid
                          for w in workers if w.proc is not None}).start()  # fmt: skip
        t0 = time.perf_counter()
        for q, cube in zip(questions, cycle(cube_ids), strict=False):
            s = time.perf_counter()
            response = client.search(cube, q, 10)
            search_ms.append((time.perf_counter() - s) * 1e3)
            timings.append(response["timing_ms"])
        search_wall = time.perf_counter() - t0
        search_cpu = meter.stop()

        # The ceiling is measured with the workers stopped: a worker left running keeps busy
        # after the searches (the scheduler activates hot memories, whose KV caches the local
        # LM computes), and the ceiling would be measured against that, not alone.
        for w in workers:
            w.stop()
        texts = memory_texts[:4000]
        embedder = embedder_for(worker.settings)
        embedder.encode(texts[:64])
        rates = []
        for _ in range(CEILING_RUNS):
            e0 = time.perf_counter()
            embedder.encode(texts)
            rates.append(len(texts) / (time.perf_counter() - e0))
        texts_per_s = statistics.median(rates)
        items_per_interaction = memory_count / n
        kafka = kafka_ceiling(worker.settings, interactions)
        results: dict[str, Any] = {
            "interactions": n,
            "reader_processes": readers,
            "layout": layout,
            "cubes": len(cube_ids),
            "warm_up": {"interactions": WARM_UP, "seconds": round(warm_up_s, 1)},
            "memstream": {
                "memories_in_view": memory_count,
                "ops": counters["ops_emitted"],
                "publish_s": round(published, 2),
                "total_s": round(ingest_s, 2),
                "interactions_per_s": round(n / ingest_s, 1),
                "memories_per_s": round(counters["ops_emitted"] / ingest_s, 1),
                "writer_time_s": writer_time_s[0] if len(writer_time_s) == 1 else writer_time_s,
                "milvus_flushes": sum(
                    s["processors"]["views"]["stats"]["milvus_flushes"]
                    for s in after
                    if "views" in s["processors"]
                ),
                "event_to_searchable": percentiles(latencies),
                "search_single_client": {
                    **latency_summary(search_ms, search_wall),
                    **timing_split(timings),
                },
            },
            "ingest_cpu": ingest_cpu,
            "search_cpu": search_cpu,
            "ceiling_kafka": kafka,
            "ceiling_embedder": {
                "embedder": embedder.model_id,
                "texts": len(texts),
                "texts_per_s": round(texts_per_s, 1),
                "texts_per_s_runs": [round(r, 1) for r in rates],
                "interactions_per_s_equivalent": round(texts_per_s / items_per_interaction, 1),
                "pipeline_share": round(n / ingest_s / (texts_per_s / items_per_interaction), 3),
            },
        }
        name = "ingest" + (f"-readers{readers}" if readers > 1 else "-split" if split else "")
        write(name, results, console,
              side_by_side=("memstream", "mem0"))  # fmt: skip
    finally:
        for w in workers:
            w.discard()
    if "mem0" in peers:
        results["mem0"] = peer_ingest(interactions, probes, base)
        write(name, results, console, side_by_side=("memstream", "mem0"))
    return results


def peer_ingest(interactions: list[Interaction], probes: int, settings: Settings) -> dict[str, Any]:
    """The same interactions through mem0's ``add``, one at a time as its API takes them."""
    from bench.peers import mem0

    console = Console()
    rows = [{"cube_id": i.cube_id, "speaker": i.speaker, "content": i.content,
             "turn_id": i.turn_id} for i in interactions]  # fmt: skip
    with console.status(f"mem0: adding the same {len(rows):,} interactions..."):
        peer = mem0.ingest(rows, probes, settings.tools_dir / "onnx",
                           settings.embedder == "onnx-int8")  # fmt: skip
    return {
        "total_s": round(peer["total_s"], 2),
        "interactions_per_s": round(len(rows) / peer["total_s"], 1),
        "memories_per_s": round(len(rows) / peer["total_s"], 1),
        "add": percentiles(peer["add_ms"]),
        "event_to_searchable": percentiles(peer["to_searchable_ms"]),
    }


if __name__ == "__main__":
    run()

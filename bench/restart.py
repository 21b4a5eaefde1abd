"""Restart time over a long op log, with and without a fold snapshot.

A worker that is (re)assigned a partition rebuilds its fold before it handles anything on it.
Without snapshots that means folding ``memory-ops`` from offset 0, so restart time grows with the
log forever; with them it reads the latest snapshot and folds the tail. This benchmark writes a
synthetic log of N ops (realistic 384-dim ADDs, then scheduler-like ACTIVATE/DEACTIVATE ops) on
fresh topics, snapshots every partition at N - tail ops (as the views processor does every
``snapshot_every`` ops), appends the tail, then restores every partition both ways through the
runtime's own :func:`~streams.runtime.partitions.restore_partition`, and checks both folds agree.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Message
from rich.console import Console
from rich.progress import Progress

from bench import synthetic
from bench.report import write
from processors.fold import MemoryTable
from schemas import Codec
from sinks.stores import minio_client
from streams.runtime.partitions import read_partition, restore_partition
from streams.runtime.snapshots import SnapshotStore, states_of
from streams.settings import Settings
from streams.transport.producer import EventProducer
from streams.transport.topics import MEMORY_OPS, ensure_topics

OPS_PER_MEMORY = 4


def _restore_all(settings: Settings, snapshots: SnapshotStore | None) -> tuple[float, int, dict]:
    """Rebuild every partition's fold; return (seconds, ops folded from the log, fold)."""
    codec, topic = Codec(), settings.topic(MEMORY_OPS.name)
    tables: dict[int, MemoryTable] = {}
    folded = 0
    started = time.perf_counter()
    for p in range(settings.partitions):
        table = tables[p] = MemoryTable()

        def handle(msg: Message, table: MemoryTable = table) -> None:
            table.apply(codec.decode(msg.value(), reader=MEMORY_OPS.record).record)

        folded += restore_partition(settings, snapshots, topic, p, table.load, handle).tail.messages
    return time.perf_counter() - started, folded, tables


def run(ops: int = 1_000_000, tail: int = 10_000) -> dict[str, Any]:
    console = Console()
    settings = Settings()
    settings = settings.model_copy(
        update={"topic_prefix": f"bench-restart-{uuid.uuid4().hex[:6]}."}
    )
    ensure_topics(settings)
    topic = settings.topic(MEMORY_OPS.name)
    memories = ops // OPS_PER_MEMORY
    log = synthetic.ops(memories, OPS_PER_MEMORY, cubes=200)
    codec = Codec()
    snapshots = SnapshotStore(minio_client(settings), settings.minio_bucket, codec)
    with EventProducer(settings, codec) as producer, Progress(console=console) as progress:
        task = progress.add_task(f"writing {ops:,} synthetic ops", total=ops)
        written = 0
        batch: list[tuple[str, dict]] = []
        for cube, op in log:
            batch.append((cube, op))
            if len(batch) == 5000 or written + len(batch) == ops - tail:
                producer.publish_many(topic, MEMORY_OPS.record, batch)
                written += len(batch)
                progress.update(task, completed=written)
                batch = []
                if written == ops - tail:
                    break
        task_s = progress.add_task("snapshotting every partition", total=settings.partitions)
        snap_started = time.perf_counter()
        for p in range(settings.partitions):
            table = MemoryTable()

            def handle(msg: Message, table: MemoryTable = table) -> None:
                table.apply(codec.decode(msg.value(), reader=MEMORY_OPS.record).record)

            done = read_partition(settings, topic, p, 0, handle)
            states = states_of(table.memories.values())
            snapshots.save(topic, p, done.next_offset, done.messages, states)
            progress.advance(task_s)
        snapshot_s = time.perf_counter() - snap_started
        rest = [*batch, *log]
        producer.publish_many(topic, MEMORY_OPS.record, rest)
        progress.update(task, completed=written + len(rest))

    with console.status("restoring every partition from offset 0..."):
        cold_s, cold_ops, cold = _restore_all(settings, None)
    with console.status("restoring every partition from its snapshot + tail..."):
        warm_s, warm_ops, warm = _restore_all(settings, snapshots)
    same = all(cold[p].memories == warm[p].memories for p in cold)
    memories_total = sum(len(t.memories) for t in warm.values())
    results = {
        "ops_in_log": cold_ops,
        "memories": memories_total,
        "partitions": settings.partitions,
        "tail_ops": warm_ops,
        "without_snapshot": {
            "restart_s": round(cold_s, 2),
            "ops_folded": cold_ops,
            "ops_per_s": round(cold_ops / cold_s),
        },
        "with_snapshot": {
            "restart_s": round(warm_s, 2),
            "ops_folded": warm_ops,
            "speedup": round(cold_s / warm_s, 1),
        },
        "snapshot_write_s": round(snapshot_s, 2),
        "folds_equal": same,
    }
    write("restart", results, console)
    if not same:
        raise AssertionError("the fold restored from a snapshot differs from the fold from 0")
    return results


if __name__ == "__main__":
    run()

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
from streams.runtime.partitions import restore_partitions
from streams.runtime.snapshots import SnapshotStore, states_of
from streams.settings import Settings
from streams.transport.follower import OpReader, fold_partitions
from streams.transport.producer import EventProducer
from streams.transport.topics import MEMORY_OPS, ensure_topics


def _restore_all(settings: Settings, snapshots: SnapshotStore | None) -> tuple[float, int, dict]:
    """Rebuild every partition's fold as a restarted reader does; return (seconds, ops folded
    from the log, the fold)."""
    topic, ops = settings.topic(MEMORY_OPS.name), OpReader(settings)
    table = MemoryTable()

    def handle(msg: Message) -> None:
        ops.fold(table, msg)

    started = time.perf_counter()
    done = restore_partitions(settings, snapshots, topic, list(range(settings.partitions)),
                              table.load, handle)  # fmt: skip
    return time.perf_counter() - started, sum(r.tail.messages for r in done.values()), table


def run(ops: int = 1_000_000, ops_per_memory: int = 4, tail: int = 10_000) -> dict[str, Any]:
    console = Console()
    settings = Settings()
    settings = settings.model_copy(
        update={"topic_prefix": f"bench-restart-{uuid.uuid4().hex[:6]}."}
    )
    ensure_topics(settings)
    topic = settings.topic(MEMORY_OPS.name)
    memories = ops // ops_per_memory
    log = synthetic.ops(memories, ops_per_memory, cubes=200)
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
        tables = {p: MemoryTable() for p in range(settings.partitions)}
        done = fold_partitions(settings, OpReader(settings, codec), dict.fromkeys(tables, 0),
                               tables)  # fmt: skip
        snap_started = time.perf_counter()
        for p, table in tables.items():
            states = states_of(table.memories.values())
            snapshots.save(topic, p, done[p].next_offset, done[p].messages, states)
            progress.advance(task_s)
        snapshot_s = time.perf_counter() - snap_started
        rest = [*batch, *log]
        producer.publish_many(topic, MEMORY_OPS.record, rest)
        progress.update(task, completed=written + len(rest))

    with console.status("restoring every partition from offset 0..."):
        cold_s, cold_ops, cold = _restore_all(settings, None)
    with console.status("restoring every partition from its snapshot + tail..."):
        warm_s, warm_ops, warm = _restore_all(settings, snapshots)
    same = cold.memories == warm.memories
    memories_total = len(warm.memories)
    results = {
        "ops_in_log": cold_ops,
        "ops_per_memory": ops_per_memory,
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
    write(f"restart-{ops_per_memory}", results, console)
    if not same:
        raise AssertionError("the fold restored from a snapshot differs from the fold from 0")
    return results


if __name__ == "__main__":
    run()

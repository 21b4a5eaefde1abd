"""Reading one partition of the op log from an offset to its end: how a worker catches its fold
up for a partition it was just given, before it handles anything on it.

"The end" is the last stable offset: this consumer reads committed transactions only, so an op
of a transaction still open (a writer that died mid-batch, aborted when its transaction times
out) is neither folded nor waited for.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    TopicPartition,
)

from processors.fold import Memory
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings
from streams.transport.consumer import raise_if_fatal
from streams.transport.topics import retry_kafka


@dataclass(frozen=True)
class CaughtUp:
    """Where a catch-up ended: the next offset to read and how many messages it folded."""

    next_offset: int
    messages: int
    seconds: float


def read_partition(
    settings: Settings,
    topic: str,
    partition: int,
    start: int,
    handle: Callable[[Message], None],
) -> CaughtUp:
    """Hand every committed message of ``topic``/``partition`` from ``start`` up to the end of
    the log (as it is when the call begins) to ``handle``, in order."""
    return read_partitions(settings, topic, {partition: start}, handle)[partition]


def read_partitions(
    settings: Settings,
    topic: str,
    starts: dict[int, int],
    handle: Callable[[Message], None],
    batch: int = 5000,
    until: dict[int, int] | None = None,
) -> dict[int, CaughtUp]:
    """:func:`read_partition` for several partitions at once, with one consumer (each
    partition's messages in order; a worker given six partitions fetches them together).
    ``until`` stops a partition before that offset instead (time travel: the log as it was)."""
    began = time.monotonic()
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": settings.group(f"catch-up-{uuid.uuid4().hex[:8]}"),
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
        }
    )
    try:
        ends = {
            p: retry_kafka(
                lambda p=p: consumer.get_watermark_offsets(TopicPartition(topic, p), 30)
            )[1]
            for p in starts
        }
        for p, stop in (until or {}).items():
            ends[p] = min(ends[p], stop)
        positions = {p: max(start, 0) for p, start in starts.items()}
        counts = dict.fromkeys(starts, 0)
        todo = {p for p in starts if ends[p] > positions[p]}
        if todo:
            consumer.assign([TopicPartition(topic, p, positions[p] or OFFSET_BEGINNING)
                             for p in sorted(todo)])  # fmt: skip
        while todo:
            for msg in consumer.consume(batch, 0.2):
                p = msg.partition()
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        todo.discard(p)  # at the last stable offset: nothing more to fold
                    else:
                        raise_if_fatal(msg.error())
                    continue
                if p not in todo or msg.offset() >= ends[p]:
                    todo.discard(p)
                    continue
                handle(msg)
                counts[p] += 1
                if msg.offset() + 1 >= ends[p]:
                    todo.discard(p)
            # The fetch position steps over transaction markers, unlike last offset + 1.
            for tp in consumer.position([TopicPartition(topic, p) for p in starts]):
                if tp.offset >= 0:
                    positions[tp.partition] = min(
                        max(positions[tp.partition], tp.offset), ends[tp.partition]
                    )
                    if tp.offset >= ends[tp.partition]:
                        todo.discard(tp.partition)
        seconds = time.monotonic() - began
        return {p: CaughtUp(positions[p], counts[p], seconds) for p in starts}
    finally:
        consumer.close()


@dataclass(frozen=True)
class Restored:
    """How a partition's fold was rebuilt: from which snapshot offset (0: none), the tail."""

    snapshot_offset: int
    snapshot_states: int
    tail: CaughtUp


def restore_partitions(
    settings: Settings,
    snapshots: SnapshotStore | None,
    topic: str,
    partitions: list[int],
    load: Callable[[list[Memory]], None],
    handle: Callable[[Message], None],
    snapshot_key: str | None = None,
) -> dict[int, Restored]:
    """:func:`restore_partition` for several partitions: their snapshots (kept under
    ``snapshot_key``, the topic by default), then one read of all their tails together."""
    starts, found = {}, {}
    for p in partitions:
        snapshot = snapshots.latest(snapshot_key or topic, p) if snapshots is not None else None
        if snapshot is not None:
            load(snapshot.states)
        starts[p] = snapshot.next_offset if snapshot else 0
        found[p] = len(snapshot.states) if snapshot else 0
    tails = read_partitions(settings, topic, starts, handle)
    return {p: Restored(starts[p], found[p], tails[p]) for p in partitions}


def restore_partition(
    settings: Settings,
    snapshots: SnapshotStore | None,
    topic: str,
    partition: int,
    load: Callable[[list[Memory]], None],
    handle: Callable[[Message], None],
) -> Restored:
    """Rebuild a partition's fold: the latest snapshot (if any) handed to ``load``, then every
    later op of the log handed to ``handle``. What a worker does on a newly assigned partition,
    and what bounds its restart time."""
    snapshot = snapshots.latest(topic, partition) if snapshots is not None else None
    start = 0
    if snapshot is not None:
        load(snapshot.states)
        start = snapshot.next_offset
    tail = read_partition(settings, topic, partition, start, handle)
    return Restored(start, len(snapshot.states) if snapshot else 0, tail)

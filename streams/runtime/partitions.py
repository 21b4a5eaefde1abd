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
    KafkaException,
    Message,
    TopicPartition,
)

from processors.fold import Memory
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings
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
    batch: int = 2000,
) -> CaughtUp:
    """Hand every committed message of ``topic``/``partition`` from ``start`` up to the end of
    the log (as it is when the call begins) to ``handle``, in order."""
    began = time.monotonic()
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": settings.group(f"catch-up-{uuid.uuid4().hex[:8]}"),
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.max.bytes": 64 * 1024 * 1024,
        }
    )
    try:
        _, end = retry_kafka(
            lambda: consumer.get_watermark_offsets(TopicPartition(topic, partition), 30)
        )
        if end <= start:
            return CaughtUp(max(start, 0), 0, time.monotonic() - began)
        consumer.assign(
            [TopicPartition(topic, partition, start if start > 0 else OFFSET_BEGINNING)]
        )
        count = 0
        position = start
        while position < end:
            eof = False
            for msg in consumer.consume(batch, 1.0):
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        eof = True
                        continue
                    raise KafkaException(msg.error())
                handle(msg)
                count += 1
            # The fetch position steps over transaction markers, unlike last offset + 1.
            position = max(consumer.position([TopicPartition(topic, partition)])[0].offset, start)
            if eof:
                break
        return CaughtUp(max(position, start, 0), count, time.monotonic() - began)
    finally:
        consumer.close()


@dataclass(frozen=True)
class Restored:
    """How a partition's fold was rebuilt: from which snapshot offset (0: none), the tail."""

    snapshot_offset: int
    snapshot_states: int
    tail: CaughtUp


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

"""Fold snapshots in the real MinIO: a restart from the latest snapshot plus the tail of the
log folds to exactly what a fold from offset 0 gives."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import asdict
from itertools import islice

import pytest
from confluent_kafka import Message

from bench import synthetic
from processors.fold import MemoryTable
from schemas import Codec
from sinks.stores import minio_client
from streams.runtime.partitions import restore_partition
from streams.runtime.snapshots import SnapshotStore, states_of
from streams.settings import Settings
from streams.transport.follower import read_partition
from streams.transport.producer import EventProducer
from streams.transport.topics import MEMORY_OPS, ensure_topics

pytestmark = pytest.mark.integration


def folder(table: MemoryTable, codec: Codec) -> Callable[[Message], None]:
    def handle(msg: Message) -> None:
        table.apply(codec.decode(msg.value(), reader=MEMORY_OPS.record).record)

    return handle


def full(table: MemoryTable) -> dict[str, dict]:
    """Every field of every state, the ones equality skips (payload, source) included."""
    return {mid: asdict(m) for mid, m in table.memories.items()}


def test_snapshot_plus_tail_equals_the_fold_from_offset_0(settings: Settings) -> None:
    s = settings.model_copy(update={"topic_prefix": f"snap-{uuid.uuid4().hex[:8]}.",
                                    "partitions": 2})  # fmt: skip
    ensure_topics(s)
    topic, codec = s.topic(MEMORY_OPS.name), Codec()
    log = list(synthetic.ops(memories=1500, ops_per_memory=4, cubes=7))
    head, tail = log[:4000], log[4000:]
    snapshots = SnapshotStore(minio_client(s), s.minio_bucket)
    with EventProducer(s) as producer:
        producer.publish_many(topic, MEMORY_OPS.record, head)
        for p in range(2):
            table = MemoryTable()
            done = read_partition(s, topic, p, 0, folder(table, codec))
            assert done.messages > 0
            snapshots.save(
                topic, p, done.next_offset, done.messages, states_of(table.memories.values())
            )
        producer.publish_many(topic, MEMORY_OPS.record, tail)

    for p in range(2):
        restored = MemoryTable()
        result = restore_partition(s, snapshots, topic, p, restored.load, folder(restored, codec))
        from_zero = MemoryTable()
        read_partition(s, topic, p, 0, folder(from_zero, codec))
        assert result.snapshot_offset > 0 and result.snapshot_states > 0
        assert 0 < result.tail.messages < len(log)
        assert full(restored) == full(from_zero)
        assert {m.version for m in restored.memories.values()} <= {1, 2, 3, 4}


def test_newest_readable_snapshot_wins_and_old_ones_are_pruned(settings: Settings) -> None:
    topic = f"snaptest-{uuid.uuid4().hex[:8]}"
    snapshots = SnapshotStore(minio_client(settings), settings.minio_bucket)
    table = MemoryTable()
    for _, op in islice(synthetic.ops(memories=50, ops_per_memory=2, cubes=3), 100):
        table.apply(op)
    states = states_of(table.memories.values())
    for offset in (10, 20, 30):
        snapshots.save(topic, 0, offset, offset, states)
    assert snapshots._offsets(topic, 0) == [20, 30]
    assert snapshots.latest(topic, 0).next_offset == 30
    assert snapshots.latest(topic, 0, at_most=25).next_offset == 20
    assert snapshots.latest(topic, 0, at_most=5) is None
    # A torn object (a writer that died mid-upload) is skipped for the older one.
    name = f"snapshots/{topic}/0000/{40:020d}.snap"
    client = minio_client(settings)
    client.put_object(settings.minio_bucket, name, io.BytesIO(b"\x00\x00\x01\x00trunc"), 9)
    got = snapshots.latest(topic, 0)
    assert got is not None and got.next_offset == 30
    assert {m.memory_id: m for m in got.states} == table.memories

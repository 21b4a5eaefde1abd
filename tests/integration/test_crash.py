"""kill -9 the worker in the middle of ingesting 2,000 interactions; restart; nothing is lost,
nothing is doubled, and the views agree with the log."""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from processors.extract import RuleExtractor
from processors.fusion import CubeMemories
from processors.reader import MemReader, Sourced
from schemas import Codec
from streams.pipeline.build import embedder_for
from streams.sdk import locomo
from streams.sdk.local import ServeProcess
from streams.settings import Settings
from streams.transport.events import Interaction
from streams.transport.producer import EventProducer
from streams.transport.topics import MEMORY_OPS

pytestmark = pytest.mark.integration

TOTAL = 2000


def conversation(run: str) -> list[Interaction]:
    """2,000 real LoCoMo turns, one cube per conversation, in their order."""
    turns = (
        interaction
        for sample in locomo.load()
        for interaction in locomo.interactions(sample, f"crash-{run}-{sample.sample_id}")
    )
    return list(islice(turns, TOTAL))


def expected_memories(interactions: list[Interaction], settings: Settings) -> dict[str, set[str]]:
    """What a worker that never crashed holds: the same reader, run here, in one pass."""
    memories = CubeMemories(384)
    reader = MemReader(RuleExtractor(), embedder_for(settings), memories)
    for start in range(0, len(interactions), 64):
        reader.process([Sourced(i.to_record()) for i in interactions[start : start + 64]])
    expected: dict[str, set[str]] = defaultdict(set)
    for memory in memories.table.memories.values():
        if memory.searchable:
            expected[memory.cube_id].add(memory.memory_id)
    return expected


def ops_on_topic(settings: Settings) -> list[str]:
    """Event ids of every committed op on the memory-ops topic."""
    topic = settings.topic(MEMORY_OPS.name)
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"count-{uuid.uuid4()}"}
    )
    codec = Codec()
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p, 0) for p in partitions]
        consumer.assign(tps)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in partitions}
        ids: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                ids.append(codec.decode(msg.value()).record["event_id"])
            positions = {tp.partition: tp.offset for tp in consumer.position(tps)}
            if all(ends[p] == 0 or positions[p] >= ends[p] for p in partitions):
                break
        return ids
    finally:
        consumer.close()


def test_kill_9_mid_ingest_loses_and_doubles_nothing(settings: Settings, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    interactions = conversation(run)
    worker = ServeProcess(settings, tmp_path / "worker").start()
    with EventProducer(worker.settings) as producer:
        producer.publish_interactions(interactions)

    deadline = time.monotonic() + 120
    while worker.client.status()["counters"]["reader"]["interactions"] < TOTAL // 4:
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.2)
    before = worker.client.status()["counters"]["reader"]["interactions"]
    worker.kill()
    assert before < TOTAL, "the crash must happen mid-ingest"

    worker.start()
    worker.client.wait_drained(600)

    expected = expected_memories(interactions, worker.settings)
    for cube, ids in expected.items():
        rows = worker.client.memories(cube, limit=16384)
        got = Counter(r["memory_id"] for r in rows)
        assert all(n == 1 for n in got.values()), f"{cube}: a memory id appears twice"
        assert set(got) == ids, (
            f"{cube}: {len(ids - set(got))} missing, {len(set(got) - ids)} extra"
        )

    versions = worker.client.audit(
        "SELECT memory_id, arraySort(groupArray(version)) AS versions "
        f"FROM memory_ops FINAL WHERE cube_id LIKE 'crash-{run}-%' GROUP BY memory_id"
    )
    assert versions
    for row in versions:
        assert row["versions"] == list(range(1, len(row["versions"]) + 1)), row

    # Search after the restart answers from the working set rebuilt from the log, in full.
    working_set = worker.client.status()["working_set"]
    assert working_set["memories"] == sum(len(ids) for ids in expected.values())
    assert working_set["loads"] == 0
    cube, ids = next(iter(expected.items()))
    hits = worker.client.search(cube, "what happened", top_k=10, include_history=True)["hits"]
    assert hits and {h["memory_id"] for h in hits} <= ids

    on_topic = ops_on_topic(worker.settings)
    assert len(on_topic) == len(set(on_topic)), "an op was published twice"
    counts = worker.client.audit(
        "SELECT count() AS n, uniqExact(event_id) AS distinct_ids FROM memory_ops FINAL"
    )[0]
    assert counts["n"] == counts["distinct_ids"] == len(on_topic)
    worker.stop()

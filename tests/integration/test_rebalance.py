"""Scale-out and hand-over: two reader processes and one views process ingest 5,000 LoCoMo
interactions over 40 cubes; one reader is killed -9 mid-way and the other takes its partitions
over. The result is exactly a single worker's: the same memory ids and versions, each memory once
in the view, no op twice on the log."""

from __future__ import annotations

import time
import uuid
import zlib
from collections import Counter, defaultdict
from itertools import cycle, islice
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

TOTAL = 5000
CUBES = 40


def workload(run: str) -> list[Interaction]:
    """5,000 real turns (the dev conversations, cycled), each session in one of 40 cubes."""
    turns = [t for s in locomo.load() for t in locomo.interactions(s, "x")]
    out = []
    for index, t in enumerate(islice(cycle(turns), TOTAL)):
        cube = zlib.crc32(f"{index // len(turns)}/{t.session_id}".encode()) % CUBES
        out.append(t.model_copy(update={"cube_id": f"rb-{run}-{cube}",
                                        "event_id": f"{run}-{index}"}))  # fmt: skip
    return out


def single_worker(interactions: list[Interaction], settings: Settings) -> list[dict]:
    """The ops one worker that never crashed emits for this input, in one pass."""
    reader = MemReader(RuleExtractor(), embedder_for(settings), CubeMemories(384))
    ops: list[dict] = []
    for start in range(0, len(interactions), 64):
        ops.extend(
            reader.process([Sourced(i.to_record()) for i in interactions[start : start + 64]])
        )
    return ops


def ops_on_topic(settings: Settings) -> list[dict]:
    topic = settings.topic(MEMORY_OPS.name)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"count-{uuid.uuid4()}"})  # fmt: skip
    codec = Codec()
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p, 0) for p in partitions]
        consumer.assign(tps)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in partitions}
        ops: list[dict] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                ops.append(codec.decode(msg.value()).record)
            positions = {tp.partition: tp.offset for tp in consumer.position(tps)}
            if all(ends[p] == 0 or positions[p] >= ends[p] for p in partitions):
                break
        return ops
    finally:
        consumer.close()


def test_two_readers_one_killed_mid_way_equal_a_single_worker(
    settings: Settings, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:6]
    prefix = f"rebalance-{run}."
    common = {"prefix": prefix, "snapshot_every": 400}
    views = ServeProcess(settings, tmp_path / "views", role="views", worker_id="v", **common)
    readers = [
        ServeProcess(settings, tmp_path / f"reader{i}", role="reader", worker_id=str(i), **common)
        for i in range(2)
    ]
    for process in (views, *readers):
        process.start()
    interactions = workload(run)
    try:
        with EventProducer(views.settings) as producer:
            producer.publish_interactions(interactions)
        # Kill -9 a reader that owns partitions once it has done a fair share of its work.
        deadline = time.monotonic() + 300
        while True:
            stats = [r.client.status()["processors"]["reader"]["stats"] for r in readers]
            busy = [i for i, st in enumerate(stats) if st["interactions"] >= 400]
            if busy:
                break
            assert time.monotonic() < deadline, f"no progress: {stats}"
            time.sleep(0.2)
        victim, survivor = readers[busy[0]], readers[1 - busy[0]]
        taken = set(stats[busy[0]]["partitions"])
        victim.kill()
        assert sum(st["interactions"] for st in stats) < TOTAL, "the kill must happen mid-way"

        views.client.wait_drained(900)
        after = survivor.client.status()["processors"]["reader"]["stats"]
        assert taken <= set(after["partitions"]), "the survivor did not take the partitions over"
        assert after["catch_up_ops"] > 0, "the survivor did not catch the fold up"

        expected = single_worker(interactions, views.settings)
        on_topic = ops_on_topic(views.settings)
        ids = [op["event_id"] for op in on_topic]
        assert len(ids) == len(set(ids)), "an op is on the log twice"
        assert sorted((o["memory_id"], o["version"], o["op"]) for o in on_topic) == sorted(
            (o["memory_id"], o["version"], o["op"]) for o in expected
        ), "the memory ids and versions differ from a single worker's"

        fold = CubeMemories(384)
        for op in expected:
            fold.apply(op)
        searchable: dict[str, set[str]] = defaultdict(set)
        for memory in fold.table.memories.values():
            if memory.searchable:
                searchable[memory.cube_id].add(memory.memory_id)
        assert len(searchable) == CUBES
        for cube, wanted in searchable.items():
            got = Counter(r["memory_id"] for r in views.client.memories(cube, limit=16384))
            assert all(n == 1 for n in got.values()), f"{cube}: a memory twice in the view"
            assert set(got) == wanted, f"{cube}: {len(wanted - set(got))} missing"

        versions = views.client.audit(
            "SELECT memory_id, arraySort(groupArray(version)) AS versions "
            f"FROM memory_ops FINAL WHERE cube_id LIKE 'rb-{run}-%' GROUP BY memory_id"
        )
        assert versions and all(
            r["versions"] == list(range(1, len(r["versions"]) + 1)) for r in versions
        )
        assert views.client.status()["processors"]["views"]["stats"]["snapshots"] > 0
    finally:
        for process in (*readers, views):
            process.stop()

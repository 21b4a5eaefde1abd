"""The writer commits a batch's transaction while it reads the next one: a commit that fails
(the writer was fenced by a newer instance) fails the processor before any later batch is
published, and the instance that takes over writes every op exactly once."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from processors.extract import RuleExtractor
from schemas import Codec
from streams.pipeline.build import embedder_for, snapshot_store
from streams.pipeline.reader import ReaderProcessor
from streams.runtime.generations import Generation
from streams.settings import Settings
from streams.transport.events import Interaction
from streams.transport.producer import EventProducer
from streams.transport.topics import MEMORY_OPS, ensure_topics

pytestmark = pytest.mark.integration

CUBE = "writer-commits"
FACTS = [
    "I adopted a grey cat called Luna in March.",
    "My sister lives in Lisbon and teaches chemistry.",
    "We are repainting the kitchen a pale green this weekend.",
    "I started learning the cello at the community school.",
    "Our team ships the billing service on Thursdays.",
    "I ran my first half marathon in 1:52.",
    "The dentist moved my appointment to the 14th.",
    "My grandfather grew tomatoes on his balcony in Porto.",
    "I switched from coffee to green tea last year.",
    "The book club reads Middlemarch next month.",
    "I am saving for a trip to Hokkaido in winter.",
    "My daughter's school play is about the solar system.",
]


def interactions(facts: list[str]) -> list[Interaction]:
    return [Interaction(cube_id=CUBE, speaker="Ana", content=f, session_id="s1") for f in facts]


def committed_ops(settings: Settings) -> list[dict]:
    """Every op the log shows a read_committed consumer, up to the end of each partition."""
    topic = settings.topic(MEMORY_OPS.name)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"count-{uuid.uuid4()}", "isolation.level": "read_committed",
                         "enable.auto.commit": False})  # fmt: skip
    codec = Codec()
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p, 0) for p in partitions]
        consumer.assign(tps)
        ops: list[dict] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3:
            messages = consumer.consume(1000, 0.5)
            if messages:
                quiet_since = time.monotonic()
            ops.extend(codec.decode(m.value()).record for m in messages)
        return ops
    finally:
        consumer.close()


def step_until(reader: ReaderProcessor, done, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the writer did not get there in time"
        reader.step()


def test_a_fenced_writer_fails_before_a_later_batch_and_its_successor_writes_once(
    base_settings: Settings,
) -> None:
    settings = base_settings.model_copy(update={
        "topic_prefix": f"test-commits-{uuid.uuid4().hex[:8]}.", "reader_batch": 4,
        "scheduler_top_n": 0, "activation_memory": False,
    })  # fmt: skip
    ensure_topics(settings)
    embedder, snapshots = embedder_for(settings), snapshot_store(settings)

    def writer() -> ReaderProcessor:
        reader = ReaderProcessor(settings, embedder, RuleExtractor(), snapshots)
        reader.open()
        return reader

    first = writer()
    with EventProducer(settings) as producer:
        producer.publish_interactions(interactions(FACTS[:4]))
        step_until(first, lambda: first.counters["interactions"] == 4)
        batch_one = committed_ops(settings)
        assert len(batch_one) == first.counters["ops_emitted"] > 0

        # A newer instance with the same transactional id fences this one (a zombie writer).
        txn_id = f"{Generation().reader_group(settings)}-{settings.worker_id}"
        fencer = Producer({"bootstrap.servers": settings.kafka_bootstrap,
                           "transactional.id": txn_id})  # fmt: skip
        fencer.init_transactions(30)

        producer.publish_interactions(interactions(FACTS[4:8]))
        producer.publish_interactions(interactions(FACTS[8:]))
        with pytest.raises(KafkaException):
            step_until(first, lambda: False)
    first.close()
    assert committed_ops(settings) == batch_one, "a fenced writer published a later batch"

    second = writer()  # the host's restart: a new instance, its fold rebuilt from the log
    try:
        step_until(second, lambda: second.counters["interactions"] == len(FACTS) - 4)
    finally:
        second.close()
    ops = committed_ops(settings)
    per_event = Counter(op["event_id"] for op in ops)
    assert max(per_event.values()) == 1, "an op was written twice"
    sources = {op["caused_by"][0] for op in ops if op["op"] == "ADD"}
    assert len(sources) == len(FACTS), "an interaction's memory is missing"

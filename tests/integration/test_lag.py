"""Group lag from the real broker: several questions in one call, each answered exactly."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streams.runtime.lag import group_lag, lags
from streams.settings import Settings
from streams.transport.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_lags_counts_each_group_on_each_topic_and_names_what_it_cannot_tell(
    base_settings: Settings,
) -> None:
    s = base_settings.model_copy(update={"topic_prefix": f"lag-{uuid.uuid4().hex[:8]}."})
    ensure_topics(s)
    a, b = s.topic("interactions"), s.topic("commands")
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
    for topic, count in ((a, 7), (b, 3)):
        for i in range(count):
            producer.produce(topic, key=f"k{i}", value=b"x")
    assert producer.flush(30) == 0
    reader, other = f"{s.topic_prefix}reader", f"{s.topic_prefix}other"
    ends = {}
    probe = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": reader})
    for topic in (a, b):
        for p in range(s.partitions):
            ends[(topic, p)] = probe.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
    # The reader group commits all of ``a`` and one message of the first non-empty partition
    # of ``b``; ``other`` commits nothing.
    first_b = next(p for p in range(s.partitions) if ends[(b, p)] > 0)
    committed = [TopicPartition(a, p, ends[(a, p)]) for p in range(s.partitions)]
    committed.append(TopicPartition(b, first_b, 1))
    probe.commit(offsets=committed, asynchronous=False)
    probe.close()

    found = lags(s, {"a": (reader, a), "b": (reader, b), "other": (other, a),
                     "missing": (reader, s.topic("no-such-topic"))})  # fmt: skip

    assert found["a"] == 0
    assert found["b"] == 3 - 1
    assert found["other"] == 7
    assert isinstance(found["missing"], Exception)
    assert group_lag(s, other, b) == 3
    with pytest.raises(RuntimeError):
        group_lag(s, reader, s.topic("no-such-topic"))

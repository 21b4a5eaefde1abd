"""Consumer-group lag: events in the log that a group has not committed yet."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from streams.settings import Settings
from streams.transport.topics import retry_kafka


def group_lag(settings: Settings, group: str, topic: str, timeout: float = 10.0) -> int:
    """Events of ``topic`` past ``group``'s committed offsets, over all partitions."""
    probe = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        metadata = probe.list_topics(topic, timeout=timeout).topics[topic]
        if metadata.error is not None or not metadata.partitions:
            raise RuntimeError(f"{topic}: {metadata.error or 'no partitions yet'}")
        partitions = metadata.partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        total = 0
        for tp in retry_kafka(lambda: probe.committed(tps, timeout)):
            high = probe.get_watermark_offsets(tp, timeout)[1]
            total += high - max(tp.offset, 0)
        return total
    finally:
        probe.close()

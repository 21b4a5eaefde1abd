"""Consumer-group lag: events in the log that a group has not committed yet.

One admin client per broker list, kept for the life of the process and shared by every caller
(it is thread-safe): ``/v1/status``, the replay's switch and tests ask for lag several times a
second, and a consumer made for each question (connect, join the metadata, fetch, close) cost
~50 ms of CPU each, taken from the pipeline it was measuring.
"""

from __future__ import annotations

import threading

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from streams.settings import Settings
from streams.transport.topics import retry_kafka

_admins: dict[str, AdminClient] = {}
_lock = threading.Lock()


def _admin(bootstrap: str) -> AdminClient:
    with _lock:
        if bootstrap not in _admins:
            _admins[bootstrap] = AdminClient({"bootstrap.servers": bootstrap})
        return _admins[bootstrap]


def group_lag(settings: Settings, group: str, topic: str, timeout: float = 10.0) -> int:
    """Events of ``topic`` past ``group``'s committed offsets, over all partitions (from 0
    where the group has committed nothing)."""
    admin = _admin(settings.kafka_bootstrap)
    metadata = admin.list_topics(topic, timeout=timeout).topics[topic]
    if metadata.error is not None or not metadata.partitions:
        raise RuntimeError(f"{topic}: {metadata.error or 'no partitions yet'}")
    tps = [TopicPartition(topic, p) for p in metadata.partitions]

    def committed() -> dict[int, int]:
        request = [ConsumerGroupTopicPartitions(group, tps)]
        found = admin.list_consumer_group_offsets(request, request_timeout=timeout)[group]
        return {tp.partition: tp.offset for tp in found.result(timeout).topic_partitions}

    offsets = retry_kafka(committed)
    latest = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout)
    return sum(
        future.result(timeout).offset - max(offsets.get(tp.partition, 0), 0)
        for tp, future in latest.items()
    )

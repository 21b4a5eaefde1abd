"""Consumer-group lag: events in the log that a group has not committed yet.

One admin client per broker list, kept for the life of the process and shared by every caller
(it is thread-safe): ``/v1/status``, the replay's switch and tests ask for lag several times a
second, and a consumer made for each question (connect, join the metadata, fetch, close) cost
~50 ms of CPU each, taken from the pipeline it was measuring.

:func:`lags` answers several questions with few broker requests (partitions from metadata
cached for half a minute, one ``ListOffsets``, one ``OffsetFetch`` per group): a status call
asks three, and at five calls a second the nine requests it used to make cost the broker and
the worker ~0.16 of a core.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from streams.settings import Settings
from streams.transport.topics import retry_kafka

_admins: dict[str, AdminClient] = {}
_lock = threading.Lock()
#: A topic's partitions, as the metadata last said, for this long: the whole cluster's metadata
#: (every topic of every earlier run) costs the broker and the client more than the lag itself.
METADATA_TTL_S = 30.0
_partitions: dict[tuple[str, str], tuple[float, list[int]]] = {}


def _admin(bootstrap: str) -> AdminClient:
    with _lock:
        if bootstrap not in _admins:
            _admins[bootstrap] = AdminClient({"bootstrap.servers": bootstrap})
        return _admins[bootstrap]


def group_lag(settings: Settings, group: str, topic: str, timeout: float = 10.0) -> int:
    """Events of ``topic`` past ``group``'s committed offsets, over all partitions (from 0
    where the group has committed nothing)."""
    found = lags(settings, {"lag": (group, topic)}, timeout)["lag"]
    if isinstance(found, Exception):
        raise found
    return found


def _partitions_of(admin: AdminClient, settings: Settings, topic: str, timeout: float) -> list[int]:
    """The partition numbers of ``topic`` (cached for :data:`METADATA_TTL_S`); RuntimeError
    while the broker does not know it."""
    key = (settings.kafka_bootstrap, topic)
    now = time.monotonic()
    with _lock:
        cached = _partitions.get(key)
    if cached is not None and now - cached[0] < METADATA_TTL_S:
        return cached[1]
    metadata = admin.list_topics(topic, timeout=timeout).topics[topic]
    if metadata.error is not None or not metadata.partitions:
        raise RuntimeError(f"{topic}: {metadata.error or 'no partitions yet'}")
    found = sorted(metadata.partitions)
    with _lock:
        _partitions[key] = (now, found)
    return found


def lags(
    settings: Settings, questions: Mapping[str, tuple[str, str]], timeout: float = 10.0
) -> dict[str, int | Exception]:
    """For each ``name: (group, topic)``, the events of ``topic`` past ``group``'s committed
    offsets (from 0 where it committed nothing), or the error that kept the broker from
    telling (a topic not created yet, a broker away): unknown is never a number."""
    admin = _admin(settings.kafka_bootstrap)
    out: dict[str, int | Exception] = {}
    partitions: dict[str, list[TopicPartition]] = {}
    for name, (_, topic) in questions.items():
        try:
            partitions[topic] = [
                TopicPartition(topic, p) for p in _partitions_of(admin, settings, topic, timeout)
            ]
        except RuntimeError as exc:
            out[name] = exc
    asked = {name: q for name, q in questions.items() if name not in out}
    if not asked:
        return out
    wanted = [tp for tps in partitions.values() for tp in tps]
    ends = {
        (tp.topic, tp.partition): future
        for tp, future in admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in wanted}, request_timeout=timeout
        ).items()
    }
    by_group: dict[str, set[str]] = {}
    for group, topic in asked.values():
        by_group.setdefault(group, set()).add(topic)

    def committed(group: str) -> dict[tuple[str, int], int]:
        tps = [tp for topic in sorted(by_group[group]) for tp in partitions[topic]]
        request = [ConsumerGroupTopicPartitions(group, tps)]
        found = admin.list_consumer_group_offsets(request, request_timeout=timeout)[group]
        done = found.result(timeout).topic_partitions
        return {(tp.topic, tp.partition): tp.offset for tp in done}

    offsets: dict[str, dict[tuple[str, int], int]] = {}
    for group in by_group:
        try:
            offsets[group] = retry_kafka(lambda g=group: committed(g))
        except Exception as exc:  # this group's lag is unknown, the others' may not be
            offsets[group] = {}
            for name, (g, _) in asked.items():
                if g == group:
                    out[name] = exc
    for name, (group, topic) in asked.items():
        if name in out:
            continue
        try:
            out[name] = sum(
                ends[(topic, tp.partition)].result(timeout).offset
                - max(offsets[group].get((topic, tp.partition), 0), 0)
                for tp in partitions[topic]
            )
        except Exception as exc:
            out[name] = exc
    return out

"""The topics of DESIGN.md and their idempotent creation.

All keyed topics share one partition count so that a cube's interactions, ops and queries are
co-partitioned and handled in order by one worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from streams.settings import Settings

log = logging.getLogger("memstream.topics")
T = TypeVar("T")
FOREVER = "-1"
THIRTY_DAYS_MS = str(30 * 24 * 3600 * 1000)


@dataclass(frozen=True)
class TopicSpec:
    """A logical topic: its short name, the record it carries and its Kafka configs."""

    name: str
    record: str
    configs: dict[str, str]


INTERACTIONS = TopicSpec(
    "interactions", "Interaction", {"cleanup.policy": "delete", "retention.ms": FOREVER}
)
MEMORY_OPS = TopicSpec(
    "memory-ops", "MemoryOp", {"cleanup.policy": "delete", "retention.ms": FOREVER}
)
QUERIES = TopicSpec(
    "queries", "QueryEvent", {"cleanup.policy": "delete", "retention.ms": THIRTY_DAYS_MS}
)
COMMANDS = TopicSpec(
    "commands", "Command", {"cleanup.policy": "delete", "retention.ms": THIRTY_DAYS_MS}
)
COMMAND_RESULTS = TopicSpec(
    "command-results", "CommandResult", {"cleanup.policy": "delete", "retention.ms": FOREVER}
)
CUBES = TopicSpec("cubes", "CubeEvent", {"cleanup.policy": "compact", "retention.ms": FOREVER})
DLQ = TopicSpec("dlq", "DeadLetter", {"cleanup.policy": "delete", "retention.ms": THIRTY_DAYS_MS})

ALL_TOPICS: tuple[TopicSpec, ...] = (
    INTERACTIONS,
    MEMORY_OPS,
    QUERIES,
    COMMANDS,
    COMMAND_RESULTS,
    CUBES,
    DLQ,
)


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (the Java client's ``Utils.murmur2``), as an unsigned 32-bit int."""
    m, h = 0x5BD1E995, (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    whole = len(data) & ~3
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[whole:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition a keyed event lands on: what every memstream producer (murmur2_random), the
    Java client and aiokafka compute. Processors use it to know which cubes a partition holds."""
    data = key.encode() if isinstance(key, str) else key
    return (murmur2(data) & 0x7FFFFFFF) % partitions


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap})


def ensure_topics(
    settings: Settings, timeout: float = 30.0, *, align_configs: bool = True
) -> list[str]:
    """Create the missing topics with their partitions and configs; return the names created.

    Existing topics are left as they are (their configs are brought in line unless
    ``align_configs`` is false, never their partition count: changing it would move keys
    between partitions and break per-cube order). Raises the broker's ``KafkaException``.
    """
    admin = admin_client(settings)
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = {settings.topic(spec.name): spec for spec in ALL_TOPICS}
    new = [
        NewTopic(
            name,
            num_partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            config=dict(spec.configs),
        )
        for name, spec in wanted.items()
        if name not in existing
    ]
    created = []
    for name, future in (admin.create_topics(new, request_timeout=timeout) if new else {}).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    present = [name for name in wanted if name in existing]
    if present and align_configs:
        resources = [
            ConfigResource(
                ConfigResource.Type.TOPIC,
                name,
                incremental_configs=[
                    ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
                    for key, value in wanted[name].configs.items()
                ],
            )
            for name in present
        ]
        for future in admin.incremental_alter_configs(resources, request_timeout=timeout).values():
            future.result()
    return created


@dataclass(frozen=True)
class TopicsAtStart:
    """What a process found of its topics when it started (:func:`topics_at_start`): the ones it
    created, or why it could not make sure they exist (``reason``; None when they do)."""

    created: tuple[str, ...] = ()
    reason: str | None = None


#: Errors that say the broker did not answer (no broker there, or not yet).
UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN}
#: Errors that say this client may not create (or see) the topics.
FORBIDDEN = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
}


def topics_at_start(settings: Settings, timeout: float = 10.0) -> TopicsAtStart:
    """Create the topics of ``settings.topic_prefix`` that do not exist yet: what ``memstream
    serve`` does before its processors start, so a new prefix needs no ``infra up`` first.

    Never raises for what the broker answers (or not): a broker that does not answer, or
    refuses (no permission, a replication factor above its broker count), is a ``reason``
    (logged, and shown by ``/readyz``, which stays red: the processors cannot read topics that
    do not exist). Existing topics' configs are left alone (``memstream infra up`` aligns them;
    a process may lack the right to).
    """
    names, prefix = [settings.topic(spec.name) for spec in ALL_TOPICS], settings.topic_prefix
    try:
        created = ensure_topics(settings, timeout, align_configs=False)
    except KafkaException as exc:
        error = exc.args[0]
        code = error.code() if isinstance(error, KafkaError) else None
        text = error.str() if isinstance(error, KafkaError) else str(exc)
        where = f"Kafka at {settings.kafka_bootstrap}"
        if code in UNREACHABLE:
            reason = f"{where} did not answer within {timeout:.0f} s ({text})"
        elif code in FORBIDDEN:
            reason = (f"{where} does not allow this process to create its topics ({text}): "
                      "create them with `memstream infra up`, or grant it CREATE on the "
                      f"prefix {prefix!r}")  # fmt: skip
        else:
            reason = f"{where} refused to create the topics ({text})"
        reason = f"cannot make sure the {len(names)} topics of prefix {prefix!r} exist: {reason}"
        log.error("%s", reason)
        return TopicsAtStart(reason=reason)
    if created:
        log.info("created topics %s (%d partitions, replication %d)", ", ".join(created),
                 settings.partitions, settings.replication_factor)  # fmt: skip
    return TopicsAtStart(created=tuple(created))


def delete_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Delete every topic under ``settings.topic_prefix`` (the Faust agents' changelogs too):
    a throwaway run's own, such as a benchmark's. Each partition costs the broker some work
    for as long as it exists; a machine that ran the benchmarks many times had thousands, and
    the next run's numbers dropped by a quarter. An empty prefix (a deployment's topics) is
    refused."""
    if not settings.topic_prefix:
        raise ValueError("refusing to delete the topics of an empty prefix")
    admin = admin_client(settings)
    names = [t for t in admin.list_topics(timeout=timeout).topics
             if t.startswith(settings.topic_prefix)]  # fmt: skip
    for future in (admin.delete_topics(names, request_timeout=timeout) if names else {}).values():
        try:
            future.result()
        except KafkaException as exc:  # deleted meanwhile (by another of the run's workers)
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
    return names


RETRIABLE = {
    KafkaError.NOT_LEADER_FOR_PARTITION,  # a topic created a moment ago: leaders being elected
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


def retry_kafka(call: Callable[[], T], attempts: int = 60, pause: float = 0.5) -> T:
    """Run a Kafka call, retrying while the broker is still electing or loading a coordinator
    (a fresh broker creates ``__consumer_offsets`` on the first group request)."""
    for attempt in range(attempts):
        try:
            return call()
        except KafkaException as exc:
            if exc.args[0].code() not in RETRIABLE or attempt == attempts - 1:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")


def wait_for_group_coordinator(settings: Settings, timeout: float = 60.0) -> None:
    """Block until consumer groups work (committed offsets can be read)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": settings.group("probe")})  # fmt: skip
    try:
        topic = settings.topic(INTERACTIONS.name)
        retry_kafka(lambda: consumer.committed([TopicPartition(topic, 0)], 5),
                    attempts=int(timeout / 0.5))  # fmt: skip
    finally:
        consumer.close()


def describe_topics(settings: Settings, timeout: float = 30.0) -> dict[str, dict[str, object]]:
    """Partition count and configs of memstream's topics as the broker reports them."""
    admin = admin_client(settings)
    metadata = admin.list_topics(timeout=timeout).topics
    names = [
        settings.topic(spec.name) for spec in ALL_TOPICS if settings.topic(spec.name) in metadata
    ]
    if not names:  # describe_configs refuses an empty list
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
    described: dict[str, dict[str, object]] = {}
    for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
        configs = {key: entry.value for key, entry in future.result().items()}
        described[resource.name] = {
            "partitions": len(metadata[resource.name].partitions),
            "cleanup.policy": configs.get("cleanup.policy"),
            "retention.ms": configs.get("retention.ms"),
        }
    return described

"""The topics of DESIGN.md and their idempotent creation.

All keyed topics share one partition count so that a cube's interactions, ops and queries are
co-partitioned and handled in order by one worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from streams.settings import Settings

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
CUBES = TopicSpec("cubes", "CubeEvent", {"cleanup.policy": "compact", "retention.ms": FOREVER})
DLQ = TopicSpec("dlq", "DeadLetter", {"cleanup.policy": "delete", "retention.ms": THIRTY_DAYS_MS})

ALL_TOPICS: tuple[TopicSpec, ...] = (INTERACTIONS, MEMORY_OPS, QUERIES, CUBES, DLQ)


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap})


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the missing topics with their partitions and configs; return the names created.

    Existing topics are left as they are (their configs are brought in line, never their
    partition count: changing it would move keys between partitions and break per-cube order).
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
    if present:
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


def describe_topics(settings: Settings, timeout: float = 30.0) -> dict[str, dict[str, object]]:
    """Partition count and configs of memstream's topics as the broker reports them."""
    admin = admin_client(settings)
    metadata = admin.list_topics(timeout=timeout).topics
    names = [
        settings.topic(spec.name) for spec in ALL_TOPICS if settings.topic(spec.name) in metadata
    ]
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

"""The Kafka topics the Faust agents read, declared on an app.

Values stay raw bytes: memstream's codec decodes them (single-object Avro, every schema version
kept), so a message that cannot be decoded reaches the agent, which dead-letters it with the
reason, instead of failing inside Faust's deserializer where no DLQ is reachable.
"""

from __future__ import annotations

import faust
from faust.types import TopicT

from streams.settings import Settings
from streams.transport.topics import MEMORY_OPS, QUERIES


def queries_topic(app: faust.App, settings: Settings) -> TopicT:
    """``memstream.queries`` (QueryEvents keyed by cube id), as raw key and value bytes."""
    return app.topic(
        settings.topic(QUERIES.name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )


def memory_ops_topic(app: faust.App, settings: Settings) -> TopicT:
    """``memstream.memory-ops`` (MemoryOps keyed by cube id), as raw key and value bytes:
    co-partitioned with ``queries``, so an app reading both owns a cube's ops and queries."""
    return app.topic(
        settings.topic(MEMORY_OPS.name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )

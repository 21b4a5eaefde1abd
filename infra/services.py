"""``memstream infra up|down|status``: every local service, in dependency order."""

from __future__ import annotations

from dataclasses import dataclass

from infra import kafka, minio
from infra.process import InfraError, port_open, read_pid
from sinks.stores import ensure_bucket
from streams.settings import Settings
from streams.topics import ensure_topics, wait_for_group_coordinator


@dataclass(frozen=True)
class ServiceStatus:
    """What ``infra status`` shows for one service."""

    name: str
    kind: str
    running: bool
    detail: str
    pid: int | None = None


def up(settings: Settings) -> list[ServiceStatus]:
    """Start whatever is not running yet (idempotent); create the bucket and the topics."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.kafka_is_local:
        kafka.up(settings)
    elif not kafka.answers(settings):
        raise InfraError(f"Kafka at {settings.kafka_bootstrap} does not answer")
    ensure_topics(settings)
    wait_for_group_coordinator(settings)
    if _minio_is_local(settings):
        minio.up(settings)
    elif not minio.answers(settings):
        raise InfraError(f"MinIO at {settings.minio_endpoint} does not answer")
    ensure_bucket(settings)
    return status(settings)


def down(settings: Settings) -> list[str]:
    """Stop the local services memstream started; return the names of those stopped."""
    stopped = []
    if minio.down(settings):
        stopped.append("minio")
    if kafka.down(settings):
        stopped.append("kafka")
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    kafka_pid = read_pid(kafka.pidfile(settings))
    minio_pid = read_pid(minio.pidfile(settings))
    return [
        ServiceStatus(
            "kafka",
            "local KRaft broker" if settings.kafka_is_local else "remote",
            kafka_pid is not None or (not settings.kafka_is_local and kafka.answers(settings)),
            f"{settings.kafka_bootstrap}  data {kafka.home(settings) / 'data'}",
            kafka_pid,
        ),
        ServiceStatus(
            "minio",
            "local server" if _minio_is_local(settings) else "remote",
            minio_pid is not None or (not _minio_is_local(settings) and minio.answers(settings)),
            f"{settings.minio_endpoint}  bucket {settings.minio_bucket}",
            minio_pid,
        ),
        ServiceStatus(
            "milvus",
            "embedded milvus-lite" if settings.milvus_is_embedded else "server",
            True,
            settings.effective_milvus_uri,
        ),
        ServiceStatus(
            "clickhouse",
            "embedded chdb" if settings.clickhouse_is_embedded else "server",
            True,
            settings.masked()["effective_clickhouse_dsn"],
        ),
    ]


def _minio_is_local(settings: Settings) -> bool:
    host = settings.minio_endpoint.rsplit(":", 1)[0]
    return host in {"127.0.0.1", "localhost"}


__all__ = ["InfraError", "ServiceStatus", "down", "port_open", "status", "up"]

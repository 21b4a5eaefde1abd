"""Clients of the three view stores, built from settings in one place.

The same code talks to the embedded engines (milvus-lite file, chdb directory) and to real
servers (Milvus, ClickHouse by URL); only the settings differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from minio import Minio

from streams.settings import Settings

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client as ClickHouseClient
    from pymilvus import MilvusClient

    from sinks.milvus import MilvusSink


def minio_client(settings: Settings) -> Minio:
    return Minio(
        settings.minio_endpoint,
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key.get_secret_value(),
        secure=settings.minio_secure,
    )


def ensure_bucket(settings: Settings, client: Minio | None = None) -> bool:
    """Create the configured bucket if it is missing; True if it was created."""
    client = client or minio_client(settings)
    if client.bucket_exists(settings.minio_bucket):
        return False
    client.make_bucket(settings.minio_bucket)
    return True


def clickhouse_client(settings: Settings) -> ClickHouseClient:
    """clickhouse-connect client: chdb in the data dir by default, a server when configured.

    The embedded engine allows one data directory per process; keep one client per process.
    """
    import clickhouse_connect

    dsn = settings.effective_clickhouse_dsn
    if settings.clickhouse_is_embedded:
        Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=dsn)


def milvus_client(settings: Settings) -> MilvusClient:
    """pymilvus client: a milvus-lite file in the data dir by default, a server when configured.

    milvus-lite allows one process per data file.
    """
    from pymilvus import MilvusClient

    uri = settings.effective_milvus_uri
    if settings.milvus_is_embedded:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    return MilvusClient(uri=uri, token=token)


def milvus_view(
    settings: Settings, collection: str = "memories", client: MilvusClient | None = None
) -> MilvusSink:
    """The plaintext view, on milvus-lite or a server as configured (see :class:`MilvusSink`
    for what differs: the vector index, paging, sealing)."""
    from sinks.milvus import MilvusSink

    return MilvusSink(
        client or milvus_client(settings), collection, embedded=settings.milvus_is_embedded
    )

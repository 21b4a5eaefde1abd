"""Fixtures of the integration tests that need more than the services of `memstream infra up`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.milvus_server import MilvusServer
from streams.settings import Settings


@pytest.fixture(scope="session")
def milvus_server(
    base_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URI of a real Milvus standalone server (the ``milvus`` package), one per test session.

    It runs on a fresh data dir, so collections never carry over between runs; the unpacked
    binaries are cached in the tools dir (the first start on a machine unpacks them, ~8 s more).
    Use it as ``settings.model_copy(update={"milvus_uri": milvus_server})``.
    """
    data_dir = tmp_path_factory.mktemp("milvus-server")
    with MilvusServer(data_dir, tools_dir=base_settings.tools_dir) as server:
        yield server.uri


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One embedded ClickHouse directory for every runtime built inside the test process: chdb
    runs one engine per process and refuses a second path (``MEMSTREAM_CLICKHOUSE_URL`` may
    name a ``chdb://`` directory explicitly)."""
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"

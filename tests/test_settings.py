"""Settings: environment overrides, derived store URIs, masking."""

from __future__ import annotations

from pathlib import Path

from streams.settings import Settings


def test_defaults_select_the_embedded_stores(clean_env: dict[str, str], tmp_path: Path) -> None:
    clean_env["MEMSTREAM_DATA_DIR"] = str(tmp_path)
    s = Settings()
    assert s.effective_milvus_uri == str(tmp_path / "milvus" / "memstream.db")
    assert s.milvus_is_embedded
    assert s.effective_clickhouse_dsn == f"chdb://{tmp_path / 'clickhouse'}"
    assert s.clickhouse_is_embedded
    assert s.kafka_is_local


def test_server_urls_select_servers(clean_env: dict[str, str]) -> None:
    clean_env["MEMSTREAM_MILVUS_URI"] = "http://milvus:19530"
    clean_env["MEMSTREAM_CLICKHOUSE_URL"] = "http://default:hunter2@clickhouse:8123"
    clean_env["MEMSTREAM_KAFKA_BOOTSTRAP"] = "kafka-1:9092,kafka-2:9092"
    clean_env["MEMSTREAM_PARTITIONS"] = "12"
    s = Settings()
    assert not s.milvus_is_embedded
    assert not s.clickhouse_is_embedded
    assert not s.kafka_is_local
    assert s.partitions == 12
    assert s.topic("memory-ops") == "memstream.memory-ops"


def test_masked_hides_secrets(clean_env: dict[str, str]) -> None:
    clean_env["MEMSTREAM_MINIO_SECRET_KEY"] = "super-secret-key"
    clean_env["MEMSTREAM_CLICKHOUSE_URL"] = "http://default:hunter2@clickhouse:8123"
    values = Settings().masked()
    text = repr(values)
    assert "super-secret-key" not in text
    assert "hunter2" not in text
    assert values["minio_secret_key"] == "********"
    assert values["effective_clickhouse_dsn"] == "http://default:********@clickhouse:8123"


def test_the_writers_batch_fits_its_extractor(clean_env: dict[str, str]) -> None:
    """Rules take big batches (fixed costs paid once per batch); an LLM extractor makes a call
    per interaction, so its batches stay small enough to end within max.poll.interval."""
    assert Settings().effective_reader_batch == 256
    clean_env["MEMSTREAM_LLM_BASE_URL"] = "http://127.0.0.1:9/v1"
    assert Settings().effective_reader_batch == 64
    clean_env["MEMSTREAM_READER_BATCH"] = "8"
    assert Settings().masked()["effective_reader_batch"] == 8

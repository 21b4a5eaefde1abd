"""The three view stores, for real: MinIO server, chdb through clickhouse-connect, milvus-lite."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from sinks.stores import ensure_bucket, minio_client
from streams.settings import Settings

pytestmark = pytest.mark.integration


def run_python(code: str, settings: Settings) -> dict:
    """Run ``code`` in a fresh interpreter (a new process, as after a restart); return its JSON."""
    env = {
        **os.environ,
        "MEMSTREAM_DATA_DIR": str(settings.data_dir),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_minio_put_get_list_delete_5mb(settings: Settings) -> None:
    client = minio_client(settings)
    ensure_bucket(settings, client)
    assert ensure_bucket(settings, client) is False
    blob = os.urandom(5 * 1024 * 1024)
    key = f"tests/{uuid.uuid4().hex}/blob.bin"
    client.put_object(settings.minio_bucket, key, io.BytesIO(blob), len(blob))

    response = client.get_object(settings.minio_bucket, key)
    try:
        fetched = response.read()
    finally:
        response.close()
        response.release_conn()
    assert hashlib.sha256(fetched).digest() == hashlib.sha256(blob).digest()

    prefix = key.rsplit("/", 1)[0] + "/"
    listed = list(client.list_objects(settings.minio_bucket, prefix=prefix))
    assert [(o.object_name, o.size) for o in listed] == [(key, len(blob))]

    client.remove_object(settings.minio_bucket, key)
    assert list(client.list_objects(settings.minio_bucket, prefix=prefix)) == []


def test_clickhouse_mergetree_survives_a_new_process(tmp_path: Path, settings: Settings) -> None:
    local = settings.model_copy(update={"data_dir": tmp_path, "clickhouse_url": None})
    written = run_python(
        """
        import json
        from streams.settings import Settings
        from sinks.stores import clickhouse_client
        client = clickhouse_client(Settings())
        client.command(
            "CREATE TABLE IF NOT EXISTS ops (event_id String, cube_id String, version UInt32,"
            " at DateTime64(3)) ENGINE = MergeTree ORDER BY (cube_id, event_id)"
        )
        rows = [[f"e{i}", f"cube-{i % 5}", i, 1683554160 + i] for i in range(1000)]
        client.insert("ops", rows, column_names=["event_id", "cube_id", "version", "at"])
        print(json.dumps({"count": client.query("SELECT count() FROM ops").result_rows[0][0]}))
        """,
        local,
    )
    assert written == {"count": 1000}
    assert (tmp_path / "clickhouse").is_dir()
    reopened = run_python(
        """
        import json
        from streams.settings import Settings
        from sinks.stores import clickhouse_client
        client = clickhouse_client(Settings())
        r = client.query(
            "SELECT count(), uniqExact(cube_id), max(version) FROM ops WHERE cube_id = {c:String}",
            parameters={"c": "cube-3"},
        )
        engine = client.query("SELECT engine FROM system.tables WHERE name = 'ops'").result_rows
        print(json.dumps({"row": list(r.result_rows[0]), "engine": engine[0][0]}))
        """,
        local,
    )
    assert reopened == {"row": [200, 1, 998], "engine": "MergeTree"}


def test_milvus_lite_collection_survives_a_new_process(tmp_path: Path, settings: Settings) -> None:
    local = settings.model_copy(update={"data_dir": tmp_path, "milvus_uri": None})
    written = run_python(
        """
        import json
        import numpy as np
        from pymilvus import DataType
        from streams.settings import Settings
        from sinks.stores import milvus_client
        client = milvus_client(Settings())
        schema = client.create_schema(auto_id=False)
        schema.add_field("memory_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("cube_id", DataType.VARCHAR, max_length=128)
        schema.add_field("version", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=384)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="COSINE")
        client.create_collection("memories", schema=schema, index_params=index)
        rng = np.random.default_rng(7)
        vectors = rng.standard_normal((300, 384)).astype("float32")
        rows = [
            {"memory_id": f"m{i}", "cube_id": f"cube-{i % 3}", "version": 1, "vector": v.tolist()}
            for i, v in enumerate(vectors)
        ]
        client.insert("memories", rows)
        hits = client.search(
            "memories", data=[vectors[4].tolist()], limit=3, filter='cube_id == "cube-1"',
            output_fields=["cube_id"],
        )[0]
        client.delete("memories", ids=["m4"])
        after = client.search(
            "memories", data=[vectors[4].tolist()], limit=3, filter='cube_id == "cube-1"'
        )[0]
        print(json.dumps({
            "top": hits[0]["memory_id"],
            "cubes": sorted({h["entity"]["cube_id"] for h in hits}),
            "after_delete": [h["memory_id"] for h in after],
        }))
        """,
        local,
    )
    assert written["top"] == "m4"
    assert written["cubes"] == ["cube-1"]
    assert "m4" not in written["after_delete"] and len(written["after_delete"]) == 3

    reopened = run_python(
        """
        import json
        from streams.settings import Settings
        from sinks.stores import milvus_client
        client = milvus_client(Settings())
        client.load_collection("memories")
        rows = client.query("memories", filter='cube_id == "cube-1"', output_fields=["memory_id"])
        got = client.get("memories", ids=["m7", "m4"])
        print(json.dumps({
            "cube1": len(rows), "ids": sorted(r["memory_id"] for r in got)
        }))
        """,
        local,
    )
    assert reopened == {"cube1": 99, "ids": ["m7"]}

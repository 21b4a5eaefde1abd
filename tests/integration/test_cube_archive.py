"""Cube export and import on the real broker, MinIO and stores: a LoCoMo cube with merges and
updates exported (file and s3://), imported into a new cube through the writer, and the imported
view equal to the source; a second import changes nothing; bad files publish nothing."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastapi.testclient import TestClient

from processors.commands import import_memory_id
from sinks.stores import minio_client
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.sdk import locomo
from streams.sdk.cube_archive import (
    CHUNK,
    CubeArchiveError,
    export_cube,
    import_archive,
    read_archive,
    read_cube_ops,
)
from streams.settings import Settings
from streams.transport.producer import EventProducer
from streams.transport.topics import COMMANDS, ensure_topics, partition_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STATE = ("version", "status", "text", "key", "tags", "valid_from", "valid_to", "created_at",
         "updated_at", "memory_type", "activated", "source")  # fmt: skip


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    s = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("cube-archive"),
                                    "clickhouse_url": chdb_dsn,
                                    "topic_prefix": f"ca-{uuid.uuid4().hex[:8]}."})  # fmt: skip
    ensure_topics(s)
    return build_runtime(s, "all", embedder=embedder_for(s))


@pytest.fixture(scope="module")
def api(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as client:
        wait(lambda: client.get("/readyz").status_code == 200, 120, "runtime never got ready")
        yield client


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def drain(api: TestClient) -> None:
    def drained() -> bool:
        status = api.get("/v1/status").json()
        return status["caught_up"] and not any(status["lag"].values())

    wait(drained, 180, "pipeline not drained")


def memstream(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, in its own process, against this test's topics."""
    env = {**os.environ, "MEMSTREAM_TOPIC_PREFIX": settings.topic_prefix,
           "MEMSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "MEMSTREAM_MINIO_ENDPOINT": settings.minio_endpoint,
           "MEMSTREAM_PARTITIONS": str(settings.partitions), "COLUMNS": "200"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def source(api: TestClient, runtime: Runtime) -> dict[str, Any]:
    """A cube of two LoCoMo sessions, a repeated turn (MERGE) and a move twice (UPDATE)."""
    sample = locomo.load()[0]
    cube = f"src-{uuid.uuid4().hex[:6]}"
    turns = [i.model_dump(mode="json", exclude={"cube_id"})
             for i in locomo.interactions(sample, cube, max_sessions=2)]  # fmt: skip
    speaker = sample.conversation["speaker_a"]
    last = max(locomo.parse_session_time(sample.conversation[f"session_{n}_date_time"])
               for n in locomo.sessions(sample)[:2])  # fmt: skip

    def said(content: str, days: int) -> dict[str, Any]:
        at = (last + timedelta(days=days)).isoformat()
        return {"content": content, "speaker": speaker, "event_time": at}

    for batch in (turns, [said("I moved to Boston for my new studio.", 1)],
                  [said("I moved to Boston for my new studio.", 2)],
                  [said("I moved to Lisbon to be close to the ocean.", 60)]):  # fmt: skip
        assert api.post(f"/v1/cubes/{cube}/interactions", json=batch).status_code == 200
        drain(api)
    ops = read_cube_ops(runtime.settings, cube)
    kinds = {op["op"] for op in ops}
    assert {"ADD", "MERGE", "UPDATE"} <= kinds, kinds
    return {"cube": cube, "ops": ops, "sample": sample, "speaker": speaker}


def state(api: TestClient, memory_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/memories/{memory_id}")
    assert response.status_code == 200, response.text
    return response.json()


def search(api: TestClient, cube: str, q: str, **params: Any) -> list[dict[str, Any]]:
    got = api.get(f"/v1/cubes/{cube}/search", params={"q": q, **params})
    assert got.status_code == 200, got.text
    return got.json()["hits"]


def commands_end(settings: Settings, cube: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "probe"})
    try:
        tp = TopicPartition(settings.topic(COMMANDS.name), partition_for(cube, settings.partitions))
        return consumer.get_watermark_offsets(tp, 10)[1]
    finally:
        consumer.close()


def test_export_import_round_trip_gives_the_same_view(
    api: TestClient, runtime: Runtime, source: dict[str, Any], tmp_path: Path
) -> None:
    s, cube = runtime.settings, source["cube"]
    path, key = tmp_path / "cube.avro", f"exports/{uuid.uuid4().hex}.avro"
    s3 = f"s3://{s.minio_bucket}/{key}"
    for target in (str(path), s3):
        done = memstream(s, "cube", "export", cube, target)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{len(source['ops'])} ops" in done.stdout
    minio_client(s).stat_object(s.minio_bucket, key)  # really in MinIO

    archive = read_archive(s, s3)
    meta = archive.metadata
    assert (meta["memstream.format"], meta["memstream.format_version"]) == (
        "memstream.cube-export", "1",
    )  # fmt: skip
    assert (
        meta["memstream.source_cube"] == cube and meta["memstream.source_prefix"] == s.topic_prefix
    )
    assert int(meta["memstream.op_count"]) == len(source["ops"])
    assert archive.ops == source["ops"] == read_archive(s, str(path)).ops  # log order, all fields
    with path.open("rb") as handle:  # the header carries the newest MemoryOp schema
        fields = {f["name"] for f in fastavro.reader(handle).writer_schema[0]["fields"]}
    assert set(source["ops"][0]) == fields

    into = f"dst-{uuid.uuid4().hex[:6]}"
    done = memstream(s, "cube", "import", s3, "--into", into)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(source['ops'])} applied, 0 duplicate, 0 rejected" in done.stdout, done.stdout
    drain(api)

    # The op history: same kinds, versions, payloads (texts, vectors, validity), mapped ids.
    imported = read_cube_ops(s, into)
    assert len(imported) == len(source["ops"])
    for mine, theirs in zip(imported, source["ops"], strict=True):
        assert mine["memory_id"] == import_memory_id(into, theirs["memory_id"])
        assert (mine["op"], mine["version"], mine["event_time"], mine["payload"]) == (
            theirs["op"], theirs["version"], theirs["event_time"], theirs["payload"],
        )  # fmt: skip
        assert mine["supersedes"] == [import_memory_id(into, m) for m in theirs["supersedes"]]

    # The views: every memory's state, the plaintext view's rows, and search results.
    memory_ids = list(dict.fromkeys(op["memory_id"] for op in source["ops"]))
    statuses = set()
    for m in memory_ids:
        theirs, mine = state(api, m), state(api, import_memory_id(into, m))
        assert {k: mine[k] for k in STATE} == {k: theirs[k] for k in STATE}
        assert mine["cube_id"] == into and mine["supersedes"] == [
            import_memory_id(into, x) for x in theirs["supersedes"]
        ]
        statuses.add(theirs["status"])
    assert {"active", "merged"} <= statuses

    def rows(cube_id: str, ids: dict[str, str]) -> list[tuple[Any, ...]]:
        listed = api.get(f"/v1/cubes/{cube_id}/memories", params={"limit": 16384}).json()
        return sorted((ids.get(r["memory_id"], r["memory_id"]), r["version"], r["text"],
                       r["valid_from"], r["valid_to"]) for r in listed)  # fmt: skip

    mapped = {import_memory_id(into, m): m for m in memory_ids}
    assert rows(into, mapped) == rows(cube, {}) and len(rows(cube, {})) > 10
    questions = [qa["question"] for qa in source["sample"].qa[:3]]
    for q, history in [*((q, False) for q in questions), (f"{source['speaker']} moved", True)]:
        theirs = search(api, cube, q, top_k=200, include_history=history)
        mine = search(api, into, q, top_k=200, include_history=history)
        assert len(theirs) > 5, q
        # Dense ranks (exact cosine) are the same; keyword-score ties are broken by memory id,
        # which the import changes, so fused scores may differ within a tie.
        assert {mapped[h["memory_id"]]: (h["text"], h["dense_rank"], h["valid_to"])
                for h in mine} == {h["memory_id"]: (h["text"], h["dense_rank"], h["valid_to"])
                                   for h in theirs}  # fmt: skip

    # A second import of the same file: every command is DUPLICATE, no new op.
    again = memstream(s, "cube", "import", str(path), "--into", into)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"0 applied, {len(source['ops'])} duplicate, 0 rejected" in again.stdout, again.stdout
    drain(api)
    assert len(read_cube_ops(s, into)) == len(source["ops"])


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """A refusal: exit 1, one line on stderr that says why, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    error = result.stderr.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1, error
    return error


def test_bad_files_and_unknown_sources_are_refused_and_publish_nothing(
    runtime: Runtime, source: dict[str, Any], tmp_path: Path
) -> None:
    s, into = runtime.settings, f"bad-{uuid.uuid4().hex[:6]}"
    good = tmp_path / "good.avro"
    assert memstream(s, "cube", "export", source["cube"], str(good)).returncode == 0
    with good.open("rb") as handle:
        reader = fastavro.reader(handle)
        schema, records = reader.writer_schema, list(reader)
        meta = {k: v for k, v in reader.metadata.items() if k.startswith("memstream.")}
    other = tmp_path / "v2.avro"
    with other.open("wb") as out:
        fastavro.writer(out, schema, records, metadata={**meta, "memstream.format_version": "2"})
    data = good.read_bytes()
    sync = _sync_marker(good)
    cut_mid = tmp_path / "cut-mid.avro"
    cut_mid.write_bytes(data[: len(data) // 2])
    # Cut right after a block's sync marker: a valid container that lacks its last blocks.
    cut_block = tmp_path / "cut-block.avro"
    ends = [i + len(sync) for i in range(len(data)) if data.startswith(sync, i)]
    assert len(ends) >= 3, "the export should span several blocks"
    cut_block.write_bytes(data[: ends[-2]])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.avro"
    corrupt.write_bytes(bytes(flipped))

    before = commands_end(s, into)
    assert "format version 2 is not supported" in refused(
        memstream(s, "cube", "import", str(other), "--into", into)
    )
    for bad in (cut_mid, cut_block, corrupt):
        assert "truncated or corrupt export" in refused(
            memstream(s, "cube", "import", str(bad), "--into", into)
        )
    missing = f"s3://{s.minio_bucket}/exports/no-such-{uuid.uuid4().hex}.avro"
    assert f"no object {missing}" in refused(memstream(s, "cube", "import", missing))
    assert "not an Avro object container" in refused(
        memstream(s, "cube", "import", str(ROOT / "README.md"), "--into", into)
    )
    assert commands_end(s, into) == before, "a refused import published commands"
    nobody = f"nobody-{uuid.uuid4().hex[:6]}"
    assert f"cube '{nobody}' has no ops" in refused(
        memstream(s, "cube", "export", nobody, str(tmp_path / "x.avro"))
    )
    assert not (tmp_path / "x.avro").exists()


def _sync_marker(path: Path) -> bytes:
    """The 16 random bytes that end the header and every block of an Avro container."""
    with path.open("rb") as handle:
        reader = fastavro.reader(handle)
        return reader._header["sync"]


def test_an_activation_memory_travels_with_its_blob(
    api: TestClient, runtime: Runtime, tmp_path: Path
) -> None:
    s, cube, into = runtime.settings, f"kv-{uuid.uuid4().hex[:6]}", f"kv-{uuid.uuid4().hex[:6]}"
    body = [{"content": "I adopted a cat named Luna last week.", "speaker": "Caroline"}]
    assert api.post(f"/v1/cubes/{cube}/interactions", json=body).status_code == 200
    drain(api)
    [memory_id] = {op["memory_id"] for op in read_cube_ops(s, cube)}
    data = os.urandom(CHUNK + 12345)  # two chunks in the file
    sha = hashlib.sha256(data).hexdigest()
    key, store = f"kv/{sha}.bin", minio_client(s)
    store.put_object(s.minio_bucket, key, io.BytesIO(data), length=len(data))
    cache = {
        "uri": f"s3://{s.minio_bucket}/{key}",
        "model_id": "qwen2.5-0.5b",
        "token_count": 42,
        "dtype": "float16",
        "sha256": sha,
        "memory_ids": [memory_id],
    }
    activate = {"command_id": str(uuid.uuid4()), "cube_id": cube, "memory_id": memory_id,
                "command": "ACTIVATE", "issued_by": "test", "event_time": datetime.now(UTC),
                "payload": cache}  # fmt: skip
    with EventProducer(s) as producer:
        producer.publish(s.topic(COMMANDS.name), cube, COMMANDS.record, activate)
    drain(api)
    assert state(api, memory_id)["activated"]

    done = export_cube(s, cube, str(tmp_path / "kv.avro"))
    assert (done.ops, done.blobs) == (2, 1)
    store.remove_object(s.minio_bucket, key)  # the import must bring the bytes back
    summary = import_archive(s, read_archive(s, str(tmp_path / "kv.avro")), into)
    assert summary.statuses == {"APPLIED": 2}
    drain(api)
    mine = state(api, import_memory_id(into, memory_id))
    assert mine["activated"] and mine["payload"]["sha256"] == sha
    assert mine["payload"]["memory_ids"] == [import_memory_id(into, memory_id)]
    got = store.get_object(s.minio_bucket, key)
    try:
        assert got.read() == data
    finally:
        got.close()
        got.release_conn()

    # Bytes that are not what the op says are never exported.
    store.put_object(s.minio_bucket, key, io.BytesIO(b"other"), length=5)
    with pytest.raises(CubeArchiveError, match="do not match sha256"):
        export_cube(s, cube, str(tmp_path / "bad.avro"))
    assert not (tmp_path / "bad.avro").exists()

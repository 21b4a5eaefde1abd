"""The views under the sink contract, on the real broker, milvus-lite and chdb: a row a store
refuses is dead-lettered alone; a store that fails mid-batch leaves the batch's position
uncommitted; an op ahead of a version gap never costs the op that fills it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from processors.embedder import DIM
from processors.ops import embedding_bytes, make_op, plaintext_payload
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.pipeline.views import ViewsProcessor
from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.producer import EventProducer
from streams.transport.topics import DLQ, MEMORY_OPS, ensure_topics

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    """The views role only: these tests write memory-ops themselves, as a writer would."""
    s = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("views-sinks"),
                                    "clickhouse_url": chdb_dsn,
                                    "views_quiet_flush_s": 1.0,
                                    "topic_prefix": f"vs-{uuid.uuid4().hex[:8]}."})  # fmt: skip
    ensure_topics(s)
    return build_runtime(s, "views", embedder=embedder_for(s))


@pytest.fixture(scope="module")
def api(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as client:
        wait(lambda: client.get("/readyz").status_code == 200, 120, "views never got ready")
        yield client


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def vector(seed: int) -> bytes:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return embedding_bytes((v / np.linalg.norm(v)).tolist())


def added(cube: str, i: int, turn_id: str | None = None) -> dict[str, Any]:
    source = {"event_id": f"src-{cube}-{i}", "session_id": "s1",
              "turn_id": turn_id if turn_id is not None else f"D1:{i}", "topic": "interactions",
              "partition": 0, "offset": i}  # fmt: skip
    payload = plaintext_payload(f"Fact number {i} about {cube}.", vector(i), "test-model",
                                source=source)  # fmt: skip
    return make_op(event_id=str(uuid.uuid4()), cube_id=cube, memory_id=f"{cube}-m{i}", version=1,
                   op="ADD", event_time=T0 + timedelta(minutes=i), actor="writer",
                   payload=payload)  # fmt: skip


def then(op: dict[str, Any], kind: str, version: int, **extra: Any) -> dict[str, Any]:
    return make_op(event_id=str(uuid.uuid4()), cube_id=op["cube_id"], memory_id=op["memory_id"],
                   version=version, op=kind, event_time=T0 + timedelta(days=version),
                   actor="writer", **extra)  # fmt: skip


def publish_in_one_transaction(s: Settings, ops: list[dict[str, Any]]) -> None:
    """As the writer does: one transaction, so a read_committed reader sees all of it at once
    (one fetch, one step of the views)."""
    config = {"transactional.id": f"test-writer-{uuid.uuid4().hex[:8]}"}
    with EventProducer(s, config=config) as producer:
        topic = s.topic(MEMORY_OPS.name)
        producer.publish_transaction([(topic, MEMORY_OPS.record, o["cube_id"], o) for o in ops],
                                     [], None)  # fmt: skip


def ops_in_clickhouse(runtime: Runtime, cube: str) -> set[str]:
    stores = runtime.stores
    assert stores is not None
    with stores.locked():
        rows = stores.clickhouse.query(
            f"SELECT memory_id, op FROM {stores.clickhouse.ops_table} FINAL "
            "WHERE cube_id = {c:String}",
            {"c": cube},
        )
    return {f"{r['memory_id']}:{r['op']}" for r in rows}


def rows_in_milvus(runtime: Runtime, cube: str) -> set[str]:
    stores = runtime.stores
    assert stores is not None
    with stores.locked():
        return {r["memory_id"] for r in stores.milvus.rows(f'cube_id == "{cube}"')}


def dead_letters(s: Settings, group: str, wanted: int, timeout: float = 60) -> list[dict]:
    found: list[dict] = []
    with EventConsumer([s.topic(DLQ.name)], group, s) as dlq:
        deadline = time.monotonic() + timeout
        while len(found) < wanted and time.monotonic() < deadline:
            found.extend(e.value for e in dlq.poll_batch(500, 0.5))
    return found


def views(runtime: Runtime) -> ViewsProcessor:
    processor = runtime.host.get("views")
    assert isinstance(processor, ViewsProcessor)
    return processor


def test_a_row_milvus_refuses_is_dead_lettered_and_the_rest_of_its_batch_is_written(
    api: TestClient, runtime: Runtime, group_id: str
) -> None:
    s = runtime.settings
    cube = f"refuse-{uuid.uuid4().hex[:6]}"
    ops = [added(cube, i) for i in range(20)]
    ops[10] = added(cube, 10, turn_id="t" * 200)  # Milvus keeps turn_id in a VARCHAR(128)
    publish_in_one_transaction(s, ops)
    good = {f"{cube}-m{i}" for i in range(20) if i != 10}
    wait(lambda: rows_in_milvus(runtime, cube) == good, 60, "the batch's good rows not in Milvus")
    wait(lambda: len(ops_in_clickhouse(runtime, cube)) == 20, 60, "ops not in ClickHouse")
    letters = [d for d in dead_letters(s, group_id, 1) if d["offset"] >= 0]
    [letter] = [d for d in letters if cube.encode() == d["key"]]
    assert letter["error_type"] == "Refused"
    assert letter["error"].startswith("milvus refused the row") and "turn_id" in letter["error"]
    assert f"{cube}-m10".encode() in letter["value"]
    counters = api.get("/v1/status").json()["processors"]["views"]["stats"]
    assert counters["refused_rows"] >= 1
    assert api.get("/readyz").status_code == 200


def test_a_store_that_fails_mid_batch_leaves_the_batch_to_be_written_again(
    api: TestClient, runtime: Runtime
) -> None:
    """The store goes away under the views: the step fails, the processor restarts, and the
    batch is written after the restart, because its position was never committed (on main the
    consumer's close committed it on the way out, and the batch never reached the stores)."""
    s = runtime.settings
    cube = f"down-{uuid.uuid4().hex[:6]}"
    victim = views(runtime)
    restarts = api.get("/v1/status").json()["processors"]["views"]["restarts"]
    stores = runtime.stores
    assert stores is not None
    with stores.locked():  # the collection disappears between two steps
        stores.milvus.client.drop_collection(stores.milvus.collection)
    publish_in_one_transaction(s, [added(cube, i) for i in range(12)])
    wait(lambda: runtime.host.get("views") is not victim, 60, "the views never failed")
    with stores.locked():
        stores.milvus._ensure()  # the store is back
    want = {f"{cube}-m{i}" for i in range(12)}
    wait(lambda: rows_in_milvus(runtime, cube) == want, 120, "the failed batch was lost")
    assert len(ops_in_clickhouse(runtime, cube)) == 12
    status = api.get("/v1/status").json()["processors"]["views"]
    assert status["restarts"] >= restarts + 1 and "did not answer" in status["last_error"]


def test_an_op_ahead_of_a_gap_never_costs_the_op_that_fills_it(
    api: TestClient, runtime: Runtime, group_id: str
) -> None:
    s = runtime.settings
    cube = f"gap-{uuid.uuid4().hex[:6]}"
    first = added(cube, 1)
    publish_in_one_transaction(s, [first])
    wait(lambda: rows_in_milvus(runtime, cube) == {first["memory_id"]}, 60, "ADD not in Milvus")
    planted = then(first, "ARCHIVE", 3)  # ahead of v2: held back
    publish_in_one_transaction(s, [planted])
    delete = then(first, "DELETE", 2)
    publish_in_one_transaction(s, [delete])
    wait(lambda: not rows_in_milvus(runtime, cube), 60, "the deleted memory stayed in Milvus")
    wait(lambda: f"{first['memory_id']}:DELETE" in ops_in_clickhouse(runtime, cube), 60,
         "the DELETE not recorded")  # fmt: skip
    assert f"{first['memory_id']}:ARCHIVE" not in ops_in_clickhouse(runtime, cube)
    letters = dead_letters(s, group_id, 10, timeout=20)
    mine = [d for d in letters if d["key"] == cube.encode()]
    assert [d["error_type"] for d in mine] == ["VersionGap"], mine
    assert "ARCHIVE is not allowed on a deleted memory" in mine[0]["error"]
    assert api.get(f"/v1/memories/{first['memory_id']}").json()["status"] == "deleted"
    assert not views(runtime).folds[mine[0]["partition"]].pending  # snapshots are not blocked

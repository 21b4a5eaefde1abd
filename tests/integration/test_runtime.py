"""The runtime on the real broker and stores, in this process: commands through the one
writer, poison ops, supervision and readiness."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from processors.embedder import Embedder
from processors.ops import make_op
from schemas import Codec
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.producer import EventProducer
from streams.transport.topics import DLQ, MEMORY_OPS, ensure_topics

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def embedder(settings: Settings) -> Embedder:
    return embedder_for(settings)


@pytest.fixture(scope="module")
def runtime(
    settings: Settings,
    embedder: Embedder,
    tmp_path_factory: pytest.TempPathFactory,
    chdb_dsn: str,
) -> Runtime:
    s = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("runtime"),
                                    "clickhouse_url": chdb_dsn,
                                    "topic_prefix": f"rt-{uuid.uuid4().hex[:8]}."})  # fmt: skip
    ensure_topics(s)
    return build_runtime(s, "all", embedder=embedder)


@pytest.fixture(scope="module")
def api(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as client:
        wait(lambda: client.get("/readyz").status_code == 200, 120, "runtime never got ready")
        yield client


class KilledConsumer:
    """Stands in for a Kafka consumer that died: every call on it raises."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"consumer killed (called {name})")


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def drained(api: TestClient) -> bool:
    status = api.get("/v1/status").json()
    return status["caught_up"] and not any(status["lag"].values())


def publish(api: TestClient, cube: str, content: str, at: datetime) -> None:
    body = [{"content": content, "speaker": "Caroline", "event_time": at.isoformat()}]
    assert api.post(f"/v1/cubes/{cube}/interactions", json=body).status_code == 200


def command(api: TestClient, cube: str, memory_id: str, kind: str, **extra: Any) -> str:
    response = api.post(f"/v1/cubes/{cube}/commands",
                        json={"memory_id": memory_id, "command": kind, **extra})  # fmt: skip
    assert response.status_code == 202, response.text
    return response.json()["command_id"]


def audit(api: TestClient, sql: str) -> list[dict[str, Any]]:
    response = api.post("/v1/audit", json={"sql": sql})
    assert response.status_code == 200, response.text
    return response.json()


def results(api: TestClient, cube: str, count: int) -> list[dict[str, Any]]:
    sql = (f"SELECT command_id, status, reason, version FROM command_results FINAL "
           f"WHERE cube_id = '{cube}' ORDER BY source_offset")  # fmt: skip
    wait(lambda: len(audit(api, sql)) >= count, 60, "command results not recorded")
    return audit(api, sql)


def memory_of(api: TestClient, cube: str, query: str) -> dict[str, Any]:
    wait(lambda: drained(api), 120, "pipeline not drained")
    hits = api.get(f"/v1/cubes/{cube}/search", params={"q": query, "top_k": 1}).json()["hits"]
    return hits[0]


def test_status_leaves_the_lag_out_when_asked_and_counts_it_otherwise(api: TestClient) -> None:
    cube = f"lag-{uuid.uuid4().hex[:6]}"
    publish(api, cube, "I keep my bike in the hallway.", T0)
    wait(lambda: drained(api), 120, "pipeline not drained")
    quick = api.get("/v1/status", params={"lag": "false"}).json()
    assert quick["lag"] is None and quick["counters"]["reader"]["interactions"] >= 1
    full = api.get("/v1/status").json()["lag"]
    assert set(full) == {"interactions", "commands", "memory_ops"}
    assert all(isinstance(v, int) and v >= 0 for v in full.values())


def test_a_command_and_a_reader_op_on_one_memory_get_contiguous_versions(
    api: TestClient,
) -> None:
    cube = f"cmd-{uuid.uuid4().hex[:6]}"
    publish(api, cube, "I moved to Boston for my new studio.", T0)
    first = memory_of(api, cube, "Boston studio")
    # The same instant: a changed fact (the reader will UPDATE this memory) and a command.
    publish(api, cube, "I moved to Lisbon to be close to the ocean.", T0 + timedelta(days=30))
    command(api, cube, first["memory_id"], "ACTIVATE", reason="hot")
    wait(lambda: drained(api), 120, "pipeline not drained")
    [result] = results(api, cube, 1)
    assert result["status"] == "APPLIED"
    ops = audit(api, "SELECT version, op FROM memory_ops FINAL WHERE memory_id = "
                     f"'{first['memory_id']}' ORDER BY version")  # fmt: skip
    assert [o["version"] for o in ops] == [1, 2, 3]
    assert ops[0]["op"] == "ADD" and {o["op"] for o in ops[1:]} == {"UPDATE", "ACTIVATE"}
    state = api.get(f"/v1/memories/{first['memory_id']}").json()
    assert state["version"] == 3 and state["activated"] and state["valid_to"] is not None


def test_a_repeated_command_is_applied_once_and_a_bad_one_is_refused_on_record(
    api: TestClient,
) -> None:
    cube = f"cmd-{uuid.uuid4().hex[:6]}"
    publish(api, cube, "I adopted a cat named Luna last week.", T0)
    memory = memory_of(api, cube, "cat Luna")
    cid = str(uuid.uuid4())
    command(api, cube, memory["memory_id"], "ARCHIVE", command_id=cid)
    command(api, cube, memory["memory_id"], "ARCHIVE", command_id=cid)
    command(api, cube, "no-such-memory", "DELETE")
    command(api, cube, memory["memory_id"], "RESTORE", expected_version=7)
    got = results(api, cube, 4)
    assert [r["status"] for r in got] == ["APPLIED", "DUPLICATE", "REJECTED", "REJECTED"]
    assert got[0]["command_id"] == got[1]["command_id"] == cid and got[1]["version"] == 2
    assert "no memory no-such-memory" in got[2]["reason"]
    assert "the command expected v7" in got[3]["reason"]
    ops = audit(api, "SELECT op, caused_by FROM memory_ops FINAL WHERE memory_id = "
                     f"'{memory['memory_id']}' ORDER BY version")  # fmt: skip
    assert [o["op"] for o in ops] == ["ADD", "ARCHIVE"] and cid in ops[1]["caused_by"]
    wait(lambda: drained(api), 60, "pipeline not drained")
    rows = api.get(f"/v1/cubes/{cube}/memories").json()
    assert memory["memory_id"] not in {r["memory_id"] for r in rows}, "archived: out of the view"


def test_poison_ops_go_to_the_dlq_with_coordinates_and_the_fold_carries_on(
    api: TestClient, runtime: Runtime, group_id: str
) -> None:
    s = runtime.settings
    cube = f"poison-{uuid.uuid4().hex[:6]}"
    never_added = make_op(event_id=str(uuid.uuid4()), cube_id=cube, memory_id="ghost",
                          version=1, op="ARCHIVE", event_time=T0, actor="someone")  # fmt: skip
    with EventProducer(s) as producer:
        bad = [
            producer.publish_raw(s.topic(MEMORY_OPS.name), cube.encode(), b"\x00 garbage"),
            producer.publish_raw(
                s.topic(MEMORY_OPS.name), cube.encode(), Codec().encode("MemoryOp", never_added)
            ),
        ]
    publish(api, cube, "After the bad ops, I started learning the cello.", T0)
    assert "cello" in memory_of(api, cube, "cello")["text"]
    letters: dict[tuple[int, int], dict] = {}
    with EventConsumer([s.topic(DLQ.name)], group_id, s) as dlq:
        for _ in range(60):
            for e in dlq.poll_batch(500, 0.5):
                letters[(e.value["partition"], e.value["offset"])] = e.value
            if {(d.partition, d.offset) for d in bad} <= set(letters):
                break
    first, second = (letters[(d.partition, d.offset)] for d in bad)
    assert first["source_topic"] == s.topic(MEMORY_OPS.name)
    assert first["error_type"] == "DecodeError" and "C3 01" in first["error"]
    assert second["error_type"] == "FoldError" and "never added" in second["error"]
    assert api.get("/readyz").status_code == 200


def test_a_killed_processor_turns_readyz_red_within_5_s_and_is_restarted(
    api: TestClient, runtime: Runtime
) -> None:
    before = api.get("/v1/status").json()["processors"]["audit"]["restarts"]
    victim = runtime.host.get("audit")
    assert victim is not None
    # Its Kafka consumer dies under it: the processor's next call on it raises, in its own
    # thread (closing a consumer while another thread polls it can deadlock librdkafka).
    real = victim._consumer._consumer
    victim._consumer._consumer = KilledConsumer()
    killed = time.monotonic()
    wait(lambda: api.get("/readyz").status_code == 503, 5, "readyz still green after 5 s")
    red_after = time.monotonic() - killed
    body = api.get("/readyz").json()
    victim._consumer._done.clear()  # nothing left for its revoke callback to commit
    real.close()  # the failed processor no longer touches it
    wait(lambda: api.get("/readyz").status_code == 200, 60, "the processor did not come back")
    after = api.get("/v1/status").json()["processors"]["audit"]
    assert after["restarts"] == before + 1 and "consumer killed" in after["last_error"]
    assert runtime.host.get("audit") is not victim
    print(f"\nreadyz red {red_after:.2f} s after the kill: {body['processors']['audit']}")
    assert api.get("/healthz").status_code == 200


def test_searches_are_counted_per_memory_by_the_faust_agent(api: TestClient) -> None:
    cube = f"access-{uuid.uuid4().hex[:6]}"
    publish(api, cube, "I bought a red kayak for the summer.", T0)
    publish(api, cube, "My neighbour grows tomatoes on her balcony.", T0 + timedelta(hours=1))
    kayak = memory_of(api, cube, "kayak")
    for _ in range(3):
        hits = api.get(f"/v1/cubes/{cube}/search", params={"q": "kayak", "top_k": 1}).json()
        assert hits["hits"][0]["memory_id"] == kayak["memory_id"]

    def counted() -> list[dict[str, Any]]:
        return api.get(f"/v1/cubes/{cube}/access").json()

    wait(lambda: sum(r["hits"] for r in counted()) >= 4, 60, "searches not counted")
    top = counted()
    # memory_of searched once (top 1) before the three: four hits, all at rank 1.
    assert top[0]["memory_id"] == kayak["memory_id"] and top[0]["hits"] == 4
    assert top[0]["best_rank"] == 1 and top[0]["recent_hits"] == 4
    assert len(top) == 1, "a memory no search returned has no statistics"
    one = api.get(f"/v1/cubes/{cube}/memories/{kayak['memory_id']}/access").json()
    assert one["hits"] == 4

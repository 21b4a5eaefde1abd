"""MemScheduler on the real broker and stores, in this process: real searches through the API
make memories hot, the scheduler's commands become ACTIVATE ops with their evidence; when the
searches move to other memories the first ones cool (DEACTIVATE) and the new ones activate.
And CREATE of parameter memories through the writer, with a rollback as one ARCHIVE."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from processors.commands import create_command, current_memory, evidence_of
from processors.fold import MemoryTable
from processors.ops import PARAMETER_PAYLOAD
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.producer import EventProducer
from streams.transport.topics import COMMANDS, MEMORY_OPS, ensure_topics

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
TOP_N, MIN_HEAT, HALF_LIFE_S = 2, 1.5, 2.0

FACTS = {
    "pottery": "I signed up for a pottery class on Saturday mornings.",
    "violin": "I have been practising the violin every evening this spring.",
    "marathon": "I am training for the Berlin marathon with my running club.",
    "garden": "I planted tomatoes and basil in the garden behind my house.",
    "chess": "I joined a chess club that meets downtown on Thursdays.",
}


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    s = settings.model_copy(
        update={
            "data_dir": tmp_path_factory.mktemp("scheduler"),
            "clickhouse_url": chdb_dsn,
            "topic_prefix": f"sch-{uuid.uuid4().hex[:8]}.",
            "scheduler_top_n": TOP_N,
            "scheduler_min_heat": MIN_HEAT,
            "scheduler_half_life_s": HALF_LIFE_S,
            "scheduler_interval_s": 0.5,
        }
    )
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
        time.sleep(0.1)


def drained(api: TestClient) -> bool:
    status = api.get("/v1/status").json()
    return status["caught_up"] and not any(status["lag"].values())


class Ops:
    """The ops of one cube on memory-ops, read from the log as the writer commits them."""

    def __init__(self, settings: Settings, cube: str) -> None:
        self.cube, self.ops = cube, []
        group = f"test-{uuid.uuid4().hex[:8]}"
        self._consumer = EventConsumer([settings.topic(MEMORY_OPS.name)], group, settings)

    def poll(self) -> list[dict[str, Any]]:
        for event in self._consumer.poll_batch(500, 0.05):
            if event.value["cube_id"] == self.cube:
                self.ops.append(event.value)
        return self.ops

    def of(self, kind: str, memory_id: str, poll: bool = True) -> list[dict[str, Any]]:
        ops = self.poll() if poll else self.ops
        return [o for o in ops if o["op"] == kind and o["memory_id"] == memory_id]

    def close(self) -> None:
        self._consumer.close()


def search(api: TestClient, cube: str, query: str) -> str:
    response = api.get(f"/v1/cubes/{cube}/search", params={"q": query, "top_k": 1})
    assert response.status_code == 200, response.text
    return response.json()["hits"][0]["memory_id"]


def heat_up(api: TestClient, cube: str, queries: dict[str, str], times: int) -> None:
    for _ in range(times):
        for query in queries.values():
            search(api, cube, query)


def test_hot_memories_are_activated_and_demoted_when_the_queries_move(
    runtime: Runtime, api: TestClient
) -> None:
    cube = f"sched-{uuid.uuid4().hex[:6]}"
    for n, text in enumerate(FACTS.values()):
        body = [
            {
                "content": text,
                "speaker": "Caroline",
                "event_time": (T0 + timedelta(minutes=n)).isoformat(),
            }
        ]
        assert api.post(f"/v1/cubes/{cube}/interactions", json=body).status_code == 200
    wait(lambda: drained(api), 120, "ingest not drained")
    ids = {topic: search(api, cube, topic) for topic in FACTS}
    assert len(set(ids.values())) == len(FACTS), ids  # each query finds its own memory
    ops = Ops(runtime.settings, cube)
    started_ms = int(time.time() * 1000)

    # Phase 1: pottery and violin are searched, 4 times each (4 first-ranked hits: heat ~4).
    first = {"pottery": "pottery", "violin": "violin"}
    heat_up(api, cube, first, 4)
    phase1 = time.monotonic()
    for topic in first:
        wait(lambda t=topic: ops.of("ACTIVATE", ids[t]), 30, f"no ACTIVATE of {topic}")
    activated_s = time.monotonic() - phase1
    for topic in first:
        [op] = ops.of("ACTIVATE", ids[topic])
        assert op["actor"].startswith("scheduler/") and op["memory_type"] == "PLAINTEXT"
        assert op["reason"].startswith("scheduler: hot: heat ")
        evidence = evidence_of(op["reason"])
        assert MIN_HEAT <= evidence["heat"] <= 5.0 + 1e-6  # 4 searches + the lookup
        assert 2 <= evidence["hits"] <= 5 and evidence["best_rank"] == 1
        assert started_ms - 60_000 <= evidence["last_hit_ms"] <= time.time() * 1000
        assert (evidence["top_n"], evidence["min_heat"], evidence["half_life_s"]) == (
            TOP_N,
            MIN_HEAT,
            HALF_LIFE_S,
        )
        assert evidence["place"] in (1, 2)
    # Nothing else was activated: the others were never hot.
    assert {o["memory_id"] for o in ops.poll() if o["op"] == "ACTIVATE"} == {ids[t] for t in first}

    # Phase 2: the queries move to marathon and chess; pottery and violin cool.
    second = {"marathon": "marathon", "chess": "chess"}
    phase2 = time.monotonic()
    deadline = phase2 + 40
    while True:
        heat_up(api, cube, second, 1)
        ops.poll()
        if all(ops.of("ACTIVATE", ids[t], poll=False) for t in second) and all(
            ops.of("DEACTIVATE", ids[t], poll=False) for t in first
        ):
            break
        assert time.monotonic() < deadline, f"the scheduler did not move: {ops.ops}"
        time.sleep(0.2)
    moved_s = time.monotonic() - phase2
    # The log's own fold, as the loop saw it: exactly the new hot memories are activated.
    table = MemoryTable()
    for op in list(ops.ops):
        table.apply(op)
    activated = {m.memory_id for m in table.in_cube(cube) if m.activated}
    assert activated == {ids[t] for t in second}
    # The view folds the same DEACTIVATE once its own consumer has read it (the test's consumer
    # may see it first): it must follow within a few polls.
    wait(lambda: not api.get(f"/v1/memories/{ids['pottery']}").json()["activated"], 10,
         "the view still shows pottery activated")  # fmt: skip
    for topic in first:
        [op] = ops.of("DEACTIVATE", ids[topic], poll=False)
        assert op["reason"].startswith(("scheduler: cooled: heat", "scheduler: displaced: heat"))
        evidence = evidence_of(op["reason"])
        assert evidence["hits"] >= 2 and evidence["best_rank"] == 1
        activate = ops.of("ACTIVATE", ids[topic], poll=False)[0]
        assert op["version"] == activate["version"] + 1  # the scheduler's two ops, in order
        # It cooled: no hit since phase 1, so its heat is at most its hits decayed from the
        # last one. (Not "below its heat when activated": the agents count in half-second
        # batches, so the activation may have been decided on part of phase 1's hits.)
        decided_ms = int(op["event_time"].timestamp() * 1000)
        assert decided_ms > evidence["last_hit_ms"]
        ceiling = evidence["hits"] * 0.5 ** (
            (decided_ms - evidence["last_hit_ms"]) / 1000 / HALF_LIFE_S
        )
        assert evidence["heat"] <= ceiling + 1e-6
    for topic in second:
        [op] = ops.of("ACTIVATE", ids[topic], poll=False)
        assert op["reason"].startswith("scheduler: hot: heat ")
        assert evidence_of(op["reason"])["heat"] >= MIN_HEAT

    # No more searches: within a few half-lives the new ones cool down too.
    for topic in second:
        wait(lambda t=topic: ops.of("DEACTIVATE", ids[t]), 30, f"{topic} never cooled")
        [op] = ops.of("DEACTIVATE", ids[topic])
        assert op["reason"].startswith("scheduler: cooled: heat")
        assert evidence_of(op["reason"])["heat"] < MIN_HEAT
    ops.close()
    # The scheduler stored only the memories the log moved past their ADD (the four it
    # activated); the fresh garden memory, never hot, has no changelog record.
    agent = runtime.host.get("scheduler")
    stored = {key.rpartition("/")[2] for key in list(agent.scheduler.memories.keys())
              if key.startswith(f"{cube}/")}  # fmt: skip
    assert stored == {ids[t] for t in (*first, *second)}

    def counters() -> dict[str, Any]:
        return api.get("/v1/status").json()["counters"]["scheduler"]

    # /v1/status shows the scheduler's counters; it has seen its own DEACTIVATEs folded.
    wait(lambda: counters()["scheduler_activated"] == 0, 10, "activated memories left")
    status = api.get("/v1/status").json()
    shown = status["counters"]["scheduler"]
    assert shown["scheduler_activate"] >= 4 and shown["scheduler_deactivate"] >= 4
    assert shown["scheduler_queries"] >= 8 + 2 + len(FACTS) and shown["scheduler_hits"] >= 15
    assert shown["scheduler_cubes"] >= 1 and shown["scheduler_decisions"] >= 4
    stats = status["processors"]["scheduler"]["stats"]
    assert stats["recovered"] is True and stats["scheduler_ops"] >= len(FACTS) + 8
    print(
        f"\nactivated {activated_s:.1f}s after the first searches; moved {moved_s:.1f}s after "
        "the queries did"
    )


def test_create_a_parameter_memory_and_roll_it_back_with_one_archive(
    runtime: Runtime, api: TestClient
) -> None:
    s, cube = runtime.settings, f"lora-{uuid.uuid4().hex[:6]}"
    body = [{"content": FACTS["garden"], "speaker": "Caroline", "event_time": T0.isoformat()}]
    assert api.post(f"/v1/cubes/{cube}/interactions", json=body).status_code == 200
    wait(lambda: drained(api), 120, "ingest not drained")
    plain = search(api, cube, "garden")

    def adapter(sha: str) -> tuple[str, dict[str, Any]]:
        return (
            PARAMETER_PAYLOAD,
            {
                "uri": f"s3://{s.minio_bucket}/lora/{sha}.safetensors",
                "base_model_id": "smollm2-135m@test",
                "rank": 4,
                "sha256": sha,
                "trained_on": [plain],
            },
        )

    v1 = create_command(cube, adapter("a1" * 32), "lora/0", T0 + timedelta(days=1))
    v2 = create_command(
        cube, adapter("a2" * 32), "lora/0", T0 + timedelta(days=2), supersedes=[v1["memory_id"]]
    )
    ops = Ops(s, cube)
    with EventProducer(s) as producer:
        topic = s.topic(COMMANDS.name)
        producer.publish_many(topic, COMMANDS.record, [(cube, v1), (cube, v2), (cube, v1)])
    wait(lambda: ops.of("ADD", v2["memory_id"]), 60, "no ADD of the second adapter")
    [add1], [add2] = ops.of("ADD", v1["memory_id"]), ops.of("ADD", v2["memory_id"])
    assert (add1["memory_type"], add1["version"], add1["payload"]["rank"]) == ("PARAMETER", 1, 4)
    assert add2["supersedes"] == [v1["memory_id"]] and add2["caused_by"] == [v2["command_id"]]

    def current() -> str | None:
        table = MemoryTable()
        for op in ops.poll():
            table.apply(op)
        found = current_memory(table.memories.values(), cube, "PARAMETER")
        return found.memory_id if found else None

    assert current() == v2["memory_id"]
    rollback = {
        "memory_id": v2["memory_id"],
        "command": "ARCHIVE",
        "expected_version": 1,
        "reason": "adapter v2 is worse",
    }
    assert api.post(f"/v1/cubes/{cube}/commands", json=rollback).status_code == 202
    wait(lambda: ops.of("ARCHIVE", v2["memory_id"]), 60, "no rollback")
    assert current() == v1["memory_id"]
    state = api.get(f"/v1/memories/{v2['memory_id']}").json()
    assert (state["status"], state["memory_type"]) == ("archived", "PARAMETER")
    forward = {**rollback, "command": "RESTORE", "expected_version": 2}
    assert api.post(f"/v1/cubes/{cube}/commands", json=forward).status_code == 202
    wait(lambda: ops.of("RESTORE", v2["memory_id"]), 60, "no roll forward")
    assert current() == v2["memory_id"]

    # The repeated CREATE was a DUPLICATE; the plaintext views never show an adapter.
    sql = (
        f"SELECT command_id, status FROM command_results FINAL WHERE cube_id = '{cube}' "
        "ORDER BY source_offset"
    )

    def results() -> list[dict[str, Any]]:
        response = api.post("/v1/audit", json={"sql": sql})
        assert response.status_code == 200, response.text
        return response.json()

    wait(lambda: len(results()) >= 5, 60, "command results not recorded")
    assert [r["status"] for r in results()] == [
        "APPLIED",
        "APPLIED",
        "DUPLICATE",
        "APPLIED",
        "APPLIED",
    ]
    wait(lambda: drained(api), 60, "not drained")
    rows = api.get(f"/v1/cubes/{cube}/memories").json()
    assert [r["memory_id"] for r in rows] == [plain]
    hits = api.get(f"/v1/cubes/{cube}/search", params={"q": "adapter garden", "top_k": 10})
    assert [h["memory_id"] for h in hits.json()["hits"]] == [plain]
    ops.close()

"""Replay on the real broker and stores: a rebuilt generation equals the live one, time travel
agrees with replay --until, and a re-extraction's ops sit in the log beside the old ones."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from processors.embedder import Embedder
from schemas import Codec
from streams.api.app import create_app
from streams.cli.app import app as cli
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.sdk import locomo
from streams.settings import Settings
from streams.transport.follower import read_partitions
from streams.transport.topics import MEMORY_OPS, ensure_topics, partition_for

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    s = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("replay"),
                                    "clickhouse_url": chdb_dsn, "snapshot_every": 150,
                                    "scheduler_top_n": 0,  # no activations: a still view
                                    "topic_prefix": f"rp-{uuid.uuid4().hex[:8]}."})  # fmt: skip
    ensure_topics(s)
    embedder: Embedder = embedder_for(s)
    return build_runtime(s, "all", embedder=embedder)


@pytest.fixture(scope="module")
def api(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as client:
        wait(lambda: client.get("/readyz").status_code == 200, 120, "runtime never got ready")
        yield client


@pytest.fixture(scope="module")
def conversation(api: TestClient) -> tuple[str, list[str]]:
    """A LoCoMo conversation's first 160 turns, a repeated line (a MERGE) and a changed fact
    (an UPDATE); returns the cube and 50 of its questions."""
    sample = locomo.load(None)[0]
    cube = f"replay-{uuid.uuid4().hex[:6]}"
    turns = [i.model_dump(mode="json", exclude={"cube_id"})
             for i in locomo.interactions(sample, cube)][:160]  # fmt: skip
    repeat = "I love painting sunsets by the lake."
    extra = [(repeat, 1), (repeat, 2), ("I moved to Denver for my first job.", 3),
             ("I moved to Boston for my new studio.", 5)]  # fmt: skip
    for text, days in extra:
        turns.append({"content": text, "speaker": "Melanie",
                      "event_time": (T0 + timedelta(days=days)).isoformat()})  # fmt: skip
    for start in range(0, len(turns), 50):
        assert api.post(f"/v1/cubes/{cube}/interactions", json=turns[start : start + 50]).is_success
    wait(lambda: drained(api), 180, "ingest never drained")
    questions = [qa["question"] for qa in sample.qa][:50]
    return cube, questions


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def reader_ops_generation(api: TestClient) -> int | None:
    reader = api.get("/v1/status").json()["processors"].get("reader")
    return reader["stats"].get("ops_generation") if reader and reader.get("stats") else None


def drained(api: TestClient) -> bool:
    status = api.get("/v1/status").json()
    return status["caught_up"] and not any(status["lag"].values())


def view(runtime: Runtime, cube: str) -> dict[str, Any]:
    """What a generation holds for a cube: Milvus rows with vectors, every folded state, the
    ClickHouse ops, the collection and table names."""
    stores = runtime.stores
    assert stores is not None
    with stores.locked():
        rows = {r["memory_id"]: r for r in stores.milvus.cube_rows(cube)}
        ops = stores.clickhouse.count_ops(cube)
    views = runtime.host.get("views")
    states = {m.memory_id: (m.version, m.status, m.text, m.valid_from, m.valid_to)
              for t in views.folds.values() for m in t.in_cube(cube)}  # fmt: skip
    names = {"collection": stores.milvus.collection, "table": stores.clickhouse.ops_table}
    return {"rows": rows, "states": states, "ops": ops, **names}


def assert_rows_match_the_fold(got: dict[str, Any], live: dict[str, Any]) -> None:
    """A rebuilt generation's Milvus rows are exactly the searchable memories of the fold, and
    every row the live generation also has is the same row (text, version, validity)."""
    searchable = {i for i, (_, status, *_) in got["states"].items() if status == "active"}
    extra, missing = set(got["rows"]) - searchable, searchable - set(got["rows"])
    assert not extra and not missing, (
        f"rows not searchable in the fold: {[(i, got['states'].get(i)) for i in extra][:5]}; "
        f"searchable without a row: {sorted(missing)[:5]}; "
        f"live rows: {len(live['rows'])}, rebuilt: {len(got['rows'])}"
    )
    for memory_id in set(got["rows"]) & set(live["rows"]):
        old, new = live["rows"][memory_id], got["rows"][memory_id]
        assert {k: v for k, v in new.items() if k != "vector"} == {
            k: v for k, v in old.items() if k != "vector"
        }


def searches(api: TestClient, cube: str, questions: list[str]) -> list[list[tuple[str, float]]]:
    out = []
    for q in questions:
        hits = api.get(f"/v1/cubes/{cube}/search", params={"q": q, "top_k": 10}).json()["hits"]
        out.append([(h["memory_id"], round(h["score"], 6)) for h in hits])
    return out


def test_rebuild_gives_the_same_view_and_search_answers_meanwhile(
    api: TestClient, runtime: Runtime, conversation: tuple[str, list[str]]
) -> None:
    cube, questions = conversation
    before = view(runtime, cube)
    assert before["collection"] == "memories" and before["table"] == "memory_ops_g0"
    assert {s[1] for s in before["states"].values()} >= {"active", "merged"}
    assert any(s[4] is not None for s in before["states"].values())  # a closed fact (UPDATE)
    answers = searches(api, cube, questions)

    during: list[tuple[bool, int, list[tuple[str, float]]]] = []
    stop = threading.Event()

    def search_while_rebuilding() -> None:
        while not stop.is_set():
            building = api.get("/v1/replay").json()["next"] is not None
            r = api.get(f"/v1/cubes/{cube}/search", params={"q": questions[0], "top_k": 10})
            hits = [(h["memory_id"], round(h["score"], 6)) for h in r.json()["hits"]]
            during.append((building, r.status_code, hits))

    searcher = threading.Thread(target=search_while_rebuilding)
    searcher.start()
    try:
        started = api.post("/v1/replay", json={"mode": "rebuild"})
        assert started.status_code == 202, started.text
        assert started.json()["next"]["id"] == 1
        assert api.post("/v1/replay", json={"mode": "rebuild"}).status_code == 409
        wait(lambda: api.get("/v1/replay").json()["current"]["id"] == 1, 180, "never switched")
    finally:
        stop.set()
        searcher.join()
    assert any(building for building, _, _ in during), "no search ran during the rebuild"
    assert all(code == 200 and hits == answers[0] for _, code, hits in during)

    wait(lambda: drained(api), 60, "not drained after the switch")
    after = view(runtime, cube)
    assert after["collection"] == "memories_g1" and after["table"] == "memory_ops_g1"
    assert after["rows"].keys() == before["rows"].keys()
    for memory_id, row in before["rows"].items():
        new = after["rows"][memory_id]
        assert {k: v for k, v in new.items() if k != "vector"} == {
            k: v for k, v in row.items() if k != "vector"
        }
        assert np.allclose(new["vector"], row["vector"])
    assert after["states"] == before["states"]
    # Per cube: the test process's runtimes share one chdb directory, so its tables too.
    assert after["ops"] == before["ops"]
    assert searches(api, cube, questions) == answers
    # The old generation is gone; the audit names (views) show the new one.
    stores = runtime.stores
    assert stores is not None
    with stores.locked():
        assert not stores.milvus.client.has_collection("memories")
        assert stores.clickhouse.query("EXISTS TABLE memory_ops_g0")[0]["result"] == 0
        audit = stores.clickhouse.query(
            "SELECT count() AS n FROM memory_ops WHERE cube_id = {c:String}", {"c": cube}
        )[0]["n"]
    assert audit == before["ops"]
    assert api.get("/v1/status").json()["generation"] == 1


def test_time_travel_shows_the_old_fact_before_its_update(
    api: TestClient, runtime: Runtime, conversation: tuple[str, list[str]]
) -> None:
    cube, _ = conversation
    t1 = datetime.now(UTC)
    time.sleep(0.05)
    body = [{"content": "I moved to Lisbon to be close to the ocean.", "speaker": "Melanie",
             "event_time": (T0 + timedelta(days=60)).isoformat()}]  # fmt: skip
    assert api.post(f"/v1/cubes/{cube}/interactions", json=body).is_success
    wait(lambda: drained(api), 60, "update never drained")
    t3 = datetime.now(UTC)
    question = "Melanie moved to"

    def top(at: datetime) -> str:
        r = api.get(f"/v1/cubes/{cube}/search",
                    params={"q": question, "top_k": 1, "as_of": at.isoformat()})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["hits"][0]["text"]

    assert "Boston" in top(t1) and "Lisbon" in top(t3)
    now_hits = api.get(f"/v1/cubes/{cube}/search", params={"q": question, "top_k": 1}).json()
    assert "Lisbon" in now_hits["hits"][0]["text"]

    def listing(at: datetime) -> dict[str, dict[str, Any]]:
        rows = api.get(f"/v1/cubes/{cube}/memories",
                       params={"as_of": at.isoformat(), "limit": 16384}).json()  # fmt: skip
        return {r["memory_id"]: r for r in rows}

    then, now = listing(t1), listing(t3)
    boston = next(r for r in then.values() if "Boston" in r["text"])
    assert boston["valid_to"] == -1 and not any("Lisbon" in r["text"] for r in then.values())
    assert now[boston["memory_id"]]["valid_to"] != -1
    assert now[boston["memory_id"]]["version"] == boston["version"] + 1
    past = api.get(f"/v1/memories/{boston['memory_id']}", params={"as_of": t1.isoformat()})
    assert past.json()["version"] == boston["version"] and past.json()["valid_to"] is None
    # As of now, the fold of the log equals the live view.
    live = {r["memory_id"]: r for r in api.get(f"/v1/cubes/{cube}/memories",
                                               params={"limit": 16384}).json()}  # fmt: skip
    assert now == live

    env = {"MEMSTREAM_TOPIC_PREFIX": runtime.settings.topic_prefix,
           "MEMSTREAM_DATA_DIR": str(runtime.settings.data_dir)}  # fmt: skip
    runner = CliRunner()
    for at, expected in ((t1, then), (t3, now)):
        shown = runner.invoke(cli, ["cube", "show", cube, "--as-of", at.isoformat(), "--json"],
                              env=env)  # fmt: skip
        assert shown.exit_code == 0, shown.output
        replayed = runner.invoke(cli, ["replay", "--until", at.isoformat(), "--cube", cube,
                                       "--json"], env=env)  # fmt: skip
        assert replayed.exit_code == 0, replayed.output
        for output in (shown.output, replayed.output):
            rows = {r["memory_id"]: r for r in json.loads(output)["memories"]}
            assert rows == expected
    bad = runner.invoke(cli, ["cube", "show", cube, "--as-of", "last tuesday"], env=env)
    assert bad.exit_code != 0 and "neither an offset nor" in bad.output
    assert api.get(f"/v1/cubes/{cube}/memories", params={"as_of": "soon"}).status_code == 400


def ops_by_generation(settings: Settings, cube: str) -> dict[int, list[dict[str, Any]]]:
    codec, found = Codec(), {}
    topic = settings.topic(MEMORY_OPS.name)

    def handle(msg: Any) -> None:
        if msg.key() == cube.encode():
            op = codec.decode(msg.value(), reader=MEMORY_OPS.record).record
            found.setdefault(op["generation"], []).append(op)

    read_partitions(settings, topic, {partition_for(cube, settings.partitions): 0}, handle)
    return found


def test_reextract_writes_a_new_generation_beside_the_old(
    api: TestClient, runtime: Runtime, conversation: tuple[str, list[str]]
) -> None:
    cube, questions = conversation
    before = view(runtime, cube)
    t_before = datetime.now(UTC)
    started = api.post("/v1/replay", json={"mode": "reextract", "reader": {"merge_threshold": 0.8}})
    assert started.status_code == 202, started.text
    assert started.json()["next"] == {**started.json()["next"], "id": 2, "ops": 1}
    busy = api.post("/v1/replay", json={"mode": "reextract", "reader": {"merge_threshold": 0.7}})
    assert busy.status_code == 409, busy.text
    # Settings that could not start are refused before anything else (and never stored).
    bad = api.post("/v1/replay", json={"mode": "reextract", "reader": {"embedder": "x"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "embedder"
    wait(lambda: api.get("/v1/replay").json()["current"]["id"] == 2, 240, "never switched")
    # The pointer flips first; this process's processors follow it right after (the old
    # writer stops, the new one takes its name), which on a loaded machine takes a moment.
    wait(lambda: reader_ops_generation(api) == 1, 60, "the new writer did not take over")
    wait(lambda: drained(api), 60, "not drained after the switch")

    ops = ops_by_generation(runtime.settings, cube)
    assert set(ops) == {0, 1}
    assert {op["reader_version"] for op in ops[1]} == {
        next(op["reader_version"] for op in ops[1])
    } and "merge=0.8" in ops[1][0]["reader_version"]
    assert all("merge=0.95" in op["reader_version"] for op in ops[0] if op["reader_version"])
    old_ids = {op["memory_id"] for op in ops[0]}
    new_ids = {op["memory_id"] for op in ops[1]}
    assert not old_ids & new_ids
    merges = {g: sum(op["op"] == "MERGE" for op in ops[g]) for g in (0, 1)}
    assert merges[1] > merges[0]

    after = view(runtime, cube)
    assert after["collection"] == "memories_g2"
    assert set(after["rows"]) <= new_ids and after["rows"]
    assert set(after["states"]) == new_ids
    assert len(after["rows"]) < len(before["rows"])  # more merged at 0.8
    hits = api.get(f"/v1/cubes/{cube}/search", params={"q": questions[0]}).json()["hits"]
    assert hits and {h["memory_id"] for h in hits} <= new_ids
    status = api.get("/v1/status").json()
    assert status["processors"]["reader"]["stats"]["ops_generation"] == 1
    assert "reader-next" not in status["processors"]
    # Time travel to before the switch shows the extraction the views showed then.
    then = api.get(f"/v1/cubes/{cube}/memories",
                   params={"as_of": t_before.isoformat(), "limit": 16384}).json()  # fmt: skip
    assert {r["memory_id"] for r in then} == set(before["rows"])
    # A new interaction is extracted by the new generation only.
    body = [{"content": "My sister Ana visits every Sunday.", "speaker": "Melanie",
             "event_time": (T0 + timedelta(days=90)).isoformat()}]  # fmt: skip
    assert api.post(f"/v1/cubes/{cube}/interactions", json=body).is_success
    wait(lambda: drained(api), 60, "new interaction never drained")
    latest = ops_by_generation(runtime.settings, cube)
    assert len(latest[0]) == len(ops[0]) and len(latest[1]) > len(ops[1])

    env = {"MEMSTREAM_TOPIC_PREFIX": runtime.settings.topic_prefix}
    compared = CliRunner().invoke(cli, ["replay", "--compare", "--cube", cube, "--json"], env=env)
    assert compared.exit_code == 0, compared.output
    report = {g["ops_generation"]: g for g in json.loads(compared.output)["generations"]}
    assert set(report) == {0, 1}
    assert report[1]["merges"] == sum(op["op"] == "MERGE" for op in latest[1])
    assert report[0]["ops"] == len(latest[0]) and report[1]["current"] is True


def test_an_interrupted_rebuild_resumes_and_switches(
    api: TestClient, runtime: Runtime, conversation: tuple[str, list[str]]
) -> None:
    cube, questions = conversation
    before = view(runtime, cube)
    answers = searches(api, cube, questions[:10])
    target = api.post("/v1/replay", json={"mode": "rebuild"}).json()["next"]["id"]
    # The process building it dies: its processor is gone, the pointer in MinIO and the
    # group's committed offsets remain. The generations processor picks the replay up again.
    runtime.host.remove("views-next")
    assert api.get("/v1/replay").json()["current"]["id"] == target - 1
    wait(lambda: "views-next" in runtime.host.slots, 90, "the replay was not resumed")
    wait(lambda: api.get("/v1/replay").json()["current"]["id"] == target, 180, "never switched")
    wait(lambda: drained(api), 60, "not drained after the switch")
    after = view(runtime, cube)
    assert after["collection"] == f"memories_g{target}"
    assert after["states"] == before["states"]
    assert_rows_match_the_fold(after, before)
    assert searches(api, cube, questions[:10]) == answers

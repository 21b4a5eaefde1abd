"""Replay on the real broker and stores, when it goes wrong or meets commands: settings that
cannot start are refused and never stored, a stored next generation that cannot start is
abandoned instead of crash-looping the server, and what commands did to the old extraction
(DELETE, ARCHIVE) holds in a re-extraction: a deleted memory stays deleted."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from processors.ops import memory_id
from streams.api.app import create_app
from streams.cli.app import app as cli
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.runtime.generations import GenerationStore
from streams.settings import Settings
from streams.transport.topics import ensure_topics
from tests.integration.test_replay import drained, reader_ops_generation, wait

pytestmark = pytest.mark.integration
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
FORGET = "I adopted a grey cat named Pixel."
SHELVE = "My favourite dessert is lemon tart."
KEEP = "I work as a nurse at the city hospital."
LATER = "I collect vintage postcards from Lisbon."
# Merged at the default threshold (cosine 0.98), two memories at 0.99.
REPEAT = ("I play the violin every evening.", "I play my violin every evening.")
OTHER = [
    "I grew up on a farm near the mountains.",
    "My brother Tom builds wooden boats.",
    "I am learning to speak Japanese.",
    "On weekends I hike with my friends.",
    "I planted tomatoes and basil in the garden.",
    "My car is an old blue pickup truck.",
]


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    s = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("replay-commands"),
                                    "clickhouse_url": chdb_dsn, "scheduler_top_n": 0,
                                    "topic_prefix": f"rc-{uuid.uuid4().hex[:8]}."})  # fmt: skip
    ensure_topics(s)
    return build_runtime(s, "all", embedder=embedder_for(s))


@pytest.fixture(scope="module")
def api(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as client:
        wait(lambda: client.get("/readyz").status_code == 200, 120, "runtime never got ready")
        yield client


def pointer(runtime: Runtime) -> dict[str, Any]:
    """The stored pointer (a default one has a new start time each read: left out)."""
    assert runtime.generations is not None
    body = runtime.generations.read().to_json()
    body["current"].pop("started_at")
    return body


def test_reader_settings_that_cannot_start_are_refused_and_not_stored(
    api: TestClient, runtime: Runtime
) -> None:
    before = pointer(runtime)
    for reader, field, why in (({"merge_threshold": "abc"}, "merge_threshold", "valid number"),
                               ({"embedder": "onnx"}, "embedder", "may change")):  # fmt: skip
        r = api.post("/v1/replay", json={"mode": "reextract", "reader": reader})
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "reader", field] and why in error["msg"], error
    rebuild = api.post("/v1/replay", json={"mode": "rebuild", "reader": {"merge_threshold": 0.9}})
    assert rebuild.status_code == 400
    env = {"MEMSTREAM_TOPIC_PREFIX": runtime.settings.topic_prefix,
           "MEMSTREAM_API_URL": "http://127.0.0.1:9"}  # fmt: skip
    cli_run = CliRunner().invoke(cli, ["replay", "--reextract", "--set", "merge_threshold=abc"],
                                 env=env)  # fmt: skip
    said = " ".join(cli_run.output.split())  # as the console wrapped it
    assert cli_run.exit_code == 2, said
    assert "merge_threshold" in said and "valid number" in said
    unknown = CliRunner().invoke(cli, ["replay", "--reextract", "--set", "lm_threads=2"], env=env)
    assert unknown.exit_code == 2 and "lm_threads" in unknown.output, unknown.output
    assert pointer(runtime) == before and before["next"] is None
    assert api.get("/v1/replay").json()["next"] is None


def test_a_stored_next_generation_that_cannot_start_is_abandoned_not_retried(
    api: TestClient, runtime: Runtime
) -> None:
    store = runtime.generations
    assert store is not None
    stored = store.read().to_json()
    current, failed_before = stored["current"], len(stored.get("failed", []))
    # What an older version stored for `replay --reextract --set merge_threshold=abc`.
    bad = {**current, "id": current["id"] + 1, "ops": current["ops"] + 1, "kind": "reextract",
           "reader": {"merge_threshold": "abc"}}  # fmt: skip
    put(store, {**stored, "next": bad})

    def abandoned(count: int) -> dict[str, Any] | None:
        body = api.get("/v1/replay").json()
        failed = body.get("failed", [])
        return failed[-1] if body["next"] is None and len(failed) == count else None

    wait(lambda: abandoned(failed_before + 1) or runtime.host.failed.is_set(), 30,
         "the bad generation was not abandoned")  # fmt: skip
    assert not runtime.host.failed.is_set(), "the server failed on a bad next generation"
    record = abandoned(failed_before + 1)
    assert record is not None and record["generation"]["id"] == bad["id"]
    assert "merge_threshold" in record["reason"] and "cannot start" in record["reason"]
    # A pointer edited by hand into something that is no generation at all.
    put(store, {**store.read().to_json(), "next": {"id": "soon", "ops": 1}})
    wait(lambda: abandoned(failed_before + 2), 30, "the unreadable generation was not abandoned")
    assert "unreadable" in (abandoned(failed_before + 2) or {})["reason"]
    assert store.read().to_json()["next"] is None  # written back, on record
    # The server never failed and the current generation serves on.
    assert not runtime.host.failed.is_set()
    assert "reader-next" not in runtime.host.slots and "views-next" not in runtime.host.slots
    wait(lambda: api.get("/readyz").status_code == 200, 30, "not ready after the abandonment")
    assert api.get("/v1/replay").json()["current"]["id"] == current["id"]
    assert api.get("/v1/cubes/anyone/search", params={"q": "cats"}).status_code == 200


def put(store: GenerationStore, pointer: dict[str, Any]) -> None:
    """Write the pointer as given (a hand edit, or an older version's)."""
    body = json.dumps(pointer).encode()
    store.client.put_object(store.bucket, store.key, io.BytesIO(body), len(body))


def listing(api: TestClient, cube: str) -> dict[str, dict[str, Any]]:
    rows = api.get(f"/v1/cubes/{cube}/memories", params={"limit": 16384}).json()
    return {r["memory_id"]: r for r in rows}


def memory_with(rows: dict[str, dict[str, Any]], text: str) -> dict[str, Any] | None:
    return next((r for r in rows.values() if text in r["text"]), None)


def command(api: TestClient, cube: str, memory: str, kind: str, reason: str) -> None:
    r = api.post(f"/v1/cubes/{cube}/commands",
                 json={"memory_id": memory, "command": kind, "reason": reason})  # fmt: skip
    assert r.status_code == 202, r.text


def test_deletes_and_archives_hold_in_a_reextraction(api: TestClient, runtime: Runtime) -> None:
    cube = f"carry-{uuid.uuid4().hex[:6]}"
    texts = [FORGET, SHELVE, KEEP, REPEAT[0], *OTHER, REPEAT[1], LATER]
    turns = [{"content": text, "speaker": "Melanie",
              "event_time": (T0 + timedelta(hours=i)).isoformat()}
             for i, text in enumerate(texts)]  # fmt: skip
    published = api.post(f"/v1/cubes/{cube}/interactions", json=turns)
    assert published.is_success, published.text
    event_of = {text: p["event_id"] for text, p in zip(texts, published.json(), strict=True)}
    wait(lambda: drained(api), 120, "ingest never drained")

    rows = listing(api, cube)
    forget, shelve, keep = (memory_with(rows, t) for t in (FORGET, SHELVE, KEEP))
    repeat, later = memory_with(rows, REPEAT[1]), memory_with(rows, LATER)
    assert forget and shelve and keep and repeat and later
    assert memory_with(rows, REPEAT[0]) is None  # merged into the second one
    command(api, cube, forget["memory_id"], "DELETE", "the user asked to forget the cat")
    command(api, cube, shelve["memory_id"], "ARCHIVE", "cooled down")
    command(api, cube, repeat["memory_id"], "DELETE", "no more violin")
    wait(lambda: drained(api), 60, "commands never drained")
    wait(lambda: memory_with(listing(api, cube), FORGET) is None, 30, "delete not applied")
    gone = listing(api, cube)
    assert not any(memory_with(gone, t) for t in (FORGET, SHELVE, *REPEAT))

    started = api.post("/v1/replay", json={"mode": "reextract",
                                           "reader": {"merge_threshold": 0.99}})  # fmt: skip
    assert started.status_code == 202, started.text
    target, ops = started.json()["next"]["id"], started.json()["next"]["ops"]
    # A delete that comes while the new generation is being built names the old memory.
    command(api, cube, later["memory_id"], "DELETE", "changed my mind about postcards")
    wait(lambda: api.get("/v1/replay").json()["current"]["id"] == target, 240, "never switched")
    wait(lambda: reader_ops_generation(api) == ops, 60, "the new writer did not take over")
    wait(lambda: drained(api), 60, "not drained after the switch")

    def new_id(text: str) -> str:
        return memory_id(cube, event_of[text], 0, ops)

    after = listing(api, cube)
    assert after and all(r["memory_id"] not in rows for r in after.values())  # new ids
    wait(lambda: memory_with(listing(api, cube), LATER) is None, 30, "the late delete was lost")
    after = listing(api, cube)
    for text in (FORGET, SHELVE, *REPEAT, LATER):
        assert memory_with(after, text) is None, f"{text!r} is back after the re-extraction"
    for text in (KEEP, *OTHER):  # the positive control
        assert memory_with(after, text) is not None, f"{text!r} was lost"
    hits = api.get(f"/v1/cubes/{cube}/search", params={"q": "grey cat Pixel", "top_k": 20})
    assert hits.status_code == 200 and not any("Pixel" in h["text"] for h in hits.json()["hits"])
    violin = api.get(f"/v1/cubes/{cube}/search", params={"q": "violin", "top_k": 20}).json()
    assert not any("violin" in h["text"] for h in violin["hits"])
    nurse = api.get(f"/v1/cubes/{cube}/search", params={"q": "nurse hospital", "top_k": 3}).json()
    assert nurse["hits"] and "nurse" in nurse["hits"][0]["text"]
    assert nurse["hits"][0]["memory_id"] == new_id(KEEP)

    # Each memory's history says what happened and why.
    def last_op(text: str) -> dict[str, Any]:
        r = api.get(f"/v1/memories/{new_id(text)}/history")
        assert r.status_code == 200, r.text
        own = [row for row in r.json() if row["memory_id"] == new_id(text)]
        assert own[0]["op"] == "ADD", own  # extracted on its own at 0.99, not merged
        return own[-1]

    deleted = last_op(FORGET)
    assert deleted["op"] == "DELETE" and "carried over from ops generation 0" in deleted["reason"]
    assert "the user asked to forget the cat" in deleted["reason"]
    assert forget["memory_id"] in deleted["reason"]
    assert last_op(SHELVE)["op"] == "ARCHIVE"
    for text in REPEAT:  # both items of the deleted memory, two memories now
        assert last_op(text)["op"] == "DELETE" and "no more violin" in last_op(text)["reason"]
    assert "had been merged" in last_op(REPEAT[0])["reason"]
    assert last_op(LATER)["op"] == "DELETE"
    assert last_op(KEEP)["op"] == "ADD"
    states = {text: api.get(f"/v1/memories/{new_id(text)}").json()["status"]
              for text in (FORGET, SHELVE, KEEP, *REPEAT, LATER)}  # fmt: skip
    assert states == {FORGET: "deleted", SHELVE: "archived", KEEP: "active",
                      REPEAT[0]: "deleted", REPEAT[1]: "deleted", LATER: "deleted"}  # fmt: skip
    reader = api.get("/v1/status").json()["processors"]["reader"]["stats"]
    assert reader["carried_ops"] >= 5

    # A restarted writer of the live generation still maps a command naming an old memory (it
    # reads the old generation's ops when such a command comes).
    runtime.host.remove("reader")
    runtime.host.add("reader", runtime.reader(runtime.generation))
    boats = memory_with(rows, OTHER[1])
    assert boats is not None
    command(api, cube, boats["memory_id"], "DELETE", "sold the boats")
    wait(lambda: memory_with(listing(api, cube), OTHER[1]) is None, 60, "stale delete not mapped")
    assert last_op(OTHER[1])["op"] == "DELETE" and memory_with(listing(api, cube), KEEP)

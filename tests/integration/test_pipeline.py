"""The memory pipeline end to end on the real services, through `memstream serve`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from schemas import Codec
from streams.sdk import locomo
from streams.sdk.chat import ChatFailed
from streams.sdk.client import MemoryClient
from streams.sdk.http import APIError, APIUnavailable
from streams.sdk.local import ServeProcess
from streams.sdk.subscribe import OpSubscriber
from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.producer import EventProducer
from streams.transport.topics import DLQ, INTERACTIONS, MEMORY_OPS

pytestmark = pytest.mark.integration

MAY_8 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(settings, tmp_path_factory.mktemp("pipeline")).start()
    yield serve
    serve.stop()


def turn(content: str, speaker: str = "Caroline", at: datetime = MAY_8, **extra: str) -> dict:
    return {"content": content, "speaker": speaker, "event_time": at, **extra}


def test_locomo_evidence_is_found_by_search(worker: ServeProcess) -> None:
    sample = locomo.load()[0]
    cube = f"locomo-{uuid.uuid4().hex[:6]}"
    turns = [i.model_dump(exclude={"cube_id"}) for i in locomo.interactions(sample, cube)]
    for start in range(0, len(turns), 200):
        worker.client.publish(cube, turns[start : start + 200])
    worker.client.wait_drained(300)

    known = locomo.turn_ids(sample)
    questions = [qa for qa in sample.qa if qa.get("category") != 5 and locomo.evidence(qa, known)]
    hits = 0
    for qa in questions:
        found = worker.client.search(cube, qa["question"], top_k=10)["hits"]
        if set(locomo.evidence(qa, known)) & {h["turn_id"] for h in found}:
            hits += 1
    print(f"\nevidence in top 10 for {hits}/{len(questions)} questions")
    assert hits >= 20
    assert hits / len(questions) > 0.5


def test_relative_dates_are_resolved(worker: ServeProcess) -> None:
    cube = f"dates-{uuid.uuid4().hex[:6]}"
    worker.client.publish(cube, [turn("I went to the pottery workshop yesterday with my mom.")])
    worker.client.wait_drained()
    hit = worker.client.search(cube, "pottery workshop", top_k=1)["hits"][0]
    assert "7 May 2023" in hit["text"]
    assert hit["text"].startswith("Caroline said:")


def test_repeat_merges_and_change_updates_with_history(worker: ServeProcess) -> None:
    cube = f"facts-{uuid.uuid4().hex[:6]}"
    client = worker.client
    client.publish(cube, [turn("I moved to Boston for my new studio in the arts district.")])
    client.wait_drained()
    first = client.search(cube, "Where does Caroline live?", top_k=1)["hits"][0]

    client.publish(
        cube,
        [
            turn(
                "I moved to Boston for my new studio in the arts district.", at=MAY_8 + timedelta(1)
            )
        ],
    )
    client.wait_drained()
    rows = client.memories(cube)
    assert len(rows) == 1, "a repeat must not become a second copy"
    merged = rows[0]
    assert merged["memory_id"] != first["memory_id"]
    old = client.memory(first["memory_id"])
    assert old["status"] == "merged" and old["superseded_by"] == merged["memory_id"]
    new = client.memory(merged["memory_id"])
    assert len(new["caused_by"]) == 2, "the merged memory has the provenance of both"
    assert new["supersedes"] == [first["memory_id"]]

    moved = MAY_8 + timedelta(days=40)
    client.publish(cube, [turn("I moved to Lisbon to be close to the ocean.", at=moved)])
    client.wait_drained()
    current = client.search(cube, "Where does Caroline live?", top_k=5)["hits"]
    assert [h["text"] for h in current] == [
        "Caroline said: I moved to Lisbon to be close to the ocean."
    ]
    with_history = client.search(cube, "Caroline moved", top_k=5, include_history=True)["hits"]
    assert len(with_history) == 2
    boston = client.memory(merged["memory_id"])
    assert boston["valid_to"] is not None
    assert datetime.fromisoformat(boston["valid_to"]) == moved
    lisbon_id = boston["superseded_by"]

    history = client.history(lisbon_id)
    ops = [(r["memory_id"], r["version"], r["op"]) for r in history]
    assert (first["memory_id"], 1, "ADD") in ops
    assert (first["memory_id"], 2, "MERGE") in ops
    assert (merged["memory_id"], 1, "MERGE") in ops
    assert (merged["memory_id"], 2, "UPDATE") in ops
    assert (lisbon_id, 1, "ADD") in ops
    closing = next(r for r in history if r["op"] == "UPDATE")
    assert closing["valid_to"] is not None and "Boston" in closing["text"]


def test_malformed_interactions_go_to_the_dlq_and_the_worker_goes_on(
    worker: ServeProcess, group_id: str
) -> None:
    s = worker.settings
    topic = s.topic(INTERACTIONS.name)
    cube = f"bad-{uuid.uuid4().hex[:6]}"
    codec = Codec()
    base = {
        "event_id": "",
        "cube_id": cube,
        "session_id": "s",
        "turn_id": None,
        "actor": "test",
        "speaker": "Caroline",
        "role": "USER",
        "content": "x",
        "event_time": MAY_8,
        "metadata": {},
    }
    no_cube = {**base, "event_id": str(uuid.uuid4()), "cube_id": "  "}
    too_big = {**base, "event_id": str(uuid.uuid4()), "content": "y" * (s.max_event_bytes + 10)}
    with EventProducer(s) as producer:
        bad = [
            producer.publish_raw(topic, cube.encode(), b"\x00 not avro at all"),
            producer.publish_raw(topic, cube.encode(), codec.encode("Interaction", no_cube)),
            producer.publish_raw(topic, cube.encode(), codec.encode("Interaction", too_big)),
        ]
    worker.client.publish(cube, [turn("After the bad ones, I adopted a cat named Luna.")])
    worker.client.wait_drained()
    assert "Luna" in worker.client.search(cube, "cat", top_k=1)["hits"][0]["text"]

    wanted = {(d.partition, d.offset) for d in bad}
    letters: dict[tuple[int, int], dict] = {}
    with EventConsumer([s.topic(DLQ.name)], group_id, s) as dlq:
        for _ in range(60):
            for e in dlq.poll_batch(500, 0.5):
                letters[(e.value["partition"], e.value["offset"])] = e.value
            if wanted <= set(letters):
                break
    reasons = [letters[(d.partition, d.offset)]["error"] for d in bad]
    assert "missing C3 01 header" in reasons[0]
    assert reasons[1] == "missing cube_id"
    assert "over the limit" in reasons[2]


def test_every_search_is_audited(worker: ServeProcess) -> None:
    cube = f"audit-{uuid.uuid4().hex[:6]}"
    worker.client.publish(cube, [turn("I started learning the violin in March.")])
    worker.client.wait_drained()
    response = worker.client.search(cube, "violin", top_k=3)
    assert {"embed_ms", "snapshot_ms", "dense_ms", "keyword_ms", "fuse_ms", "total_ms"} <= set(
        response["timing_ms"]
    )
    hit = response["hits"][0]  # the scores a reader can make sense of
    assert 0 < hit["score"] <= 1 and hit["keyword"] > 0 and 0 < hit["cosine"] <= 1
    query_id = response["query_id"]
    for _ in range(60):
        rows = worker.client.audit(
            f"SELECT query, memory_ids FROM queries FINAL WHERE event_id = '{query_id}'"
        )
        if rows:
            break
        time.sleep(0.5)
    assert rows and rows[0]["query"] == "violin"
    assert rows[0]["memory_ids"] == [h["memory_id"] for h in response["hits"]]
    with pytest.raises(APIError, match="only SELECT") as refused:
        worker.client.audit("DROP TABLE memory_ops")
    assert refused.value.status_code == 400


def test_the_sdk_says_why_a_call_failed(worker: ServeProcess) -> None:
    """Error answers carry their status and the API's reason; no answer at all is its own
    error; a refused chat turn is a ChatFailed, streamed or not."""
    client = worker.client
    with pytest.raises(APIError) as missing:
        client.memory("no-such-memory")
    assert (missing.value.status_code, missing.value.detail) == (404, "no memory no-such-memory")
    with pytest.raises(APIError) as invalid:
        client.search("c", "q", top_k=0)
    assert invalid.value.status_code == 422 and "top_k" in invalid.value.detail
    with pytest.raises(ChatFailed, match=r"^4\d\d: "):
        client.chat("c", messages=[])
    with pytest.raises(ChatFailed, match=r"^4\d\d: "):
        list(client.chat("c", messages=[], stream=True))
    with MemoryClient("http://127.0.0.1:9", timeout=2) as nobody, pytest.raises(APIUnavailable):
        nobody.status()


def test_subscriber_gets_each_op_once_even_when_the_log_repeats_it(
    worker: ServeProcess, group_id: str
) -> None:
    cube = f"sub-{uuid.uuid4().hex[:6]}"
    s = worker.settings
    with OpSubscriber(group_id, [cube], s) as subscriber:
        with MemoryClient(s.api_url, kafka=True, settings=s) as client:
            delivered = client.publish(
                cube,
                [
                    {"content": "I adopted a puppy named Biscuit last week.", "speaker": "Mel"},
                    {"content": "Biscuit loves chasing the ball at the park.", "speaker": "Mel"},
                ],
            )
        assert [d["topic"] for d in delivered] == [s.topic(INTERACTIONS.name)] * 2
        worker.client.wait_drained()
        ops: list[dict] = []
        for _ in range(40):
            ops.extend(subscriber.poll(0.5))
            if len(ops) >= 2:
                break
        assert [o["op"] for o in ops] == ["ADD", "ADD"]
        assert {o["cube_id"] for o in ops} == {cube}

        with EventProducer(s) as producer:  # a redelivery: the same op again on the log
            producer.publish(s.topic(MEMORY_OPS.name), cube, MEMORY_OPS.record, ops[0])
        for _ in range(10):
            assert subscriber.poll(0.5) == []
            if subscriber.duplicates:
                break
        assert subscriber.duplicates == 1
    worker.client.wait_drained()
    counts = worker.client.audit(
        f"SELECT count() AS n FROM memory_ops FINAL WHERE cube_id = '{cube}'"
    )
    assert counts[0]["n"] == 2


def test_search_filters_by_time_range_and_tags(worker: ServeProcess) -> None:
    cube = f"filters-{uuid.uuid4().hex[:6]}"
    worker.client.publish(
        cube,
        [
            turn("I ran the Boston marathon in the rain.", at=MAY_8),
            turn("I ran a charity race for the shelter.", at=MAY_8 + timedelta(days=30)),
        ],
    )
    worker.client.wait_drained()
    everything = worker.client.search(cube, "ran a race", top_k=5)["hits"]
    assert len(everything) == 2
    june = worker.client.search(cube, "ran a race", top_k=5, since=MAY_8 + timedelta(days=1))
    assert [h["text"] for h in june["hits"]] == [
        "Caroline said: I ran a charity race for the shelter."
    ]
    may = worker.client.search(cube, "ran a race", top_k=5, until=MAY_8 + timedelta(days=1))
    assert [h["text"] for h in may["hits"]] == [
        "Caroline said: I ran the Boston marathon in the rain."
    ]
    tagged = worker.client.search(cube, "ran a race", top_k=5, tags=["marathon"])["hits"]
    assert [h["text"] for h in tagged] == ["Caroline said: I ran the Boston marathon in the rain."]


def test_the_views_seal_milvus_once_the_log_is_quiet_not_between_batches(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    quiet = 6.0
    serve = ServeProcess(settings, tmp_path_factory.mktemp("quiet"), views_quiet_flush_s=quiet)
    serve.start()
    try:
        client = serve.client
        cube = f"quiet-{uuid.uuid4().hex[:6]}"

        def flushes() -> int:
            return client.status(lag=False)["processors"]["views"]["stats"]["milvus_flushes"]

        # Batches a second apart, as a writer's under a backlog: a pause, not quiet.
        for fact in ("I planted tomato seedlings in the garden.",
                     "My sister adopted a grey kitten from the shelter.",
                     "We repainted the kitchen a bright yellow.",):  # fmt: skip
            last = time.monotonic()  # the views see the ops after this
            client.publish(cube, [turn(fact)])
            client.wait_drained()
            time.sleep(1)
        assert flushes() == 0
        while flushes() == 0:
            assert time.monotonic() - last < quiet + 30, "the views never sealed Milvus"
            time.sleep(0.2)
        assert time.monotonic() - last >= quiet
        assert flushes() == 1  # once, not at every quiet poll after it
        hits = client.search(cube, "Which pet did her sister adopt?", top_k=5)["hits"]
        assert len(hits) == 3
        assert "kitten" in hits[0]["text"]
    finally:
        serve.stop()

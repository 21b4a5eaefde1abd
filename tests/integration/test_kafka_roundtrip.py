"""Publishing and consuming interactions through the real broker."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from schemas import Codec, SchemaRegistry
from schemas.codec import parse_version
from streams.settings import Settings
from streams.transport.consumer import Event, EventConsumer, InvalidEvent
from streams.transport.events import Interaction
from streams.transport.producer import ContentTooLarge, EventProducer
from streams.transport.topics import DLQ, INTERACTIONS

pytestmark = pytest.mark.integration

T0 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


def make_interactions(run: str, cubes: int, per_cube: int) -> list[Interaction]:
    """Interleaved across cubes, as many agents publishing at once would be."""
    return [
        Interaction(
            cube_id=f"{run}-cube-{c:02d}",
            session_id=f"{run}-s-{c}",
            speaker=f"speaker-{c}",
            content=f"turn {i} of cube {c}: a realistic sentence about the day, with a number {i}.",
            event_time=T0 + timedelta(seconds=i),
            metadata={"seq": str(i)},
        )
        for i in range(per_cube)
        for c in range(cubes)
    ]


def drain(consumer: EventConsumer, done: Callable[[list[Event]], bool], timeout: float = 60):
    """Events until ``done(events)`` holds (or ``timeout`` seconds pass)."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not done(events) and time.monotonic() < deadline:
        events.extend(consumer.poll_batch(500, 0.5))
    return events


def test_10k_interactions_across_50_cubes_round_trip(settings: Settings, group_id: str) -> None:
    run = uuid.uuid4().hex[:6]
    sent = make_interactions(run, cubes=50, per_cube=200)
    assert len(sent) == 10_000

    started = time.perf_counter()
    with EventProducer(settings) as producer:
        delivered = producer.publish_interactions(sent)
    publish_s = time.perf_counter() - started
    assert len(delivered) == 10_000
    assert all(d.topic == settings.topic(INTERACTIONS.name) for d in delivered)

    received: list[Event] = []
    started = time.perf_counter()
    with EventConsumer([settings.topic(INTERACTIONS.name)], group_id, settings) as consumer:
        while len(received) < 10_000:
            batch = consumer.take(10_000 - len(received), timeout=30)
            if not batch:
                break
            received.extend(batch)
    consume_s = time.perf_counter() - started
    print(f"\npublished 10k in {publish_s:.2f}s, consumed in {consume_s:.2f}s")

    ids = [e.value["event_id"] for e in received]
    assert len(ids) == len(set(ids)), "duplicates"
    assert set(ids) == {i.event_id for i in sent}, "missing events"

    by_cube: dict[str, list[int]] = defaultdict(list)
    for event in received:
        assert event.key == event.value["cube_id"].encode()
        by_cube[event.value["cube_id"]].append(int(event.value["metadata"]["seq"]))
    assert len(by_cube) == 50
    for cube, seqs in by_cube.items():
        assert seqs == list(range(200)), f"cube {cube} out of order"

    partitions_of_cube = defaultdict(set)
    for event in received:
        partitions_of_cube[event.value["cube_id"]].add(event.partition)
    assert all(len(p) == 1 for p in partitions_of_cube.values()), "a cube spans partitions"


def test_malformed_messages_go_to_the_dlq_and_the_consumer_continues(
    settings: Settings, group_id: str
) -> None:
    run = uuid.uuid4().hex[:6]
    topic = settings.topic(INTERACTIONS.name)
    first, last = make_interactions(run, cubes=1, per_cube=2)
    foreign = parse_version(
        {"type": "record", "name": "Stranger", "fields": [{"name": "x", "type": "int"}]}, 1
    )
    stranger_bytes = Codec(SchemaRegistry([foreign])).encode("Stranger", {"x": 42})
    random_bytes = b"\x00garbage\xff" + uuid.uuid4().bytes
    key = first.cube_id.encode()

    with EventProducer(settings) as producer:
        producer.publish_interaction(first)
        bad_random = producer.publish_raw(topic, key, random_bytes)
        bad_schema = producer.publish_raw(topic, key, stranger_bytes)
        producer.publish_interaction(last)

    def mine(events: list[Event]) -> list[Event]:
        return [e for e in events if e.key == key]

    with EventConsumer([topic], group_id, settings) as consumer:
        events = mine(drain(consumer, lambda got: len(mine(got)) == 2))
        assert [e.value["event_id"] for e in events] == [first.event_id, last.event_id]
        assert consumer.dead_lettered >= 2

    wanted = {(bad_random.partition, bad_random.offset), (bad_schema.partition, bad_schema.offset)}

    def coordinates(events: list[Event]) -> set[tuple[int, int]]:
        return {(e.value["partition"], e.value["offset"]) for e in events}

    with EventConsumer([settings.topic(DLQ.name)], group_id + "-dlq", settings) as dlq:
        found = drain(dlq, lambda got: wanted <= coordinates(got))
        letters = {(e.value["partition"], e.value["offset"]): e.value for e in found}
    random_letter = letters[(bad_random.partition, bad_random.offset)]
    assert random_letter["value"] == random_bytes
    assert random_letter["key"] == key
    assert random_letter["source_topic"] == topic
    assert "missing C3 01 header" in random_letter["error"]
    schema_letter = letters[(bad_schema.partition, bad_schema.offset)]
    assert schema_letter["value"] == stranger_bytes
    assert "unknown writer schema fingerprint" in schema_letter["error"]
    assert schema_letter["error_type"] == "DecodeError"


def test_a_validator_dead_letters_events_it_refuses(settings: Settings, group_id: str) -> None:
    run = uuid.uuid4().hex[:6]
    topic = settings.topic(INTERACTIONS.name)
    good, bad = make_interactions(run, cubes=1, per_cube=2)
    bad = bad.model_copy(update={"content": "FORBIDDEN " + bad.content})

    def validator(event: Event) -> None:
        if event.value["content"].startswith("FORBIDDEN"):
            raise InvalidEvent("content is forbidden")

    with EventProducer(settings) as producer:
        producer.publish_interactions([bad, good])
    with EventConsumer([topic], group_id, settings, validator=validator) as consumer:
        events = [
            e for e in consumer.take(100_000, timeout=10) if e.value["cube_id"] == good.cube_id
        ]
    assert [e.value["event_id"] for e in events] == [good.event_id]
    with EventConsumer([settings.topic(DLQ.name)], group_id + "-dlq", settings) as dlq:
        reasons = [e.value for e in dlq.take(100_000, timeout=10)]
    assert any(
        r["error"] == "content is forbidden" and r["error_type"] == "InvalidEvent" for r in reasons
    )


def test_consumer_resumes_from_committed_offsets(settings: Settings, group_id: str) -> None:
    """A new consumer in the group continues after the last handled event: no loss, no repeat."""
    run = uuid.uuid4().hex[:6]
    topic_settings = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}{run}."})
    from streams.transport.topics import ensure_topics

    ensure_topics(topic_settings)
    sent = make_interactions(run, cubes=3, per_cube=20)
    with EventProducer(topic_settings) as producer:
        producer.publish_interactions(sent)
    topic = topic_settings.topic(INTERACTIONS.name)

    with EventConsumer([topic], group_id, topic_settings) as consumer:
        first = consumer.take(25, timeout=20)
    with EventConsumer([topic], group_id, topic_settings) as consumer:
        rest = consumer.take(1000, timeout=8)
    ids = [e.value["event_id"] for e in first + rest]
    assert len(first) == 25
    assert sorted(ids) == sorted(i.event_id for i in sent)


def test_oversized_content_is_refused_before_the_log(settings: Settings) -> None:
    huge = Interaction(cube_id="c", speaker="s", content="x" * (settings.max_event_bytes + 1))
    with (
        EventProducer(settings) as producer,
        pytest.raises(ContentTooLarge, match="over the limit"),
    ):
        producer.publish_interaction(huge)

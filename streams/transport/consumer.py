"""Reading events from Kafka: decoded, in order per partition, bad messages dead-lettered.

A message that cannot be decoded (or that a validator refuses) is published to the dead-letter
topic with its bytes, coordinates and the reason, and the consumer moves on: one bad event never
stops a worker. An event counts as done only when the caller comes back for more (the next
``poll``/``poll_batch``) or calls ``commit``; only done offsets are ever committed, so a crash
redelivers what was not finished (at-least-once; memstream's deterministic ids make a redelivery
harmless).
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas import Codec, DecodeError
from schemas.limits import (
    DEAD_LETTER_KEY_BYTES,
    DEAD_LETTER_VALUE_BYTES,
    NAME_BYTES,
    REASON_BYTES,
    cut_utf8,
)
from streams.settings import Settings
from streams.transport.events import utcnow
from streams.transport.producer import EventProducer
from streams.transport.topics import ALL_TOPICS, DLQ

log = logging.getLogger("memstream.consumer")


def raise_if_fatal(error: KafkaError) -> None:
    """A consumer error event: raise if it is fatal, else log it and go on.

    librdkafka reports transient conditions as error events and recovers from them by itself:
    a topic created a moment ago and not yet in the metadata (UNKNOWN_TOPIC_OR_PART), a broker
    restarting (_TRANSPORT), the end of a partition. A processor that failed on them would
    restart for nothing, and all of them at once when a fresh deployment creates its topics.
    """
    if error.code() == KafkaError._PARTITION_EOF:
        return
    if error.fatal():
        raise KafkaException(error)
    log.warning("consumer: %s (transient, librdkafka retries)", error.str())


class InvalidEvent(ValueError):
    """Raised by a validator: the event decoded but breaks a rule (missing cube id, too large)."""


Validator = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    """A decoded event and where it sits in the log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    record_name: str
    writer_version: int
    value: dict[str, Any]
    timestamp_ms: int


class EventConsumer:
    """Iterates over decoded events of one or more topics in a consumer group."""

    def __init__(
        self,
        topics: Sequence[str],
        group_id: str,
        settings: Settings | None = None,
        codec: Codec | None = None,
        validator: Validator | None = None,
        dead_letters: EventProducer | None = None,
        config: dict[str, Any] | None = None,
        commit_interval: float = 1.0,
        on_assign: Callable[[list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[list[TopicPartition]], None] | None = None,
        on_lost: Callable[[list[TopicPartition]], None] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.codec = codec or Codec()
        self.validator = validator
        self._expected = {self.settings.topic(spec.name): spec.record for spec in ALL_TOPICS}
        self._dead_letters = dead_letters
        self._owns_dead_letters = dead_letters is None
        self._worker = f"{socket.gethostname()}/{group_id}"
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": group_id,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                **(config or {}),
            }
        )
        self._hooks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self._consumer.subscribe(
            list(topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._pending: dict[tuple[str, int], int] = {}
        self._done: dict[tuple[str, int], int] = {}
        self._commit_interval = commit_interval
        self._last_commit = time.monotonic()
        self.dead_lettered = 0

    def poll(self, timeout: float = 1.0) -> Event | None:
        """The next valid event, or None if none arrived within ``timeout`` seconds.

        Asking for the next event marks the ones returned before as done.
        """
        events = self.poll_batch(1, timeout)
        return events[0] if events else None

    def poll_batch(self, max_events: int, timeout: float = 1.0, linger: float = 0.0) -> list[Event]:
        """Up to ``max_events`` valid events, waiting at most ``timeout`` seconds for the first
        and then up to ``linger`` seconds for more (a sink whose every write has a fixed cost
        lingers to write fewer, larger batches). The events returned before are marked done."""
        self._mark_done()
        events: list[Event] = []
        first = self._consumer.poll(timeout)
        if first is None:
            return events
        # The first message ends the wait; the rest is what is ready, or arrives within linger.
        for msg in [first, *self._consumer.consume(max_events - 1, linger)]:
            if msg.error() is not None:
                raise_if_fatal(msg.error())
                continue
            self._pending[(msg.topic(), msg.partition())] = msg.offset() + 1
            event = self._decode(msg)
            if event is not None:
                events.append(event)
        return events

    def __iter__(self) -> Iterator[Event]:
        """Events forever (a long-running worker); stop by breaking out or calling close."""
        while True:
            event = self.poll(1.0)
            if event is not None:
                yield event

    def take(self, count: int, timeout: float = 60.0) -> list[Event]:
        """Up to ``count`` events, giving up after ``timeout`` seconds without a new one."""
        events: list[Event] = []
        idle_since = time.monotonic()
        while len(events) < count and time.monotonic() - idle_since < timeout:
            batch = self.poll_batch(min(500, count - len(events)), 0.5)
            if batch:
                events.extend(batch)
                idle_since = time.monotonic()
        return events

    def take_offsets(self) -> list[TopicPartition]:
        """Offsets past every event returned so far, for a producer transaction to commit; this
        consumer will not commit them itself."""
        self._done.update(self._pending)
        self._pending.clear()
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._done.items()]
        self._done.clear()
        return offsets

    def group_metadata(self) -> Any:
        return self._consumer.consumer_group_metadata()

    def commit(self) -> None:
        """Mark every event returned so far as done and commit synchronously."""
        self._mark_done()
        self._commit()

    def close(self) -> None:
        """Commit the events marked done and leave the group (the last ones returned are not
        done unless :meth:`commit` was called: they will be delivered again)."""
        try:
            self._commit()
        finally:
            self._consumer.close()
            if self._owns_dead_letters and self._dead_letters is not None:
                self._dead_letters.close()

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """Leaving the block normally means the events it received were handled."""
        if exc_type is None:
            self._mark_done()
        self.close()

    def _mark_done(self) -> None:
        self._done.update(self._pending)
        self._pending.clear()
        if time.monotonic() - self._last_commit >= self._commit_interval:
            self._commit()

    def _commit(self) -> None:
        self._last_commit = time.monotonic()
        if not self._done:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._done.items()]
        self._consumer.commit(offsets=offsets, asynchronous=False)
        self._done.clear()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions handed to this consumer; the owner's hook runs before any of their events
        is returned (a processor catches its state up here)."""
        if self._hooks["assign"] is not None:
            self._hooks["assign"](partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Before giving partitions away, commit what is done on them; drop the rest."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._commit()
        self._pending = {tp: o for tp, o in self._pending.items() if tp not in revoked}
        if self._hooks["revoke"] is not None:
            self._hooks["revoke"](partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a clean hand-over (session timed out): another member
        may already own them, so nothing is committed and the pending events are dropped."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._pending = {tp: o for tp, o in self._pending.items() if tp not in lost}
        self._done = {tp: o for tp, o in self._done.items() if tp not in lost}
        if self._hooks["lost"] is not None:
            self._hooks["lost"](partitions)

    def assignment(self) -> list[TopicPartition]:
        return self._consumer.assignment()

    def _decode(self, msg: Message) -> Event | None:
        topic = msg.topic()
        try:
            decoded = self.codec.decode(msg.value(), reader=self._expected.get(topic))
            event = Event(
                topic=topic,
                partition=msg.partition(),
                offset=msg.offset(),
                key=msg.key(),
                record_name=decoded.name,
                writer_version=decoded.writer_version,
                value=decoded.record,
                timestamp_ms=msg.timestamp()[1],
            )
            if self.validator is not None:
                self.validator(event)
            return event
        except (DecodeError, InvalidEvent) as exc:
            reason = exc.reason if isinstance(exc, DecodeError) else str(exc)
            self._dead_letter(msg, type(exc).__name__, reason)
            return None

    def _dead_letter(self, msg: Message, error_type: str, reason: str) -> None:
        if self._dead_letters is None:
            self._dead_letters = EventProducer(self.settings, self.codec)
        dead_letter(self._dead_letters, self.settings, msg, error_type, reason, self._worker)
        self.dead_lettered += 1


def dead_letter(
    producer: EventProducer,
    settings: Settings,
    msg: Message,
    error_type: str,
    reason: str,
    worker: str,
) -> None:
    """Publish a message that could not be handled to the DLQ, byte for byte (up to the limits of
    :func:`dead_letter_bytes`), with where it came from and why; returns once the DLQ
    acknowledged it (only then may its offset move on)."""
    dead_letter_bytes(
        producer,
        settings,
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        key=msg.key(),
        value=msg.value(),
        error_type=error_type,
        reason=reason,
        worker=worker,
    )


def dead_letter_bytes(
    producer: EventProducer,
    settings: Settings,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error_type: str,
    reason: str,
    worker: str,
) -> None:
    """:func:`dead_letter` for a message known by its coordinates and bytes (a consumer other
    than confluent-kafka's, such as Faust's). The DLQ event id is derived from the coordinates,
    so two processors that refuse the same message record it once.

    No message can make its own dead letter fail: a key, value or reason over its limit
    (:data:`~schemas.limits.DEAD_LETTER_KEY_BYTES`, :data:`~schemas.limits.DEAD_LETTER_VALUE_BYTES`,
    :data:`~schemas.limits.REASON_BYTES`) is cut to its first bytes, its length before the cut
    kept in the record (``key_bytes``, ``value_bytes``, ``error_bytes``) and the reason says so.
    Everything else of the record is memstream's own and small, so it always fits the topic.
    """
    cut_key, key_bytes = _cut(key, DEAD_LETTER_KEY_BYTES)
    cut_value, value_bytes = _cut(value, DEAD_LETTER_VALUE_BYTES)
    notes = [f"{name} cut to its first {limit} of {size} bytes"
             for name, limit, size in (("key", DEAD_LETTER_KEY_BYTES, key_bytes),
                                       ("value", DEAD_LETTER_VALUE_BYTES, value_bytes))
             if size is not None]  # fmt: skip
    encoded = reason.encode("utf-8", "replace")  # a lone surrogate in it becomes "?"
    reason, error_bytes = encoded.decode("utf-8"), len(encoded)
    if error_bytes > REASON_BYTES - _NOTES_ROOM:
        notes.insert(0, f"reason cut to its first {REASON_BYTES - _NOTES_ROOM} of "
                        f"{error_bytes} bytes")  # fmt: skip
        reason = cut_utf8(reason, REASON_BYTES - _NOTES_ROOM)
    else:
        error_bytes = None  # type: ignore[assignment]
    if notes:
        reason = f"{reason} [{'; '.join(notes)}]"
    producer.publish(
        settings.topic(DLQ.name),
        topic,
        DLQ.record,
        {
            "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{topic}/{partition}/{offset}")),
            "source_topic": topic,
            "partition": partition,
            "offset": offset,
            "key": cut_key,
            "value": cut_value,
            "error_type": cut_utf8(error_type, NAME_BYTES),
            "error": reason,
            "worker": cut_utf8(worker, NAME_BYTES),
            "failed_at": utcnow(),
            "key_bytes": key_bytes,
            "value_bytes": value_bytes,
            "error_bytes": error_bytes,
        },
    )


#: Bytes of a dead letter's reason kept for the notes on what was cut (three short sentences).
_NOTES_ROOM = 256


def _cut(data: bytes | None, limit: int) -> tuple[bytes | None, int | None]:
    """``data`` cut to ``limit`` bytes, and its length before the cut (None: not cut)."""
    if data is None or len(data) <= limit:
        return data, None
    return bytes(data[:limit]), len(data)

"""Reading events from Kafka: decoded, in order per partition, bad messages dead-lettered.

A message that cannot be decoded (or that a validator refuses) is published to the dead-letter
topic with its bytes, coordinates and the reason, and the consumer moves on: one bad event never
stops a worker. Offsets are stored only when the caller asks for the next event, so an event is
committed only after the code that received it has finished with it (at-least-once delivery;
memstream's deterministic ids make a redelivery harmless).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas import Codec, DecodeError
from streams.events import utcnow
from streams.producer import EventProducer
from streams.settings import Settings
from streams.topics import ALL_TOPICS, DLQ


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
    ) -> None:
        self.settings = settings or Settings()
        self.codec = codec or Codec()
        self.validator = validator
        self._expected = {self.settings.topic(spec.name): spec.record for spec in ALL_TOPICS}
        self._dlq_topic = self.settings.topic(DLQ.name)
        self._dead_letters = dead_letters
        self._owns_dead_letters = dead_letters is None
        self._worker = f"{socket.gethostname()}/{group_id}"
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": group_id,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
                **(config or {}),
            }
        )
        self._consumer.subscribe(list(topics))
        self._pending: Message | None = None
        self.dead_lettered = 0

    def poll(self, timeout: float = 1.0) -> Event | None:
        """Return the next valid event, or None if none arrived within ``timeout`` seconds.

        Asking for the next event marks the previous one as done (its offset is stored).
        """
        self._store_pending()
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            msg = self._consumer.poll(remaining)
            if msg is None:
                return None
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(msg.error())
            event = self._decode(msg)
            if event is not None:
                self._pending = msg
                return event
            if time.monotonic() >= deadline:
                return None

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
            event = self.poll(0.5)
            if event is not None:
                events.append(event)
                idle_since = time.monotonic()
        return events

    def commit(self) -> None:
        """Store the last event's offset and commit all stored offsets synchronously."""
        self._store_pending()
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                raise

    def close(self) -> None:
        """Commit what was handled and leave the group."""
        try:
            self.commit()
        finally:
            self._consumer.close()
            if self._owns_dead_letters and self._dead_letters is not None:
                self._dead_letters.close()

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _store_pending(self) -> None:
        if self._pending is not None:
            self._consumer.store_offsets(message=self._pending)
            self._pending = None

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
        """Publish the message to the DLQ and wait for the ack before moving past it."""
        if self._dead_letters is None:
            self._dead_letters = EventProducer(self.settings, self.codec)
        self._dead_letters.publish(
            self._dlq_topic,
            msg.topic(),
            DLQ.record,
            {
                "event_id": str(
                    uuid.uuid5(
                        uuid.NAMESPACE_URL, f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
                    )
                ),
                "source_topic": msg.topic(),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": msg.key(),
                "value": msg.value(),
                "error_type": error_type,
                "error": reason,
                "worker": self._worker,
                "failed_at": utcnow(),
            },
        )
        self._consumer.store_offsets(
            offsets=[TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)]
        )
        self.dead_lettered += 1

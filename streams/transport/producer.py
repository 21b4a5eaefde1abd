"""Publishing events to Kafka: idempotent, acks=all, and confirmed before a call returns."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas import Codec
from streams.settings import Settings
from streams.transport.events import Interaction
from streams.transport.topics import INTERACTIONS

log = logging.getLogger("memstream.producer")


class PublishError(RuntimeError):
    """One or more events were not acknowledged by the broker; nothing is silently dropped."""

    def __init__(self, failures: list[tuple[int, str]]) -> None:
        shown = "; ".join(f"#{i}: {reason}" for i, reason in failures[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} event(s) not delivered: {shown}{more}")
        self.failures = failures


class ContentTooLarge(ValueError):
    """An interaction larger than ``max_event_bytes``: refused before it reaches the log."""


class EventTooLarge(ValueError):
    """An event whose encoding is over the producer's message limit: refused, with the batch it
    came in, before anything of the batch is produced (the broker would refuse it anyway)."""


@dataclass(frozen=True)
class Delivered:
    """Where an acknowledged event landed in the log."""

    topic: str
    partition: int
    offset: int


class EventProducer:
    """Encodes events with the codec and publishes them with delivery confirmation.

    The underlying confluent-kafka producer is idempotent with ``acks=all``: a retry after a
    network error never writes a message twice, and per-key order is kept.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        codec: Codec | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.codec = codec or Codec()
        options = {
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            # murmur2 like the Java client and aiokafka (Faust): every producer of a keyed
            # topic must agree, or co-partitioning by cube breaks.
            "partitioner": "murmur2_random",
            "message.max.bytes": max(1_000_000, 2 * self.settings.max_event_bytes),
            **(config or {}),
        }
        #: The largest encoded event this producer publishes (key and headers need the rest).
        self.max_value_bytes = int(options["message.max.bytes"]) - 4096
        self._producer = Producer(options)
        self._lock = threading.Lock()
        self.transactional = "transactional.id" in (config or {})
        if self.transactional:
            self._producer.init_transactions(60)

    def publish(
        self, topic: str, key: str | bytes | None, record: str, value: Mapping[str, Any]
    ) -> Delivered:
        """Encode ``value`` as a ``record`` event and publish it; return once it is acked."""
        return self.publish_many(topic, record, [(key, value)])[0]

    def publish_many(
        self,
        topic: str,
        record: str,
        items: Iterable[tuple[str | bytes | None, Mapping[str, Any]]],
        timeout: float = 60.0,
    ) -> list[Delivered]:
        """Publish a batch; return once every event is acked, or raise :class:`PublishError`."""
        results: dict[int, Delivered] = {}
        failures: list[tuple[int, str]] = []

        def on_delivery(index: int) -> Any:
            def callback(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    failures.append((index, err.str()))
                else:
                    results[index] = Delivered(msg.topic(), msg.partition(), msg.offset())

            return callback

        encoded = [(key, self.codec.encode(record, value)) for key, value in items]
        for index, (_, payload) in enumerate(encoded):
            if len(payload) > self.max_value_bytes:
                raise EventTooLarge(
                    f"{record} #{index} is {len(payload)} bytes encoded, over the limit of "
                    f"{self.max_value_bytes}"
                )
        count = len(encoded)
        with self._lock:
            for index, (key, payload) in enumerate(encoded):
                self._produce(topic, key, payload, on_delivery(index))
            self._producer.flush(timeout)
        failed = {index for index, _ in failures}
        failures.extend(
            (index, f"not acknowledged within {timeout}s")
            for index in range(count)
            if index not in results and index not in failed
        )
        if failures:
            raise PublishError(sorted(failures))
        return [results[i] for i in range(count)]

    def publish_raw(self, topic: str, key: bytes | None, value: bytes) -> Delivered:
        """Publish bytes as they are (for tools and tests of the dead-letter path)."""
        box: list[Delivered | str] = []

        def callback(err: KafkaError | None, msg: Message) -> None:
            box.append(err.str() if err else Delivered(msg.topic(), msg.partition(), msg.offset()))

        with self._lock:
            self._produce(topic, key, value, callback)
            self._producer.flush(30)
        if not box or isinstance(box[0], str):
            raise PublishError([(0, box[0] if box else "no delivery report")])
        return box[0]

    def publish_transaction(
        self,
        items: Iterable[tuple[str, str, str | bytes | None, Mapping[str, Any]]],
        offsets: list[TopicPartition],
        group_metadata: Any,
        timeout: float = 60.0,
    ) -> None:
        """Publish ``(topic, record, key, value)`` events and commit the consumer offsets they
        came from, atomically.

        Kafka's consume-transform-produce transaction: after a crash either both the events and
        the offsets are in the log, or neither is (read_committed consumers never see a half).
        A consumer that lost its partitions meanwhile is fenced (KIP-447): the commit fails and
        the transaction is aborted, so a zombie never writes past the new owner.
        """
        if not self.transactional:
            raise RuntimeError("publish_transaction needs a producer with a transactional.id")
        with self._lock:
            self._producer.begin_transaction()
            try:
                for topic, record, key, value in items:
                    self._produce(topic, key, self.codec.encode(record, value), None)
                if offsets:
                    self._producer.send_offsets_to_transaction(offsets, group_metadata, timeout)
                self._producer.commit_transaction(timeout)
            except KafkaException as exc:
                if exc.args[0].txn_requires_abort():
                    self._producer.abort_transaction(timeout)
                raise

    def publish_nowait(
        self, topic: str, key: str | bytes | None, record: str, value: Mapping[str, Any]
    ) -> None:
        """Queue an event without waiting for its ack (for best-effort events: query logs)."""
        payload = self.codec.encode(record, value)
        with self._lock:
            self._produce(topic, key, payload, None)
            self._producer.poll(0)

    def publish_interaction(
        self, interaction: Interaction | None = None, **fields: Any
    ) -> Delivered:
        """Publish one interaction (an :class:`Interaction` or its fields) and wait for the ack."""
        return self.publish_interactions([interaction or Interaction(**fields)])[0]

    def publish_interactions(self, interactions: Iterable[Interaction]) -> list[Delivered]:
        """Publish interactions keyed by cube id, in order; wait until all are acked."""
        topic = self.settings.topic(INTERACTIONS.name)
        items = []
        for interaction in interactions:
            size = len(interaction.content.encode())
            if size > self.settings.max_event_bytes:
                raise ContentTooLarge(
                    f"interaction {interaction.event_id}: content is {size} bytes, "
                    f"over the limit of {self.settings.max_event_bytes}"
                )
            items.append((interaction.cube_id, interaction.to_record()))
        return self.publish_many(topic, INTERACTIONS.record, items)

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued. A producer that hit a fatal error (a transactional one fenced
        by a newer instance) has nothing it may still deliver: closing it is not an error."""
        try:
            self._producer.flush(timeout)
        except KafkaException as exc:
            if not exc.args[0].fatal():
                raise
            log.info("closing a producer after its fatal error: %s", exc.args[0].str())

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _produce(self, topic: str, key: str | bytes | None, value: bytes, callback: Any) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=callback)
                return
            except BufferError:
                self._producer.poll(0.1)

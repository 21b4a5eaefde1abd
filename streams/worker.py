"""The worker: MemReader, the view sinks and the query audit, in one process.

Three threads, each a consumer of one topic:

- **ops follower** (``memory-ops``, from offset 0): folds every op into the in-process
  :class:`CubeMemories` (the reader's state, rebuilt from the log at every start) and, for ops past
  the views' committed offsets, writes Milvus, the MinIO vault and ClickHouse, then commits.
- **reader** (``interactions``): waits until the fold has caught up with the log, then batches
  interactions, runs :class:`MemReader` and publishes its ops and its consumer offsets in one
  Kafka transaction: after a crash either both are in the log or neither is, and the ops that
  are in the log are already in the fold, so nothing is lost, repeated or half-applied.
- **query audit** (``queries``): writes QueryEvents to ClickHouse.

With embedded milvus-lite and chdb one worker owns the stores; with servers configured, N workers
in the same consumer groups split the partitions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from processors.embedder import Embedder, load_embedder
from processors.extract import Extractor, LLMExtractor, RuleExtractor
from processors.fold import Memory
from processors.fusion import CubeMemories
from processors.reader import MemReader, Sourced
from schemas import Codec, DecodeError
from sinks.clickhouse import ClickHouseSink
from sinks.stores import clickhouse_client, milvus_view, minio_client
from sinks.vault import VaultSink
from streams.consumer import Event, EventConsumer, InvalidEvent, dead_letter
from streams.producer import EventProducer
from streams.search import Searcher
from streams.settings import Settings
from streams.topics import INTERACTIONS, MEMORY_OPS, QUERIES, retry_kafka

log = logging.getLogger("memstream.worker")


def interaction_validator(settings: Settings) -> Callable[[Event], None]:
    """Rules an interaction must meet before the reader takes it (else: dead-letter)."""

    def validate(event: Event) -> None:
        value = event.value
        if not value["cube_id"].strip():
            raise InvalidEvent("missing cube_id")
        if not value["speaker"].strip():
            raise InvalidEvent("missing speaker")
        if not value["content"].strip():
            raise InvalidEvent("empty content")
        size = len(value["content"].encode())
        if size > settings.max_event_bytes:
            raise InvalidEvent(
                f"content is {size} bytes, over the limit of {settings.max_event_bytes}"
            )

    return validate


def embedder_for(settings: Settings) -> Embedder:
    """The configured embedder, loaded once per process (ONNX exports cached in the tools dir)."""
    return load_embedder(settings.embedder, settings.tools_dir / "onnx")


def default_extractor(settings: Settings) -> Extractor:
    if settings.llm_base_url:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else ""
        return LLMExtractor(settings.llm_base_url, settings.llm_model, key)
    return RuleExtractor()


class Worker:
    """Owns the stores and runs the three processor threads until :meth:`stop`."""

    def __init__(
        self,
        settings: Settings | None = None,
        embedder: Embedder | None = None,
        extractor: Extractor | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.codec = Codec()
        self.embedder = embedder or embedder_for(self.settings)
        self.memories = CubeMemories(self.embedder.dim)
        self.reader = MemReader(
            extractor or default_extractor(self.settings),
            self.embedder,
            self.memories,
            self.settings.merge_threshold,
        )
        self.producer = EventProducer(self.settings, self.codec)
        self.milvus = milvus_view(self.settings)
        self.clickhouse = ClickHouseSink(clickhouse_client(self.settings))
        self.vault = VaultSink(minio_client(self.settings), self.settings.minio_bucket)
        self.searcher = Searcher(self.milvus, self.embedder, self.settings.search_budget_rows)
        self.caught_up = threading.Event()
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._store_lock = threading.Lock()
        self.counters = {"interactions": 0, "ops_emitted": 0, "ops_folded": 0, "ops_written": 0}

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (
            ("ops-follower", self._follow_ops),
            ("reader", self._read),
            ("query-audit", self._audit_queries),
        ):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self.producer.close()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        """A processor that fails stops the worker: better restart than run with a hole."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:
                log.exception("processor %s failed; stopping the worker", target.__name__)
                self.failure = exc
                self._stop.set()

        return run

    # ops follower ----------------------------------------------------------------------------

    def _follow_ops(self) -> None:
        topic = self.settings.topic(MEMORY_OPS.name)
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": self.settings.group("views"),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
            tps = [TopicPartition(topic, p) for p in partitions]
            committed = {tp.partition: max(tp.offset, 0)
                         for tp in retry_kafka(lambda: consumer.committed(tps, 30))}  # fmt: skip
            end = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), 30)[1]
                   for p in partitions}  # fmt: skip
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            written = dict(committed)
            while not self._stop.is_set():
                first = consumer.poll(0.1)
                if first is None:
                    self._flush_views()
                    messages = []
                else:
                    messages = [first, *consumer.consume(999, 0)]
                to_write: list[Event] = []
                folded: dict[str, None] = {}
                for msg in messages:
                    if msg.error() is not None:
                        raise RuntimeError(f"memory-ops consumer: {msg.error()}")
                    event = self._decode_op(msg)
                    if event is None:
                        continue
                    self.memories.apply(event.value)
                    self.counters["ops_folded"] += 1
                    folded[event.value["memory_id"]] = None
                    if msg.offset() >= committed[msg.partition()]:
                        to_write.append(event)
                # Every folded state goes to the working set, replayed ones too (it is built
                # from the fold); the stores get those of ops not yet written.
                states = self._states(folded)
                if to_write:
                    self._write_views(to_write, states)
                self.searcher.apply(states)
                # The fetch position, unlike last offset + 1, steps over transaction markers.
                position = {tp.partition: tp.offset for tp in consumer.position(tps)}
                advanced = [TopicPartition(topic, p, o) for p, o in position.items()
                            if o > max(written[p], 0)]  # fmt: skip
                if advanced:
                    consumer.commit(offsets=advanced, asynchronous=False)
                    written.update({tp.partition: tp.offset for tp in advanced})
                if not self.caught_up.is_set():
                    self._check_caught_up(position, end)
        finally:
            consumer.close()

    def _check_caught_up(self, position: dict[int, int], end: dict[int, int]) -> None:
        if all(end[p] == 0 or position[p] >= end[p] for p in end):
            log.info("fold caught up with memory-ops: %d ops", self.counters["ops_folded"])
            self.caught_up.set()

    def _decode_op(self, msg: Any) -> Event | None:
        try:
            decoded = self.codec.decode(msg.value(), reader=MEMORY_OPS.record)
        except DecodeError as exc:
            dead_letter(
                self.producer, self.settings, msg, "DecodeError", exc.reason, "ops-follower"
            )
            return None
        return Event(msg.topic(), msg.partition(), msg.offset(), msg.key(), decoded.name,
                     decoded.writer_version, decoded.record, msg.timestamp()[1])  # fmt: skip

    def _flush_views(self) -> None:
        """When the log goes quiet, seal what Milvus holds in memory (cold loads stay fast)."""
        if self.milvus.unflushed:
            with self._store_lock:
                self.milvus.flush()

    def _write_views(self, events: list[Event], folded: list[Memory]) -> None:
        """Write the latest state of every memory the ops touched, and the ops themselves."""
        touched = {e.value["memory_id"] for e in events}
        states = [m for m in folded if m.memory_id in touched]
        with self._store_lock:
            self.milvus.write(states)
            self.vault.write(states)
            self.clickhouse.write_ops(events)
        self.counters["ops_written"] += len(events)

    def _states(self, memory_ids: Iterable[str]) -> list[Memory]:
        return [m for mid in memory_ids if (m := self.memories.get(mid)) is not None]

    # reader ----------------------------------------------------------------------------------

    def _read(self) -> None:
        while not self.caught_up.wait(0.2):
            if self._stop.is_set():
                return
        topic = self.settings.topic(MEMORY_OPS.name)
        consumer = EventConsumer(
            [self.settings.topic(INTERACTIONS.name)],
            self.settings.group("reader"),
            self.settings,
            self.codec,
            validator=interaction_validator(self.settings),
            dead_letters=self.producer,
            commit_interval=float("inf"),
        )
        transactions = EventProducer(
            self.settings,
            self.codec,
            {"transactional.id": f"{self.settings.group('reader')}-{self.settings.worker_id}"},
        )
        try:
            while not self._stop.is_set():
                batch = consumer.poll_batch(self.settings.reader_batch, 0.1)
                offsets = consumer.take_offsets()
                if not offsets:
                    continue
                ops = self.reader.process(
                    [Sourced(e.value, e.topic, e.partition, e.offset) for e in batch]
                )
                # The ops and the reader's offsets commit together, or not at all.
                transactions.publish_transaction(
                    topic,
                    MEMORY_OPS.record,
                    [(op["cube_id"], op) for op in ops],
                    offsets,
                    consumer.group_metadata(),
                )
                self.counters["interactions"] += len(batch)
                self.counters["ops_emitted"] += len(ops)
        finally:
            consumer.close()
            transactions.close()

    # query audit -----------------------------------------------------------------------------

    def _audit_queries(self) -> None:
        consumer = EventConsumer(
            [self.settings.topic(QUERIES.name)],
            self.settings.group("query-audit"),
            self.settings,
            self.codec,
            dead_letters=self.producer,
        )
        try:
            while not self._stop.is_set():
                # A chdb insert costs milliseconds whatever its size: per-search inserts were the
                # worker's largest CPU share under search load (py-spy, bench profile).
                batch = consumer.poll_batch(1000, 0.2, linger=1.0)
                if batch:
                    with self._store_lock:
                        self.clickhouse.write_queries(batch)
            consumer.commit()
        finally:
            consumer.close()

    # read side -------------------------------------------------------------------------------

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        with self._store_lock:
            return self.clickhouse.history(memory_id)

    def audit(self, sql: str) -> list[dict[str, Any]]:
        with self._store_lock:
            return self.clickhouse.query(sql)

    def lag(self) -> dict[str, int]:
        """Events not yet handled: interactions not committed by the reader, ops not written."""
        probe = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                          "group.id": self.settings.group("reader")})  # fmt: skip
        views = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                          "group.id": self.settings.group("views")})  # fmt: skip
        try:
            return {
                "interactions": self._topic_lag(probe, self.settings.topic(INTERACTIONS.name)),
                "memory_ops": self._topic_lag(views, self.settings.topic(MEMORY_OPS.name)),
            }
        finally:
            probe.close()
            views.close()

    @staticmethod
    def _topic_lag(consumer: Consumer, topic: str) -> int:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        total = 0
        for tp in retry_kafka(lambda: consumer.committed(tps, 10)):
            high = consumer.get_watermark_offsets(tp, 10)[1]
            total += high - max(tp.offset, 0)
        return total

    def wait_drained(self, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.failure is not None:
                raise RuntimeError("worker failed") from self.failure
            if self.caught_up.is_set() and not any(self.lag().values()):
                return True
            time.sleep(0.25)
        return False

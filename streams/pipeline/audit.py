"""The audit writer: QueryEvents and CommandResults into ClickHouse (``queries``,
``command_results``), so who read what, and what every command became, is queryable in SQL."""

from __future__ import annotations

from typing import Any

from schemas import Codec
from streams.pipeline.build import Stores
from streams.runtime.processor import Processor
from streams.settings import Settings
from streams.transport.consumer import Event, EventConsumer, dead_letter_bytes
from streams.transport.producer import EventProducer
from streams.transport.topics import COMMAND_RESULTS, QUERIES


class AuditProcessor(Processor):
    """queries + command-results -> ClickHouse, at least once (tables collapse by event id)."""

    name = "audit"
    inputs = ("queries", "command-results")
    outputs = ("clickhouse:queries", "clickhouse:command_results")
    state = "none (the tables are the state)"

    def __init__(self, settings: Settings, stores: Stores, codec: Codec | None = None) -> None:
        self.settings = settings
        self.stores = stores
        self.codec = codec or Codec()
        self.counters = {"queries": 0, "command_results": 0, "refused_rows": 0}

    def open(self) -> None:
        s = self.settings
        self._queries_topic = s.topic(QUERIES.name)
        self._dlq = EventProducer(s, self.codec)
        self._consumer = EventConsumer(
            [self._queries_topic, s.topic(COMMAND_RESULTS.name)],
            s.group("audit"),
            s,
            self.codec,
            dead_letters=self._dlq,
        )

    def close(self) -> None:
        if getattr(self, "_consumer", None) is not None:
            self._consumer.close()
        if getattr(self, "_dlq", None) is not None:
            self._dlq.close()

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    def step(self) -> None:
        # A chdb insert costs milliseconds whatever its size: per-search inserts were the
        # worker's largest CPU share under search load (py-spy, bench profile), so it lingers.
        batch = self._consumer.poll_batch(1000, 0.2, linger=1.0)
        if not batch:
            return
        queries = [e for e in batch if e.topic == self._queries_topic]
        results = [e for e in batch if e.topic != self._queries_topic]
        # The sink contract (sinks/contract.py): a row ClickHouse refuses is dead-lettered, not
        # the batch around it; a store that is down raises before anything is committed.
        clickhouse = self.stores.clickhouse
        with self.stores.clickhouse_lock:
            refused = clickhouse.write_isolating(queries, clickhouse.write_queries)
            refused += clickhouse.write_isolating(results, clickhouse.write_command_results)
        by_id = {e.value["event_id"]: e for e in batch}
        for r in refused:
            self._dead_letter(by_id[r.key], f"{r.sink} refused the row: {r.reason}")
        self.counters["queries"] += len(queries)
        self.counters["command_results"] += len(results)
        self._consumer.commit()

    def _dead_letter(self, event: Event, reason: str) -> None:
        dead_letter_bytes(
            self._dlq, self.settings, topic=event.topic, partition=event.partition,
            offset=event.offset, key=event.key,
            value=self.codec.encode(event.record_name, event.value), error_type="Refused",
            reason=reason, worker=f"audit/{self.settings.worker_id}",
        )  # fmt: skip
        self.counters["refused_rows"] += 1

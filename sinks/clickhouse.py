"""The audit view: every memory op and every query in ClickHouse, and a memory's history.

Tables are ReplacingMergeTree ordered by a key that ends in the event id, so an op delivered
twice collapses to one row; readers that must count exactly use ``FINAL``.

Ops live in one table per view generation (``memory_ops_g<N>``, see
:mod:`streams.runtime.generations`); ``memory_ops`` and ``memory_versions`` are views of the
current one (already ``FINAL``), replaced in one statement each when a rebuilt generation takes
over, so audit SQL never names a generation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from processors.ops import payload_of
from sinks.contract import Batch, Refused, write_isolating
from streams.transport.consumer import Event

OPS_TABLE_DDL = """
    CREATE TABLE IF NOT EXISTS {table} (
        event_id String,
        cube_id String,
        memory_id String,
        version UInt32,
        op LowCardinality(String),
        memory_type LowCardinality(String),
        event_time DateTime64(3, 'UTC'),
        actor String,
        caused_by Array(String),
        supersedes Array(String),
        superseded_by Nullable(String),
        reason String,
        generation UInt32 DEFAULT 0,
        text Nullable(String),
        key Nullable(String),
        tags Array(String),
        valid_from Nullable(DateTime64(3, 'UTC')),
        valid_to Nullable(DateTime64(3, 'UTC')),
        payload String,
        topic String,
        partition UInt32,
        offset UInt64,
        ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = ReplacingMergeTree
    ORDER BY (cube_id, memory_id, version, event_id)
"""
DDL = [
    """
    CREATE TABLE IF NOT EXISTS queries (
        event_id String,
        cube_id String,
        actor String,
        query String,
        top_k UInt16,
        event_time DateTime64(3, 'UTC'),
        memory_ids Array(String),
        scores Array(Float32),
        latency_ms Float32,
        topic String,
        partition UInt32,
        offset UInt64
    ) ENGINE = ReplacingMergeTree
    ORDER BY (cube_id, event_time, event_id)
    """,
    """
    CREATE TABLE IF NOT EXISTS command_results (
        event_id String,
        command_id String,
        cube_id String,
        memory_id String,
        command LowCardinality(String),
        issued_by String,
        status LowCardinality(String),
        reason String,
        op_event_ids Array(String),
        version Nullable(UInt32),
        event_time DateTime64(3, 'UTC'),
        source_topic String,
        source_partition UInt32,
        source_offset UInt64,
        topic String,
        partition UInt32,
        offset UInt64
    ) ENGINE = ReplacingMergeTree
    ORDER BY (cube_id, command_id, event_id)
    """,
]
VERSION_COLUMNS = """memory_id, cube_id, version, op, event_time, text, key, valid_from,
    valid_to, superseded_by, supersedes, caused_by, reason, actor, generation, partition, offset"""

OP_COLUMNS = [
    "event_id", "cube_id", "memory_id", "version", "op", "memory_type", "event_time", "actor",
    "caused_by", "supersedes", "superseded_by", "reason", "text", "key", "tags", "valid_from",
    "valid_to", "payload", "generation", "topic", "partition", "offset",
]  # fmt: skip
RESULT_COLUMNS = [
    "event_id", "command_id", "cube_id", "memory_id", "command", "issued_by", "status", "reason",
    "op_event_ids", "version", "event_time", "source_topic", "source_partition", "source_offset",
    "topic", "partition", "offset",
]  # fmt: skip
QUERY_COLUMNS = [
    "event_id", "cube_id", "actor", "query", "top_k", "event_time", "memory_ids", "scores",
    "latency_ms", "topic", "partition", "offset",
]  # fmt: skip
HISTORY_COLUMNS = [
    "memory_id", "version", "op", "event_time", "text", "key", "valid_from", "valid_to",
    "superseded_by", "supersedes", "caused_by", "reason", "actor", "partition", "offset",
]  # fmt: skip
# The only tables audit SQL may read (sinks/audit_sql.py), by the names users see: views count
# as themselves, so a generation table behind ``memory_ops`` need not (and may not) be named.
AUDIT_TABLES = frozenset({"memory_ops", "memory_versions", "queries", "command_results"})


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    raise TypeError(type(value).__name__)


class ClickHouseSink:
    """Inserts op and query rows into one generation's tables; reads history and runs SQL."""

    def __init__(self, client: Any, ops_table: str = "memory_ops_g0") -> None:
        self.client = client
        self.ops_table = ops_table
        self._adopt_legacy_table()
        for statement in (*DDL, OPS_TABLE_DDL.format(table=ops_table)):
            self.client.command(statement)
        self._add_generation_column()

    def _adopt_legacy_table(self) -> None:
        """A store from before generations has a ``memory_ops`` table: it is generation 0."""
        engine = self.query(
            "SELECT engine FROM system.tables WHERE database = currentDatabase() "
            "AND name = 'memory_ops'"
        )
        if engine and engine[0]["engine"] != "View":
            self.client.command("RENAME TABLE memory_ops TO memory_ops_g0")

    def _add_generation_column(self) -> None:
        self.client.command(
            f"ALTER TABLE {self.ops_table} ADD COLUMN IF NOT EXISTS generation UInt32 DEFAULT 0 "
            "AFTER reason"
        )

    def activate(self) -> None:
        """Make this generation's table the one ``memory_ops`` and ``memory_versions`` show."""
        self.client.command(
            f"CREATE OR REPLACE VIEW memory_ops AS SELECT * FROM {self.ops_table} FINAL"
        )
        self.client.command(
            f"CREATE OR REPLACE VIEW memory_versions AS SELECT {VERSION_COLUMNS} "
            f"FROM {self.ops_table} FINAL"
        )

    def drop(self) -> None:
        """Drop this generation's ops table (a retired generation, after the switch)."""
        self.client.command(f"DROP TABLE IF EXISTS {self.ops_table}")

    name = "clickhouse"

    def write(self, batch: Batch) -> list[Refused]:
        """The sink contract (:mod:`sinks.contract`): the batch's ops into this generation's
        table, an op ClickHouse (or the row's encoding) refuses returned with the reason."""
        return self.write_isolating(batch.ops, self.write_ops)

    def write_isolating(
        self, events: Sequence[Event], write: Callable[[Sequence[Event]], int]
    ) -> list[Refused]:
        """``write`` (one of the ``write_*`` inserts) under the sink contract, rows keyed by
        their event id."""
        return write_isolating(self.name, events, write, lambda e: e.value["event_id"],
                               self._alive)  # fmt: skip

    def flush(self) -> None:
        """An insert is durable once it returned."""

    def _alive(self) -> bool:
        return self.client.command("SELECT 1") == 1

    def write_ops(self, events: Sequence[Event]) -> int:
        rows = []
        for e in events:
            op = e.value
            payload = payload_of(op) or {}
            rows.append(
                [
                    op["event_id"], op["cube_id"], op["memory_id"], op["version"], op["op"],
                    op["memory_type"], op["event_time"], op["actor"], op["caused_by"],
                    op["supersedes"], op.get("superseded_by"), op["reason"],
                    payload.get("text"), payload.get("key"), list(payload.get("tags", [])),
                    payload.get("valid_from"), payload.get("valid_to"),
                    json.dumps(
                        {k: v for k, v in payload.items() if k != "embedding"},
                        default=_json_default,
                    ),
                    op.get("generation", 0), e.topic, e.partition, e.offset,
                ]
            )  # fmt: skip
        if rows:
            self.client.insert(self.ops_table, rows, column_names=OP_COLUMNS)
        return len(rows)

    def write_queries(self, events: Sequence[Event]) -> int:
        rows = [
            [
                q["event_id"], q["cube_id"], q["actor"], q["query"], q["top_k"], q["event_time"],
                [r["memory_id"] for r in q["results"]], [r["score"] for r in q["results"]],
                q["latency_ms"], e.topic, e.partition, e.offset,
            ]
            for e in events
            for q in [e.value]
        ]  # fmt: skip
        if rows:
            self.client.insert("queries", rows, column_names=QUERY_COLUMNS)
        return len(rows)

    def write_command_results(self, events: Sequence[Event]) -> int:
        rows = [
            [
                r["event_id"], r["command_id"], r["cube_id"], r["memory_id"], r["command"],
                r["issued_by"], r["status"], r["reason"], r["op_event_ids"], r["version"],
                r["event_time"], r["source"]["topic"], r["source"]["partition"],
                r["source"]["offset"], e.topic, e.partition, e.offset,
            ]
            for e in events
            for r in [e.value]
        ]  # fmt: skip
        if rows:
            self.client.insert("command_results", rows, column_names=RESULT_COLUMNS)
        return len(rows)

    def history(
        self, memory_id: str, max_hops: int = 64, client: Any = None
    ) -> list[dict[str, Any]]:
        """Every version of the memory and of the memories it replaced or that replaced it;
        on ``client`` if given (a read connection of its own), else on the sink's."""
        lineage, frontier = set(), {memory_id}
        rows: list[dict[str, Any]] = []
        for _ in range(max_hops):
            if not frontier:
                break
            lineage |= frontier
            found = self.query(
                f"SELECT {', '.join(HISTORY_COLUMNS)} FROM {self.ops_table} FINAL "
                "WHERE memory_id IN {ids:Array(String)}",
                {"ids": sorted(frontier)},
                client,
            )
            rows.extend(found)
            linked = {r["superseded_by"] for r in found if r["superseded_by"]}
            linked |= {s for r in found for s in r["supersedes"]}
            frontier = linked - lineage
        # A cube's ops share one partition: offset order is the order they happened in.
        return sorted(rows, key=lambda r: (r["partition"], r["offset"]))

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None, client: Any = None
    ) -> list[dict[str, Any]]:
        result = (client or self.client).query(sql, parameters=parameters or {})
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    def count_ops(self, cube_id: str | None = None) -> int:
        where = "WHERE cube_id = {c:String}" if cube_id else ""
        rows = self.query(
            f"SELECT count() AS n FROM {self.ops_table} FINAL {where}", {"c": cube_id}
        )
        return int(rows[0]["n"])

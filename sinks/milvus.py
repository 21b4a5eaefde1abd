"""The plaintext view: active plaintext memories and their vectors in Milvus.

Rows are whole memory states keyed by memory id, written by upsert, so delivering an op twice
(or writing a state newer than the op that triggered it) changes nothing. Memories that are not
active (merged, archived, expired, deleted) leave the collection; the vault keeps archived ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from pymilvus import DataType, MilvusClient

from processors.embedder import DIM
from processors.fold import Memory
from processors.ops import embedding_vector
from schemas.limits import (
    CUBE_ID_BYTES,
    ID_BYTES,
    KEY_BYTES,
    MEMORY_TEXT_BYTES,
    SESSION_ID_BYTES,
    TAG_BYTES,
    TAGS,
    TURN_ID_BYTES,
    cut_utf8,
)
from sinks.contract import Batch, Refused, write_isolating

COLLECTION = "memories"
#: The name other readers of the view use: an alias of the current generation's collection,
#: moved in one call when a rebuilt generation takes over.
ALIAS = "memories_live"
FLUSH_EVERY = 10_000
NO_TIME = -1
OUTPUT_FIELDS = [
    "memory_id", "cube_id", "version", "text", "key", "tags", "created_at", "updated_at",
    "valid_from", "valid_to", "session_id", "turn_id", "source_event_id",
]  # fmt: skip


PAGE = 16384
Consistency = Literal["Strong", "Session", "Bounded", "Eventually"]


_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def quote(value: str) -> str:
    """A string literal for a Milvus boolean expression. Line breaks and tabs are escaped (a
    raw line break ends the literal: "unterminated string literal"); Milvus knows no ``\\u``
    escape, and takes other control characters as they are."""
    return '"' + value.translate(_ESCAPES) + '"'


def epoch_ms(value: datetime | None) -> int:
    """A time as the view stores it: epoch milliseconds, ``NO_TIME`` for none."""
    return int(value.timestamp() * 1000) if value is not None else NO_TIME


def row_fields(m: Memory) -> dict[str, Any]:
    """A memory state as the view's row holds it (``OUTPUT_FIELDS``), without its vector."""
    source = m.source or {}
    return {
        "memory_id": m.memory_id,
        "cube_id": m.cube_id,
        "version": m.version,
        "text": m.text,
        "key": m.key or "",
        "tags": [cut_utf8(t, TAG_BYTES) for t in m.tags[:TAGS]],
        "created_at": epoch_ms(m.created_at),
        "updated_at": epoch_ms(m.updated_at),
        "valid_from": epoch_ms(m.valid_from),
        "valid_to": epoch_ms(m.valid_to),
        "session_id": source.get("session_id") or "",
        "turn_id": source.get("turn_id") or "",
        "source_event_id": source.get("event_id") or "",
    }


class MilvusSink:
    """Writes memory states to the collection; reads a cube's rows back (cold loads, listings).

    memstream's own searches run on the working set, not on an ANN index here, so the embedded
    default (milvus-lite) asks for FLAT: building HNSW in-process took 16% of the worker's CPU
    during ingest (and 22% of a bulk write's time) for searches nobody makes. A server builds
    AUTOINDEX on its own nodes for other readers of the view.

    Reads ask for ``read_consistency`` (Strong by default): a server's default, Bounded, serves
    reads from a snapshot up to seconds old, so a cube loaded cold right after a write (by this
    process or, in a scaled-out deployment, by the views process) would miss it and stay stale
    in the working set. Strong costs a wait for the server's next time tick (0.2-0.3 s per read
    on Milvus 2.3.5 here); milvus-lite sees its writes at once either way, and Strong costs it
    nothing measurable.
    """

    def __init__(
        self,
        client: MilvusClient,
        collection: str = COLLECTION,
        *,
        embedded: bool = True,
        read_consistency: Consistency = "Strong",
    ) -> None:
        self.client = client
        self.collection = collection
        self.embedded = embedded
        self.vector_index = "FLAT" if embedded else "AUTOINDEX"
        self.read_consistency = read_consistency
        self.unflushed = 0
        self._ensure()

    def _ensure(self) -> None:
        if self.client.has_collection(self.collection):
            self.client.load_collection(self.collection)
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("memory_id", DataType.VARCHAR, is_primary=True, max_length=ID_BYTES)
        schema.add_field("cube_id", DataType.VARCHAR, max_length=CUBE_ID_BYTES)
        schema.add_field("version", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=MEMORY_TEXT_BYTES)
        schema.add_field("key", DataType.VARCHAR, max_length=KEY_BYTES)
        schema.add_field(
            "tags",
            DataType.ARRAY,
            element_type=DataType.VARCHAR,
            max_capacity=TAGS,
            max_length=TAG_BYTES,
        )
        for name in ("created_at", "updated_at", "valid_from", "valid_to"):
            schema.add_field(name, DataType.INT64)
        schema.add_field("session_id", DataType.VARCHAR, max_length=SESSION_ID_BYTES)
        schema.add_field("turn_id", DataType.VARCHAR, max_length=TURN_ID_BYTES)
        schema.add_field("source_event_id", DataType.VARCHAR, max_length=ID_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=self.vector_index, metric_type="COSINE")
        self.client.create_collection(self.collection, schema=schema, index_params=index)

    def activate(self) -> None:
        """Point the :data:`ALIAS` at this collection."""
        if ALIAS in self.client.list_aliases(self.collection).get("aliases", []):
            return
        if ALIAS in self.client.list_aliases().get("aliases", []):
            self.client.alter_alias(self.collection, ALIAS)
        else:
            self.client.create_alias(self.collection, ALIAS)

    def drop(self) -> None:
        """Drop the collection (a retired generation's, after the switch)."""
        self.client.drop_collection(self.collection)

    name = "milvus"

    def write(self, batch: Batch) -> list[Refused]:
        """The sink contract (:mod:`sinks.contract`): the batch's plaintext states, a state
        Milvus refuses (a field over its length) returned with the reason."""
        states = [m for m in batch.states if m.memory_type == "PLAINTEXT"]
        return write_isolating(self.name, states, self.put, lambda m: m.memory_id, self._alive)

    def _alive(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    def put(self, memories: Iterable[Memory]) -> tuple[int, int]:
        """Upsert the searchable states, delete the others; return (upserted, deleted)."""
        latest = {m.memory_id: m for m in memories if m.memory_type == "PLAINTEXT"}
        rows = [self._row(m) for m in latest.values() if m.searchable]
        gone = [m.memory_id for m in latest.values() if not m.searchable]
        if rows:
            self.client.upsert(self.collection, rows)
        if gone:
            self.client.delete(self.collection, ids=gone)
        self.unflushed += len(rows) + len(gone)
        if self.unflushed >= FLUSH_EVERY:
            self.flush()
        return len(rows), len(gone)

    def flush(self) -> None:
        """Seal the growing segment: milvus-lite scans unsealed rows one by one, so a cube read
        back from the view (a cold load) slows down with every unflushed row. A server seals
        segments on its own (by size and idle time) and serves growing ones from its query
        nodes; a flush there blocks the writer 0.5-1.5 s and leaves small segments to compact,
        so it is skipped."""
        if self.embedded:
            self.client.flush(self.collection)
        self.unflushed = 0

    @staticmethod
    def _row(m: Memory) -> dict[str, Any]:
        return {**row_fields(m), "vector": embedding_vector(m.embedding).tolist()}

    def _query(
        self, filter_expr: str, output_fields: list[str], **kwargs: Any
    ) -> list[dict[str, Any]]:
        return self.client.query(
            self.collection,
            filter=filter_expr,
            output_fields=output_fields,
            consistency_level=self.read_consistency,
            **kwargs,
        )

    def rows(self, filter_expr: str, limit: int = PAGE) -> list[dict[str, Any]]:
        """The rows that match a Milvus boolean expression, at most ``limit`` (up to 16,384)."""
        return self._query(filter_expr, OUTPUT_FIELDS, limit=limit)

    def cube_rows(self, cube_id: str) -> list[dict[str, Any]]:
        """Every row of one cube, current and closed, with its vector (pages of 16,384).

        milvus-lite pages by offset (its limited queries keep insertion order, not key order).
        A server refuses ``offset + limit`` beyond 16,384 (its max query result window) but
        returns a limited query's rows in primary-key order, so it pages by key instead.
        """
        expr = f"cube_id == {quote(cube_id)}"
        fields = [*OUTPUT_FIELDS, "vector"]
        rows: list[dict[str, Any]] = []
        while True:
            if self.embedded:
                page = self._query(expr, fields, limit=PAGE, offset=len(rows))
            elif rows:
                after = f"{expr} and memory_id > {quote(rows[-1]['memory_id'])}"
                page = self._query(after, fields, limit=PAGE)
            else:
                page = self._query(expr, fields, limit=PAGE)
            rows.extend(page)
            if len(page) < PAGE:
                return rows

    def get(self, memory_ids: Sequence[str]) -> list[dict[str, Any]]:
        return self.client.get(
            self.collection,
            ids=list(memory_ids),
            output_fields=OUTPUT_FIELDS,
            consistency_level=self.read_consistency,
        )

    def count(self, filter_expr: str = "") -> int:
        result = self._query(filter_expr, ["count(*)"])
        return int(result[0]["count(*)"])

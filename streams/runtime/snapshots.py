"""Fold snapshots: the fold of one memory-ops partition and the offset it reached, in MinIO.

Without them every start refolds ``memory-ops`` from offset 0 and restart time grows with the
log forever; with them a worker reads the latest snapshot of each partition it owns and folds
only the tail. A snapshot is a cache of the log, never the truth: it is valid for any consumer of
the log (it holds the fold of offsets ``[0, next_offset)``), it is written only after the ops in
it were committed, and a missing or unreadable snapshot just means folding from further back.

Format: a sequence of ``FoldSnapshot`` records (Avro single-object encoding, the codec's, each
prefixed by its 4-byte big-endian length), each holding up to ``CHUNK`` memory states: no pickle,
nothing executable, readable by any Avro reader. Objects are named by their offset, so the newest
is found by listing, and a half-written one (no complete last chunk) is skipped.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from minio import Minio
from minio.error import S3Error

from processors.fold import Memory
from schemas import Codec, DecodeError

log = logging.getLogger("memstream.snapshots")
RECORD = "FoldSnapshot"
CHUNK = 5_000
KEEP = 2


@dataclass(frozen=True)
class Snapshot:
    """A partition's fold as of ``next_offset`` (the first op it does not include)."""

    topic: str
    partition: int
    next_offset: int
    ops_folded: int
    states: list[Memory]


def state_record(m: Memory) -> dict[str, Any]:
    """A memory state as a ``MemoryState`` record."""
    return {
        "memory_id": m.memory_id,
        "cube_id": m.cube_id,
        "memory_type": m.memory_type,
        "version": m.version,
        "status": m.status,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "text": m.text,
        "key": m.key,
        "tags": list(m.tags),
        "embedding": m.embedding,
        "embedding_model": m.embedding_model,
        "valid_from": m.valid_from,
        "valid_to": m.valid_to,
        "source": m.source,
        "activated": m.activated,
        "payload_json": json.dumps(m.payload, default=_json_default, sort_keys=True),
        "caused_by": list(m.caused_by),
        "supersedes": list(m.supersedes),
        "superseded_by": m.superseded_by,
        "last_event_id": m.last_event_id,
    }


def memory_from_record(r: dict[str, Any]) -> Memory:
    """The inverse of :func:`state_record`."""
    return Memory(
        memory_id=r["memory_id"],
        cube_id=r["cube_id"],
        memory_type=r["memory_type"],
        version=r["version"],
        status=r["status"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        text=r["text"],
        key=r["key"],
        tags=tuple(r["tags"]),
        embedding=r["embedding"],
        embedding_model=r["embedding_model"],
        valid_from=r["valid_from"],
        valid_to=r["valid_to"],
        source=r["source"],
        activated=r["activated"],
        payload={} if r["payload_json"] == "{}" else json.loads(r["payload_json"]),
        caused_by=tuple(r["caused_by"]),
        supersedes=tuple(r["supersedes"]),
        superseded_by=r["superseded_by"],
        last_event_id=r["last_event_id"],
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


class SnapshotStore:
    """Writes and finds fold snapshots under ``snapshots/<topic>/<partition>/`` in a bucket."""

    def __init__(self, client: Minio, bucket: str, codec: Codec | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.codec = codec or Codec()

    @staticmethod
    def _prefix(topic: str, partition: int) -> str:
        return f"snapshots/{topic}/{partition:04d}/"

    def _offsets(self, topic: str, partition: int) -> list[int]:
        names = self.client.list_objects(self.bucket, prefix=self._prefix(topic, partition))
        offsets = []
        for obj in names:
            stem = Path(obj.object_name).name.removesuffix(".snap")
            if stem.isdigit():
                offsets.append(int(stem))
        return sorted(offsets)

    def save(
        self, topic: str, partition: int, next_offset: int, ops_folded: int, states: list[Memory]
    ) -> str:
        """Write a snapshot (streamed through a temporary file: it may be large) and drop all
        but the newest ``KEEP``; return its object name."""
        name = f"{self._prefix(topic, partition)}{next_offset:020d}.snap"
        chunks = max(1, -(-len(states) // CHUNK))
        with tempfile.TemporaryFile() as tmp:
            for n in range(chunks):
                body = self.codec.encode(
                    RECORD,
                    {
                        "topic": topic,
                        "partition": partition,
                        "next_offset": next_offset,
                        "ops_folded": ops_folded,
                        "chunk": n,
                        "chunks": chunks,
                        "states": [state_record(m) for m in states[n * CHUNK : (n + 1) * CHUNK]],
                    },
                )
                tmp.write(len(body).to_bytes(4, "big"))
                tmp.write(body)
            size = tmp.tell()
            tmp.seek(0)
            self.client.put_object(self.bucket, name, tmp, size)
        for old in self._offsets(topic, partition)[:-KEEP]:
            self.client.remove_object(
                self.bucket, f"{self._prefix(topic, partition)}{old:020d}.snap"
            )
        return name

    def latest(self, topic: str, partition: int, at_most: int | None = None) -> Snapshot | None:
        """The newest readable snapshot of the partition with ``next_offset <= at_most``."""
        for offset in reversed(self._offsets(topic, partition)):
            if at_most is not None and offset > at_most:
                continue
            try:
                return self._read(topic, partition, offset)
            except (DecodeError, S3Error, ValueError) as exc:
                log.warning("snapshot %s/%d@%d unreadable (%s); trying an older one",
                            topic, partition, offset, exc)  # fmt: skip
        return None

    def _read(self, topic: str, partition: int, offset: int) -> Snapshot:
        name = f"{self._prefix(topic, partition)}{offset:020d}.snap"
        response = self.client.get_object(self.bucket, name)
        try:
            records = list(self._records(response))
        finally:
            response.close()
            response.release_conn()
        if not records or len(records) != records[0]["chunks"]:
            raise ValueError(
                f"{name}: {len(records)} chunks of {records[0]['chunks'] if records else '?'}"
            )
        states = [memory_from_record(r) for chunk in records for r in chunk["states"]]
        head = records[0]
        return Snapshot(topic, partition, head["next_offset"], head["ops_folded"], states)

    def _records(self, stream: Any) -> Iterator[dict[str, Any]]:
        while True:
            header = stream.read(4)
            if not header:
                return
            if len(header) < 4:
                raise ValueError("truncated snapshot")
            size = int.from_bytes(header, "big")
            body = _read_exactly(stream, size)
            yield self.codec.decode(body, reader=RECORD).record


def _read_exactly(stream: Any, size: int) -> bytes:
    buf = io.BytesIO()
    while buf.tell() < size:
        part = stream.read(size - buf.tell())
        if not part:
            raise ValueError("truncated snapshot")
        buf.write(part)
    return buf.getvalue()


def states_of(memories: Iterable[Memory]) -> list[Memory]:
    """A stable list of states to snapshot (states are immutable: no copy of them is needed)."""
    return sorted(memories, key=lambda m: m.memory_id)

"""A cube's memory updates, read from its partition of ``memory-ops``: decoded, each handed out
once, in log order, from a chosen position.

Why one partition, assigned rather than subscribed: every op of a cube lands on the partition
its key hashes to (:func:`~streams.transport.topics.partition_for`), so a subscriber of one cube
needs nothing else, and a group rebalance would only take the partition away from it. The
consumer group is used for committed positions only (where a subscriber of that name resumes).

Why the duplicate check: Kafka delivers at least once and a writer may re-emit an op after a
crash; op ids are deterministic (a re-emitted op has the same event id) and versions only grow
per memory, so :class:`OpDedup` drops what was already handed out. It is the one place of that
rule: the cube reader here and :class:`streams.sdk.subscribe.OpSubscriber` both use it.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from schemas.limits import OFFSET_MAX, check_time, cut_utf8
from streams.settings import Settings
from streams.transport.consumer import raise_if_fatal
from streams.transport.follower import OpReader
from streams.transport.topics import MEMORY_OPS, partition_for, retry_kafka

log = logging.getLogger("memstream.updates")

Since = int | datetime | None
"""Where a subscription starts: a Kafka offset of the cube's partition (that op first), the
first op at or after a time, or None (the group's committed position, else the end)."""


@dataclass(frozen=True)
class MemoryUpdate:
    """One memory op as a subscriber sees it; ``position`` ("partition:offset") resumes right
    after it (pass it as ``after``, or as the SSE ``Last-Event-ID``)."""

    op: str
    memory_id: str
    version: int
    cube_id: str
    event_time: datetime
    text: str | None
    generation: int | None
    partition: int
    offset: int
    timestamp_ms: int
    raw: dict[str, Any]

    @property
    def position(self) -> str:
        return format_position(self.partition, self.offset)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (SSE data, MCP resources); :meth:`from_json` reads it back."""
        return {
            "op": self.op,
            "memory_id": self.memory_id,
            "version": self.version,
            "cube_id": self.cube_id,
            "event_time": self.event_time.isoformat(),
            "text": self.text,
            "generation": self.generation,
            "position": self.position,
            "timestamp_ms": self.timestamp_ms,
            "raw": _jsonable(self.raw),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryUpdate:
        """The update of a :meth:`to_json` dict (``raw`` stays JSON: times as ISO strings,
        bytes such as the embedding as base64)."""
        partition, offset = parse_position(data["position"])
        return cls(
            op=data["op"],
            memory_id=data["memory_id"],
            version=data["version"],
            cube_id=data["cube_id"],
            event_time=datetime.fromisoformat(data["event_time"]),
            text=data.get("text"),
            generation=data.get("generation"),
            partition=partition,
            offset=offset,
            timestamp_ms=data["timestamp_ms"],
            raw=data.get("raw", {}),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def format_position(partition: int, offset: int) -> str:
    return f"{partition}:{offset}"


def parse_position(position: str) -> tuple[int, int]:
    """("3:1042") -> (3, 1042); ValueError for anything else, an offset beyond Kafka's
    (2^63 - 1) or a partition beyond 2^31 - 1 included (librdkafka overflows on them)."""
    partition, sep, offset = position.strip().partition(":")
    digits = partition.isascii() and offset.isascii()
    if not sep or not digits or not partition.isdigit() or not offset.isdigit():
        raise ValueError(f"not a position (partition:offset): {cut_utf8(position, 64)!r}")
    p, o = int(partition), int(offset)
    if p > 2**31 - 1 or o > OFFSET_MAX:
        raise ValueError(f"position out of range: partition <= {2**31 - 1}, offset <= {OFFSET_MAX}")
    return p, o


def update_of(op: dict[str, Any], partition: int, offset: int, timestamp_ms: int) -> MemoryUpdate:
    """The update of a decoded op (of any schema version: ``generation`` is None before v2)."""
    payload = op.get("payload")
    text = payload.get("text") if isinstance(payload, dict) else None
    return MemoryUpdate(
        op=op["op"],
        memory_id=op["memory_id"],
        version=op["version"],
        cube_id=op["cube_id"],
        event_time=op["event_time"],
        text=text,
        generation=op.get("generation"),
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms,
        raw=op,
    )


class OpDedup:
    """Remembers the ops handed out: an event id seen before, or a version a memory has already
    passed, is a duplicate. ``remember`` bounds the event ids kept (oldest forgotten first)."""

    def __init__(self, remember: int = 100_000) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._versions: dict[str, int] = {}
        self._remember = remember
        self.duplicates = 0

    def fresh(self, op: dict[str, Any]) -> bool:
        """True (and remembered) if the op was not handed out before; False counts a duplicate."""
        if op["event_id"] in self._seen or op["version"] <= self._versions.get(op["memory_id"], 0):
            self.duplicates += 1
            return False
        self._seen[op["event_id"]] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        self._versions[op["memory_id"]] = op["version"]
        return True


class CubeReader:
    """The blocking reader of one cube's updates (one thread may use it: librdkafka consumers
    are not to be shared). :class:`streams.transport.subscription.Subscription` wraps it for
    asyncio.

    Start: ``after`` (a position: the op after it), else ``since`` (see :data:`Since`), else the
    committed position of ``group_id``, else the end of the log as of now, resolved here, so
    nothing published after the constructor returns is missed.
    """

    def __init__(
        self,
        cube_id: str,
        group_id: str,
        settings: Settings | None = None,
        since: Since = None,
        after: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.settings = settings or Settings()
        self.cube_id = cube_id
        self._ops = OpReader(self.settings, cube=cube_id)
        self._tp = TopicPartition(
            self.settings.topic(MEMORY_OPS.name), partition_for(cube_id, self.settings.partitions)
        )
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": group_id,
                "isolation.level": "read_committed",  # ops of aborted transactions never show
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                # A subscriber waits for news: an empty fetch returns after 100 ms, not 500, so
                # an op committed meanwhile is fetched at most that late.
                "fetch.wait.max.ms": 100,
            }
        )
        self.dedup = OpDedup()
        try:
            self.start_offset = self._start(since, after, timeout)
            self._consumer.assign(
                [TopicPartition(self._tp.topic, self._tp.partition, self.start_offset)]
            )
        except BaseException:
            self._consumer.close()
            raise
        self._committed = self.start_offset

    @property
    def partition(self) -> int:
        return self._tp.partition

    def _start(self, since: Since, after: str | None, timeout: float) -> int:
        if after is not None:
            partition, offset = parse_position(after)
            if partition != self._tp.partition:
                raise ValueError(
                    f"position {after!r} is not on partition {self._tp.partition} of cube "
                    f"{self.cube_id!r}"
                )
            return offset + 1
        if isinstance(since, datetime):
            at = check_time("since", since if since.tzinfo else since.replace(tzinfo=UTC))
            probe = TopicPartition(self._tp.topic, self._tp.partition, int(at.timestamp() * 1000))
            found = retry_kafka(lambda: self._consumer.offsets_for_times([probe], timeout))[0]
            return found.offset if found.offset >= 0 else self._end(timeout)
        if isinstance(since, int):
            if not 0 <= since <= OFFSET_MAX:
                raise ValueError(f"since must be an offset in 0..{OFFSET_MAX}, not {since}")
            return since
        committed = retry_kafka(lambda: self._consumer.committed([self._tp], timeout))[0]
        return committed.offset if committed.offset >= 0 else self._end(timeout)

    def _end(self, timeout: float) -> int:
        return self.watermarks(timeout)[1]

    def watermarks(self, timeout: float = 10.0) -> tuple[int, int]:
        """The first offset of the partition and its end for a read_committed reader (the last
        stable offset: ops of an open transaction are not there yet)."""
        probe = TopicPartition(self._tp.topic, self._tp.partition, OFFSET_END)
        return retry_kafka(
            lambda: self._consumer.get_watermark_offsets(probe, timeout, cached=False)
        )

    def position(self) -> int:
        """The offset this reader reads next (past control records of transactions too)."""
        return self._consumer.position([self._tp])[0].offset

    def poll(self, timeout: float = 1.0, max_messages: int = 500) -> list[MemoryUpdate]:
        """The cube's new updates that arrived within ``timeout`` seconds (maybe none); ops of
        other cubes on the partition, duplicates and undecodable messages are skipped."""
        updates = []
        for msg in self._consumer.consume(max_messages, timeout):
            if msg.error() is not None:
                raise_if_fatal(msg.error())
                continue
            event = self._ops.event(msg)  # the follower's map and poison policy
            if event is None:
                continue
            update = update_of(event.value, msg.partition(), msg.offset(), msg.timestamp()[1])
            if self.dedup.fresh(update.raw):
                updates.append(update)
        return updates

    def commit(self, next_offset: int, asynchronous: bool = False) -> None:
        """Commit the group's position: the offset after the last update handed out."""
        if next_offset <= self._committed:
            return
        tp = TopicPartition(self._tp.topic, self._tp.partition, next_offset)
        self._consumer.commit(offsets=[tp], asynchronous=asynchronous)
        self._committed = next_offset

    def close(self) -> None:
        self._consumer.close()


def recent_updates(
    cube_id: str,
    settings: Settings | None = None,
    limit: int = 50,
    scan: int = 10_000,
    timeout: float = 10.0,
) -> list[MemoryUpdate]:
    """The cube's last ``limit`` updates among the last ``scan`` messages of its partition
    (which it shares with other cubes), oldest first: a snapshot, where a subscription is a
    stream. Bounded by ``scan`` so a quiet cube on a busy partition costs a fixed read."""
    settings = settings or Settings()
    probe = CubeReader(cube_id, f"{settings.topic_prefix}recent.{uuid.uuid4().hex}", settings)
    try:
        low, end = probe.watermarks(timeout)
    finally:
        probe.close()
    if end <= low:
        return []
    reader = CubeReader(
        cube_id, f"{settings.topic_prefix}recent.{uuid.uuid4().hex}", settings,
        since=max(low, end - scan),
    )  # fmt: skip
    found: list[MemoryUpdate] = []
    deadline = time.monotonic() + timeout
    try:
        while reader.position() < end and time.monotonic() < deadline:
            found.extend(reader.poll(0.2))
            found = found[-limit:]
    finally:
        reader.close()
    return found

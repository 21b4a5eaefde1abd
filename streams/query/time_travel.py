"""Time travel: the memories as they were at a point of the log, folded from the log itself.

The views hold only the present; the log holds every past. "As of T" means what memstream had
recorded by T (transaction time): the fold of each partition's ops up to the first op appended
after T, found with the broker's time index (``offsets_for_times``), or up to a given offset.
Each memory then has the version it had at that point; when a fact *was true* (valid time) is
the separate ``valid_from``/``valid_to`` of each memory, which search filters with
``since``/``until``. The fold starts from the newest fold snapshot before the point, so the
cost is the tail after it, not the whole log. ``memstream replay --until``, ``cube show
--as-of`` and the API's ``as_of`` all use :func:`fold_until`, so they agree by construction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Consumer, TopicPartition

from processors.fold import Memory, MemoryTable
from schemas import Codec
from schemas.limits import check_offset, check_time, cut_utf8
from streams.runtime.generations import Generation
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings
from streams.transport.follower import OpReader, fold_partitions
from streams.transport.topics import MEMORY_OPS, partition_for, retry_kafka

Point = datetime | int


def parse_point(value: str) -> Point:
    """``"1234"`` is an offset; anything else an ISO 8601 time (UTC unless it says).

    ``ValueError`` for anything else, an offset outside Kafka's (0 .. 2^63-1) or a time outside
    the stores' range (:data:`~schemas.limits.EARLIEST_TIME` .. ``LATEST_TIME``)."""
    text = value.strip()
    if text.isascii() and text.isdigit():
        return check_offset("offset", int(text))
    shown = repr(cut_utf8(value, 64)) + ("..." if len(value) > 64 else "")
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{shown} is neither an offset nor an ISO 8601 time") from exc
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return check_time("time", at)


@dataclass(frozen=True)
class PastView:
    """The fold as of ``offsets`` (per partition: the first offset not included)."""

    memories: list[Memory]
    offsets: dict[int, int]

    def in_cube(self, cube_id: str) -> list[Memory]:
        return [m for m in self.memories if m.cube_id == cube_id]


def offsets_at(settings: Settings, partitions: Iterable[int], at: Point) -> dict[int, int]:
    """Per partition, the first offset of ``memory-ops`` past the point (an offset is taken as
    is, a time is looked up in the broker's time index: ops appended at or before it count)."""
    topic = settings.topic(MEMORY_OPS.name)
    partitions = sorted(set(partitions))
    probe = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "time-travel"})
    try:
        highs = {p: retry_kafka(lambda p=p: probe.get_watermark_offsets(
            TopicPartition(topic, p), 30))[1] for p in partitions}  # fmt: skip
        if isinstance(at, int):
            return {p: min(max(at, 0), highs[p]) for p in partitions}
        ms = int(at.timestamp() * 1000) + 1  # the first op strictly after ``at``
        found = retry_kafka(
            lambda: probe.offsets_for_times([TopicPartition(topic, p, ms) for p in partitions], 30)
        )
        return {tp.partition: highs[tp.partition] if tp.offset < 0 else tp.offset for tp in found}
    finally:
        probe.close()


def fold_until(
    settings: Settings,
    snapshots: SnapshotStore | None,
    at: Point,
    generation: Generation | None = None,
    cube_id: str | None = None,
    codec: Codec | None = None,
) -> PastView:
    """The fold of ``generation``'s ops up to ``at``: of one cube (its partition only), or of
    every cube, through the follower (poison ops are skipped; the views dead-letter them)."""
    generation = generation or Generation()
    codec = codec or Codec()
    topic = settings.topic(MEMORY_OPS.name)
    partitions = (
        [partition_for(cube_id, settings.partitions)]
        if cube_id is not None
        else list(range(settings.partitions))
    )
    offsets = offsets_at(settings, partitions, at)
    tables = {p: MemoryTable() for p in partitions}
    starts = {}
    for p in partitions:
        snapshot = (
            snapshots.latest(generation.snapshot_key(topic), p, at_most=offsets[p])
            if snapshots is not None
            else None
        )
        starts[p] = 0
        if snapshot is not None:
            tables[p].load(m for m in snapshot.states if cube_id is None or m.cube_id == cube_id)
            starts[p] = snapshot.next_offset

    ops = OpReader(settings, codec, generation=generation.ops, cube=cube_id)
    fold_partitions(settings, ops, starts, tables, until=offsets)
    memories = [m for t in tables.values() for m in t.memories.values()]
    if cube_id is not None:
        memories = [m for m in memories if m.cube_id == cube_id]
    memories.sort(key=lambda m: (m.cube_id, m.memory_id))
    return PastView(memories, offsets)


class TimeTravel:
    """:func:`fold_until` for one cube, with the last few folds kept: a past point's fold
    never changes (keyed by the offset it resolved to), so repeated questions are free."""

    def __init__(
        self,
        settings: Settings,
        snapshots: SnapshotStore | None,
        codec: Codec | None = None,
        keep: int = 16,
    ) -> None:
        self.settings = settings
        self.snapshots = snapshots
        self.codec = codec or Codec()
        self.keep = keep
        self._cache: OrderedDict[tuple[str, int, int], PastView] = OrderedDict()
        self._lock = threading.Lock()

    def cube(self, cube_id: str, at: Point, generation: Generation) -> PastView:
        p = partition_for(cube_id, self.settings.partitions)
        offset = offsets_at(self.settings, [p], at)[p]
        key = (cube_id, generation.ops, offset)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        view = fold_until(self.settings, self.snapshots, offset, generation, cube_id, self.codec)
        with self._lock:
            self._cache[key] = view
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return view

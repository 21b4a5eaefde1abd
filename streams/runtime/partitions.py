"""Restoring a partition's fold: its latest snapshot, then the log's tail through the follower
(:mod:`streams.transport.follower`). How a worker catches its fold up for a partition it was
just given, before it handles anything on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Message

from processors.fold import Memory
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings
from streams.transport.follower import CaughtUp, read_partition, read_partitions


@dataclass(frozen=True)
class Restored:
    """How a partition's fold was rebuilt: from which snapshot offset (0: none), the tail."""

    snapshot_offset: int
    snapshot_states: int
    tail: CaughtUp


def restore_partitions(
    settings: Settings,
    snapshots: SnapshotStore | None,
    topic: str,
    partitions: list[int],
    load: Callable[[list[Memory]], None],
    handle: Callable[[Message], None],
    snapshot_key: str | None = None,
) -> dict[int, Restored]:
    """:func:`restore_partition` for several partitions: their snapshots (kept under
    ``snapshot_key``, the topic by default), then one read of all their tails together."""
    starts, found = {}, {}
    for p in partitions:
        snapshot = snapshots.latest(snapshot_key or topic, p) if snapshots is not None else None
        if snapshot is not None:
            load(snapshot.states)
        starts[p] = snapshot.next_offset if snapshot else 0
        found[p] = len(snapshot.states) if snapshot else 0
    tails = read_partitions(settings, topic, starts, handle)
    return {p: Restored(starts[p], found[p], tails[p]) for p in partitions}


def restore_partition(
    settings: Settings,
    snapshots: SnapshotStore | None,
    topic: str,
    partition: int,
    load: Callable[[list[Memory]], None],
    handle: Callable[[Message], None],
) -> Restored:
    """Rebuild a partition's fold: the latest snapshot (if any) handed to ``load``, then every
    later op of the log handed to ``handle``. What a worker does on a newly assigned partition,
    and what bounds its restart time."""
    snapshot = snapshots.latest(topic, partition) if snapshots is not None else None
    start = 0
    if snapshot is not None:
        load(snapshot.states)
        start = snapshot.next_offset
    tail = read_partition(settings, topic, partition, start, handle)
    return Restored(start, len(snapshot.states) if snapshot else 0, tail)

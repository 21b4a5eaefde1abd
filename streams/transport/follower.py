"""The one log follower: how everything that re-reads ``memory-ops`` reads it.

The writer's catch-up, the views, time travel, replay's comparison, cube export, subscriptions
and the benchmarks all read ops from a position (offset 0, a snapshot's offset, a time's offset)
with the same three steps, after the eventsourcing library's follower:

- **pull** (:func:`read_partitions`): committed transactions only, each partition in order, from
  its start up to the end of the log as it was when the read began (or an ``until`` offset);
- **map** (:class:`OpReader`): decode the op with the codec, keep the ops of the cube and the ops
  generation asked for;
- **policy** (:meth:`OpReader.poison`): an op that cannot be decoded, or that the fold cannot
  apply, is dead-lettered with its reason when the reader has a dead-letter producer (the views
  do: one record per bad message, keyed by its coordinates, so a second reader that records it
  too changes nothing), and counted and logged otherwise; either way the partition carries on.
  An op ahead of a version gap waits in the fold (:class:`processors.fold.MemoryTable`) for a
  bounded number of ops, then goes the same way; it never blocks snapshots or the ops after it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from processors.fold import FoldError, Memory, MemoryTable, Rejected
from schemas import Codec, DecodeError
from streams.settings import Settings
from streams.transport.consumer import Event, dead_letter_bytes, raise_if_fatal
from streams.transport.producer import EventProducer
from streams.transport.topics import MEMORY_OPS, retry_kafka

log = logging.getLogger("memstream.follower")


@dataclass(frozen=True)
class CaughtUp:
    """Where a read ended: the next offset to read and how many messages it handed over."""

    next_offset: int
    messages: int
    seconds: float


def read_partition(
    settings: Settings,
    topic: str,
    partition: int,
    start: int,
    handle: Callable[[Message], None],
) -> CaughtUp:
    """Hand every committed message of ``topic``/``partition`` from ``start`` up to the end of
    the log (as it is when the call begins) to ``handle``, in order."""
    return read_partitions(settings, topic, {partition: start}, handle)[partition]


def read_partitions(
    settings: Settings,
    topic: str,
    starts: dict[int, int],
    handle: Callable[[Message], None],
    batch: int = 5000,
    until: dict[int, int] | None = None,
) -> dict[int, CaughtUp]:
    """:func:`read_partition` for several partitions at once, with one consumer (each
    partition's messages in order; a worker given six partitions fetches them together).
    ``until`` stops a partition before that offset instead (time travel: the log as it was).

    "The end" is the last stable offset: this consumer reads committed transactions only, so an
    op of a transaction still open (a writer that died mid-batch, aborted when its transaction
    times out) is neither handed over nor waited for."""
    began = time.monotonic()
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": settings.group(f"catch-up-{uuid.uuid4().hex[:8]}"),
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
        }
    )
    try:
        ends = {
            p: retry_kafka(
                lambda p=p: consumer.get_watermark_offsets(TopicPartition(topic, p), 30)
            )[1]
            for p in starts
        }
        for p, stop in (until or {}).items():
            ends[p] = min(ends[p], stop)
        positions = {p: max(start, 0) for p, start in starts.items()}
        counts = dict.fromkeys(starts, 0)
        todo = {p for p in starts if ends[p] > positions[p]}
        if todo:
            consumer.assign([TopicPartition(topic, p, positions[p] or OFFSET_BEGINNING)
                             for p in sorted(todo)])  # fmt: skip
        while todo:
            for msg in consumer.consume(batch, 0.2):
                p = msg.partition()
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        todo.discard(p)  # at the last stable offset: nothing more to read
                    else:
                        raise_if_fatal(msg.error())
                    continue
                if p not in todo or msg.offset() >= ends[p]:
                    todo.discard(p)
                    continue
                handle(msg)
                counts[p] += 1
                if msg.offset() + 1 >= ends[p]:
                    todo.discard(p)
            # The fetch position steps over transaction markers, unlike last offset + 1.
            for tp in consumer.position([TopicPartition(topic, p) for p in starts]):
                if tp.offset >= 0:
                    positions[tp.partition] = min(
                        max(positions[tp.partition], tp.offset), ends[tp.partition]
                    )
                    if tp.offset >= ends[tp.partition]:
                        todo.discard(tp.partition)
        seconds = time.monotonic() - began
        return {p: CaughtUp(positions[p], counts[p], seconds) for p in starts}
    finally:
        consumer.close()


class Fold(Protocol):
    """What the follower folds into: a :class:`MemoryTable`, or a fold that keeps indexes
    beside one (the writer's :class:`processors.fusion.CubeMemories`)."""

    @property
    def rejected(self) -> deque[Rejected]: ...

    def apply(self, op: dict[str, Any], position: int | None = None) -> list[Memory]: ...


class OpReader:
    """The map and the policy of the follower for ``memory-ops``: one instance per reader.

    ``generation`` keeps the ops of one extraction (``None``: all of them), ``cube`` the ops of
    one cube (its partition holds others too). ``dead_letters`` makes the poison policy record
    what it skips (the views); without it the reader counts and logs (everyone else: the views
    of the same log record it once).
    """

    def __init__(
        self,
        settings: Settings,
        codec: Codec | None = None,
        *,
        generation: int | None = None,
        cube: str | None = None,
        dead_letters: EventProducer | None = None,
        worker: str = "",
    ) -> None:
        self.settings = settings
        self.codec = codec or Codec()
        self.generation = generation
        self.cube = cube
        self._key = cube.encode() if cube is not None else None
        self.dead_letters = dead_letters
        self.worker = worker
        self.topic = settings.topic(MEMORY_OPS.name)
        self.poisoned = 0
        self.other_generation = 0

    def event(self, msg: Message) -> Event | None:
        """The op of ``msg`` as an event, or None: another cube's, another generation's, or
        poison (handled by the policy)."""
        if self._key is not None and msg.key() != self._key:
            return None
        try:
            decoded = self.codec.decode(msg.value(), reader=MEMORY_OPS.record)
        except DecodeError as exc:
            self.poison(msg, "DecodeError", exc.reason)
            return None
        op = decoded.record
        if self.cube is not None and op["cube_id"] != self.cube:
            return None
        if self.generation is not None and op.get("generation", 0) != self.generation:
            self.other_generation += 1
            return None
        return Event(msg.topic(), msg.partition(), msg.offset(), msg.key(), decoded.name,
                     decoded.writer_version, op, msg.timestamp()[1])  # fmt: skip

    def fold(self, table: Fold, msg: Message) -> tuple[Event, list[Memory]] | None:
        """Map ``msg`` and fold its op into ``table``: the event and the states it changed, or
        None when it was not ours or was poison. Ops the table held back and then refused go
        to the policy too."""
        event = self.event(msg)
        if event is None:
            return None
        try:
            changed = table.apply(event.value, msg.offset())
        except FoldError as exc:
            self.poison(msg, "FoldError", str(exc))
            return None
        self.rejected(table, msg.partition())
        return event, changed

    def rejected(self, table: Fold, partition: int) -> None:
        """Hand the ops ``table`` held back and then refused to the policy."""
        while table.rejected:
            self.poison_op(partition, table.rejected.popleft())

    def poison(self, msg: Message, kind: str, reason: str) -> None:
        """The policy for a message that cannot be decoded or applied."""
        self._poison(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), kind,
                     reason)  # fmt: skip

    def poison_op(self, partition: int, rejected: Rejected) -> None:
        """The policy for an op held back by a version gap and then refused (re-encoded: its
        bytes were read long before)."""
        op = rejected.op
        offset = -1 if rejected.position is None else rejected.position
        self._poison(self.topic, partition, offset, op["cube_id"].encode(),
                     self.codec.encode(MEMORY_OPS.record, op), "VersionGap",
                     rejected.reason)  # fmt: skip

    def _poison(self, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, kind: str, reason: str) -> None:  # fmt: skip
        self.poisoned += 1
        log.warning("%s op at %s/%d@%d: %s", "dead-lettering" if self.dead_letters else
                    "skipping", topic, partition, offset, reason)  # fmt: skip
        if self.dead_letters is not None:
            dead_letter_bytes(self.dead_letters, self.settings, topic=topic, partition=partition,
                              offset=offset, key=key, value=value, error_type=kind,
                              reason=reason, worker=self.worker)  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return {"poisoned": self.poisoned, "other_generation": self.other_generation}


def fold_partitions(
    settings: Settings,
    reader: OpReader,
    starts: dict[int, int],
    tables: dict[int, MemoryTable],
    until: dict[int, int] | None = None,
) -> dict[int, CaughtUp]:
    """Fold each partition's ops from its start into its table (the follower's whole loop, for
    readers that only fold: time travel, the benchmarks)."""

    def handle(msg: Message) -> None:
        reader.fold(tables[msg.partition()], msg)

    done = read_partitions(settings, reader.topic, starts, handle, until=until)
    for p, table in tables.items():  # what still waits for a gap at the end of the read
        if table.pending:
            table.release_pending("the read ended before the missing version")
        reader.rejected(table, p)
    return done

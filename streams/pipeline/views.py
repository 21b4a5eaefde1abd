"""The views: memory-ops folded into the plaintext view (Milvus), the vault (MinIO), the audit
tables (ClickHouse) and the search working set, for the partitions this worker owns.

It consumes ``memory-ops`` in the ``views`` group. On assignment it starts each new partition's
fold from the latest fold snapshot (or offset 0) and reads from there: ops before the group's
committed offset are folded only (the stores have them), later ones are written too. Poison ops
(undecodable, refused by the fold, held back by a version gap that is never filled, or refused by
a store) go to the dead-letter topic with their coordinates and reason, and the partition
carries on. The stores follow the sink contract (:mod:`sinks.contract`): a position is committed
only once every sink has written (or dead-lettered) every op before it, so a store that fails
mid-batch leaves the batch to be written again. Every ``snapshot_every`` ops of a partition it
writes a fold snapshot, which bounds the restart time of every worker (readers included).

Each instance builds one view generation (:mod:`streams.runtime.generations`): its own consumer
group, collection and ops table, and it folds only the ops of that generation's extraction. A
replay is a second instance, for the next generation, that starts from offset 0 in its new group
beside the live one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    Message,
    TopicPartition,
)

from processors.fold import Memory, MemoryTable
from schemas import Codec
from sinks.contract import Batch, Refused
from streams.pipeline.build import Stores
from streams.runtime.generations import Generation
from streams.runtime.processor import Processor
from streams.runtime.snapshots import SnapshotStore, states_of
from streams.settings import Settings
from streams.transport.consumer import Event, raise_if_fatal
from streams.transport.follower import OpReader
from streams.transport.producer import EventProducer
from streams.transport.topics import MEMORY_OPS, partition_for, retry_kafka

log = logging.getLogger("memstream.views")


class ViewsProcessor(Processor):
    """memory-ops -> Milvus, MinIO vault, ClickHouse memory_ops, the search working set."""

    name = "views"
    inputs = ("memory-ops",)
    outputs = ("milvus:memories", "minio:vault", "clickhouse:memory_ops", "working-set")
    state = "the fold of its partitions (one table each), their write and snapshot offsets"

    def __init__(
        self,
        settings: Settings,
        stores: Stores,
        snapshots: SnapshotStore,
        codec: Codec | None = None,
    ) -> None:
        self.settings = settings
        self.stores = stores
        self.generation: Generation = stores.generation
        self.snapshots = snapshots
        self.codec = codec or Codec()
        self.folds: dict[int, MemoryTable] = {}
        self.write_from: dict[int, int] = {}
        self.ends: dict[int, int] = {}
        self.highs: dict[int, int] = {}
        self.positions: dict[int, int] = {}
        self.done: dict[int, int] = {}
        # Ops held back by a version gap: recorded in the stores only once they apply.
        self._held: dict[str, tuple[Event, Message]] = {}
        self.since_snapshot: dict[int, int] = {}
        self.folded: dict[int, int] = {}
        self._revoked: set[int] = set()
        self._assigned_once = False
        self._snapshotting: threading.Thread | None = None
        self._busy_at = time.monotonic()
        self.counters = {"ops_folded": 0, "ops_written": 0, "snapshots": 0, "snapshot_loads": 0,
                         "milvus_flushes": 0, "refused_rows": 0}  # fmt: skip

    def owns(self, cube_id: str) -> bool:
        """Whether this worker follows the cube's ops (its partition is assigned here)."""
        return partition_for(cube_id, self.settings.partitions) in self.folds

    def open(self) -> None:
        s = self.settings
        # With N views workers a search may ask for a cube another one owns: it is read from
        # the store each time, never kept (this worker would not see its changes).
        self.stores.searcher.working_set.retain = self.owns
        self.topic = s.topic(MEMORY_OPS.name)
        self.snapshot_key = self.generation.snapshot_key(self.topic)
        self._dlq = EventProducer(s, self.codec)
        self._ops = OpReader(s, self.codec, generation=self.generation.ops,
                             dead_letters=self._dlq, worker=f"views/{s.worker_id}")  # fmt: skip
        self._consumer = Consumer(
            {
                "bootstrap.servers": s.kafka_bootstrap,
                "group.id": self.generation.views_group(s),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "session.timeout.ms": s.session_timeout_ms,
                "heartbeat.interval.ms": max(500, s.session_timeout_ms // 5),
                "max.poll.interval.ms": 600_000,
            }
        )
        self._consumer.subscribe(
            [self.topic], on_assign=self._assigned, on_revoke=self._revoked_cb, on_lost=self._lost
        )

    def close(self) -> None:
        if self._snapshotting is not None:
            self._snapshotting.join(120)
        if getattr(self, "_consumer", None) is not None:
            self._consumer.close()
        if getattr(self, "_dlq", None) is not None:
            self._dlq.close()

    def ready(self) -> bool:
        return self._assigned_once and all(
            self.positions.get(p, 0) >= end for p, end in self.ends.items()
        )

    def caught_up(self) -> bool:
        """At the end of every owned partition as of the last step (a generation may switch)."""
        return self.ready() and all(
            self.positions.get(p, 0) >= self.highs.get(p, 0) for p in self.folds
        )

    def stats(self) -> dict[str, Any]:
        ops = getattr(self, "_ops", None)
        return {**self.counters, "partitions": sorted(self.folds),
                "dead_lettered": ops.poisoned if ops else 0,
                "other_generation": ops.other_generation if ops else 0,
                "memories": sum(len(t.memories) for t in self.folds.values()),
                "generation": self.generation.id, "ops_generation": self.generation.ops,
                "offset": sum(self.positions.values()),
                "end_offset": sum(max(self.highs.get(p, 0), self.ends.get(p, 0))
                                  for p in self.folds)}  # fmt: skip

    def get(self, memory_id: str) -> Memory | None:
        """A memory's folded state, whatever its status (the API's memory lookup)."""
        for table in list(self.folds.values()):
            found = table.get(memory_id)
            if found is not None:
                return found
        return None

    # partitions --------------------------------------------------------------------------------

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        now = {tp.partition for tp in partitions}
        self._forget((set(self.folds) | self._revoked) - now)
        committed = {tp.partition: tp.offset
                     for tp in retry_kafka(lambda: consumer.committed(partitions, 30))}  # fmt: skip
        starts = []
        for tp in partitions:
            p = tp.partition
            done = max(committed.get(p, -1), 0)
            _, end = retry_kafka(
                lambda p=p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), 30)
            )
            self.ends[p] = end
            if p in self.folds:  # kept across the rebalance: resume where it was committed
                starts.append(TopicPartition(self.topic, p, done if done > 0 else OFFSET_BEGINNING))
                self.positions[p] = done
                continue
            table = self.folds[p] = MemoryTable()
            self.write_from[p] = done
            self.since_snapshot[p] = 0
            self.folded[p] = 0
            snapshot = self.snapshots.latest(self.snapshot_key, p, at_most=done)
            start = 0
            if snapshot is not None:
                table.load(snapshot.states)
                self.stores.searcher.apply(snapshot.states)
                self.folded[p] = snapshot.ops_folded
                self.counters["snapshot_loads"] += 1
                start = snapshot.next_offset
            self.positions[p] = start
            starts.append(TopicPartition(self.topic, p, start if start > 0 else OFFSET_BEGINNING))
            log.info("views: partition %d from offset %d (writes from %d, end %d)", p, start,
                     done, end)  # fmt: skip
        consumer.assign(starts)
        self._revoked = set()
        self._assigned_once = True

    def _revoked_cb(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._flush()
        self._revoked |= {tp.partition for tp in partitions}

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget({tp.partition for tp in partitions})

    def _forget(self, partitions: set[int]) -> None:
        if not partitions:
            return
        n = self.settings.partitions
        for p in partitions:
            self.folds.pop(p, None)
            for d in (self.write_from, self.ends, self.highs, self.positions, self.done,
                      self.since_snapshot, self.folded):  # fmt: skip
                d.pop(p, None)
        # The working set keeps what was searchable; a cube whose partition moved is read back
        # from the store on its next search instead of going stale here.
        self.stores.searcher.working_set.release(lambda cube: partition_for(cube, n) in partitions)
        log.info("views: forgot partitions %s", sorted(partitions))

    # the loop ----------------------------------------------------------------------------------

    def step(self) -> None:
        first = self._consumer.poll(0.2)
        if first is None:
            self._mark_done()  # the fetch position may have stepped over transaction markers
            if time.monotonic() - self._busy_at >= self.settings.views_quiet_flush_s:
                self._release_gaps()
                self._flush()  # commits too
            else:
                self._commit()
            return
        self._busy_at = time.monotonic()
        messages = [first, *self._consumer.consume(1999, 0)]
        to_write: list[Event] = []
        raw: dict[tuple[int, int], Message] = {}
        changed: dict[str, Memory] = {}
        for msg in messages:
            if msg.error() is not None:
                raise_if_fatal(msg.error())
                continue
            p = msg.partition()
            table = self.folds.get(p)
            if table is None:
                continue  # revoked while fetched
            folded = self._ops.fold(table, msg)  # poison: dead-lettered, the partition goes on
            if folded is None:
                continue
            event, states = folded
            self.counters["ops_folded"] += 1
            self.folded[p] = self.folded.get(p, 0) + 1
            self.since_snapshot[p] = self.since_snapshot.get(p, 0) + 1
            if msg.offset() < self.write_from.get(p, 0):
                applied = []
            elif table.holds(event.value):
                self._held[event.value["event_id"]] = (event, msg)
                applied = []
            else:
                applied = [(event, msg)]
            for state in states:
                changed[state.memory_id] = state
                if state.last_event_id in self._held:  # a held op applied with this one
                    applied.append(self._held.pop(state.last_event_id))
            for e, m in applied:
                to_write.append(e)
                raw[(e.partition, e.offset)] = m
        self._held = {k: v for k, v in self._held.items() if self._holds(v[0])}
        states = list(changed.values())
        if to_write:
            touched = {e.value["memory_id"] for e in to_write}
            batch = Batch(to_write, [m for m in states if m.memory_id in touched])
            self._refused(self._write(batch), batch, raw)
            self.counters["ops_written"] += len(to_write)
        # Every folded state goes to the working set, replayed ones too (it is built from the
        # fold); the stores get those of ops not yet written.
        self.stores.searcher.apply(states)
        self._mark_done()
        self._commit()
        self._maybe_snapshot()

    def _holds(self, event: Event) -> bool:
        """Whether the op still waits for a gap (not applied, not refused, partition kept)."""
        table = self.folds.get(event.partition)
        return table is not None and table.holds(event.value)

    def _write(self, batch: Batch) -> list[Refused]:
        """Every sink writes the batch (an exception here leaves the position uncommitted)."""
        stores = self.stores
        refused: list[Refused] = []
        with stores.milvus_lock:
            refused += stores.milvus.write(batch)
        refused += stores.vault.write(batch)  # MinIO's client is thread-safe
        with stores.clickhouse_lock:
            refused += stores.clickhouse.write(batch)
        return refused

    def _refused(
        self, refused: list[Refused], batch: Batch, raw: dict[tuple[int, int], Message]
    ) -> None:
        """Dead-letter the ops behind each refused row: the op itself (an audit row), or every
        op of the batch on the memory (a state row)."""
        for r in refused:
            log.warning("views: %s refused %s: %s", r.sink, r.key, r.reason)
            self.counters["refused_rows"] += 1
            for e in batch.ops:
                if r.key in (e.value["event_id"], e.value["memory_id"]):
                    msg = raw[(e.partition, e.offset)]
                    self._ops.poison(msg, "Refused", f"{r.sink} refused the row: {r.reason}")

    def _release_gaps(self) -> None:
        """The log went quiet with ops still waiting for a version: they wait no longer."""
        for p, table in list(self.folds.items()):
            if table.pending:
                table.release_pending("the log went quiet before the missing version arrived")
                self._ops.rejected(table, p)

    def _mark_done(self) -> None:
        """Take the fetch position of every owned partition as done: called only once every
        message before it was folded and written by every sink, or dead-lettered. (The fetch
        position steps over transaction markers, unlike last offset + 1.)"""
        assignment = [TopicPartition(self.topic, p) for p in self.folds]
        if not assignment:
            return
        for tp in self._consumer.position(assignment):
            if tp.offset >= 0 and tp.partition in self.folds:
                self.done[tp.partition] = max(self.done.get(tp.partition, 0), tp.offset)
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                self.highs[tp.partition] = high

    def _commit(self) -> None:
        """Commit what :meth:`_mark_done` took as done, never the fetch position itself: a
        step that failed half-way (a store down) leaves its batch to be read again, also when
        the consumer's close revokes the partitions on the way out."""
        moved = [
            TopicPartition(self.topic, p, offset)
            for p, offset in self.done.items()
            if p in self.folds and offset > self.positions.get(p, 0)
        ]
        if moved:
            self._consumer.commit(offsets=moved, asynchronous=False)
            for tp in moved:
                self.positions[tp.partition] = tp.offset
                self.write_from[tp.partition] = max(self.write_from.get(tp.partition, 0), tp.offset)

    def _flush(self) -> None:
        """When the log goes quiet (or partitions leave), seal what Milvus holds in memory."""
        self._commit()
        if self.stores.milvus.unflushed:
            with self.stores.milvus_lock:
                self.stores.milvus.flush()
            self.counters["milvus_flushes"] += 1

    def _maybe_snapshot(self) -> None:
        if self._snapshotting is not None and self._snapshotting.is_alive():
            return
        due = [p for p, n in self.since_snapshot.items()
               if n >= self.settings.snapshot_every and not self.folds[p].pending]  # fmt: skip
        if not due:
            return
        p = due[0]
        states, offset, folded = (
            states_of(self.folds[p].memories.values()),
            self.positions[p],
            self.folded[p],
        )
        self.since_snapshot[p] = 0

        def write() -> None:
            try:
                name = self.snapshots.save(self.snapshot_key, p, offset, folded, states)
                self.counters["snapshots"] += 1
                log.info("views: snapshot %s (%d memories)", name, len(states))
            except Exception:
                log.exception("views: snapshot of partition %d failed (the log still has it)", p)

        self._snapshotting = threading.Thread(target=write, name=f"snapshot-{p}", daemon=True)
        self._snapshotting.start()

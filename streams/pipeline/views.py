"""The views: memory-ops folded into the plaintext view (Milvus), the vault (MinIO), the audit
tables (ClickHouse) and the search working set, for the partitions this worker owns.

It consumes ``memory-ops`` in the ``views`` group. On assignment it starts each new partition's
fold from the latest fold snapshot (or offset 0) and reads from there: ops before the group's
committed offset are folded only (the stores have them), later ones are written too. Poison ops
(undecodable, or refused by the fold) go to the dead-letter topic with their coordinates and the
fold carries on. Every ``snapshot_every`` ops of a partition it writes a fold snapshot, which
bounds the restart time of every worker (readers included).

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

from processors.fold import FoldError, Memory, MemoryTable
from schemas import Codec, DecodeError
from streams.pipeline.build import Stores
from streams.runtime.generations import Generation
from streams.runtime.processor import Processor
from streams.runtime.snapshots import SnapshotStore, states_of
from streams.settings import Settings
from streams.transport.consumer import Event, dead_letter, raise_if_fatal
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
        self.since_snapshot: dict[int, int] = {}
        self.folded: dict[int, int] = {}
        self._revoked: set[int] = set()
        self._assigned_once = False
        self._snapshotting: threading.Thread | None = None
        self._busy_at = time.monotonic()
        self.counters = {"ops_folded": 0, "ops_written": 0, "dead_lettered": 0, "snapshots": 0,
                         "snapshot_loads": 0, "other_generation": 0,
                         "milvus_flushes": 0}  # fmt: skip

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
        return {**self.counters, "partitions": sorted(self.folds),
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
            for d in (self.write_from, self.ends, self.highs, self.positions,
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
            if time.monotonic() - self._busy_at >= self.settings.views_quiet_flush_s:
                self._flush()  # commits too
            else:
                self._commit()
            return
        self._busy_at = time.monotonic()
        messages = [first, *self._consumer.consume(1999, 0)]
        to_write: list[Event] = []
        changed: dict[str, Memory] = {}
        for msg in messages:
            if msg.error() is not None:
                raise_if_fatal(msg.error())
                continue
            p = msg.partition()
            table = self.folds.get(p)
            if table is None:
                continue  # revoked while fetched
            event = self._decode(msg)
            if event is None:
                continue
            if event.value.get("generation", 0) != self.generation.ops:
                self.counters["other_generation"] += 1  # another extraction's view has it
                continue
            try:
                for state in table.apply(event.value):
                    changed[state.memory_id] = state
            except FoldError as exc:
                self._dead_letter(msg, "FoldError", str(exc))
                continue
            self.counters["ops_folded"] += 1
            self.folded[p] = self.folded.get(p, 0) + 1
            self.since_snapshot[p] = self.since_snapshot.get(p, 0) + 1
            if msg.offset() >= self.write_from.get(p, 0):
                to_write.append(event)
        states = list(changed.values())
        if to_write:
            touched = {e.value["memory_id"] for e in to_write}
            with self.stores.lock:
                self.stores.milvus.write([m for m in states if m.memory_id in touched])
                self.stores.vault.write([m for m in states if m.memory_id in touched])
                self.stores.clickhouse.write_ops(to_write)
            self.counters["ops_written"] += len(to_write)
        # Every folded state goes to the working set, replayed ones too (it is built from the
        # fold); the stores get those of ops not yet written.
        self.stores.searcher.apply(states)
        self._commit()
        self._maybe_snapshot()

    def _decode(self, msg: Message) -> Event | None:
        try:
            decoded = self.codec.decode(msg.value(), reader=MEMORY_OPS.record)
        except DecodeError as exc:
            self._dead_letter(msg, "DecodeError", exc.reason)
            return None
        return Event(msg.topic(), msg.partition(), msg.offset(), msg.key(), decoded.name,
                     decoded.writer_version, decoded.record, msg.timestamp()[1])  # fmt: skip

    def _dead_letter(self, msg: Message, kind: str, reason: str) -> None:
        log.warning("dead-lettering op at %s/%d@%d: %s", msg.topic(), msg.partition(),
                    msg.offset(), reason)  # fmt: skip
        dead_letter(self._dlq, self.settings, msg, kind, reason, f"views/{self.settings.worker_id}")
        self.counters["dead_lettered"] += 1

    def _commit(self) -> None:
        """Commit the fetch position of every owned partition that moved (it steps over
        transaction markers, unlike last offset + 1)."""
        assignment = [TopicPartition(self.topic, p) for p in self.folds]
        if not assignment:
            return
        moved = []
        for tp in self._consumer.position(assignment):
            if tp.offset >= 0 and tp.offset > self.positions.get(tp.partition, 0):
                moved.append(TopicPartition(self.topic, tp.partition, tp.offset))
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                self.highs[tp.partition] = high
        if moved:
            self._consumer.commit(offsets=moved, asynchronous=False)
            for tp in moved:
                self.positions[tp.partition] = tp.offset
                self.write_from[tp.partition] = max(self.write_from.get(tp.partition, 0), tp.offset)

    def _flush(self) -> None:
        """When the log goes quiet (or partitions leave), seal what Milvus holds in memory."""
        self._commit()
        if self.stores.milvus.unflushed:
            with self.stores.lock:
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

"""The writer: MemReader over interactions and the commands of other processors, the one
component that assigns memory versions.

It consumes ``interactions`` and ``commands`` in the ``reader`` group with the range assignor, so
the same partition number of both topics (a cube's partition) goes to the same worker. It folds
only the cubes of the partitions it owns: on assignment it catches its fold up for each new
partition (the latest fold snapshot, then the tail of ``memory-ops`` up to the last stable
offset) before it handles any event of it, and it forgets a partition it lost. Each batch's ops,
command results and consumer offsets are one Kafka transaction: after a crash either all of them
are in the log or none is. A transaction that fails (the group moved on: this worker was fenced)
fails the processor; the host restarts it with a fold rebuilt from the log.

A batch's transaction commits in a thread of its own while the next batch is read, extracted and
embedded: the commit is mostly waiting on the broker (the ops' acks, the offsets, the markers),
time in which the cores would otherwise idle. Transactions still commit one at a time, in
order: a batch's transaction begins only once the one before it committed, and a failed commit
fails the processor before the next batch is published (the batch computed meanwhile, folded on
top of the failed one, is thrown away with the fold). A revocation waits for the commit in
flight, so a partition is handed over with its last batch committed.

Batches of interactions overlap one stage more: a batch is polled and extracted while the one
before it is still being embedded, and only then is that one fused and published (the embedder
is never left idle through a batch's single-threaded part: poll, decode, extraction, fusion).
A batch holding a command waits until every batch before it is fused (a command acts on the
fold as the interactions before it left it). With nothing new to read, the batch being embedded
is finished at once, so a light load waits for nothing. A revocation drops that batch: nothing
of it was folded or published, and its events are read again from the committed offsets.

Each instance writes one ops generation (:mod:`streams.runtime.generations`): its own group,
transactional id, memory ids and fold. ``memstream replay --reextract`` runs a second one, for
the next generation, from offset 0 of ``interactions`` beside the live one.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message, TopicPartition

from processors.commands import apply_command, result_record
from processors.embedder import Embedder
from processors.extract import Extractor
from processors.fold import FoldError
from processors.fusion import CubeMemories
from processors.ops import NAMESPACE
from processors.reader import Extracted, MemReader, Sourced
from schemas import Codec, DecodeError
from streams.runtime.generations import Generation
from streams.runtime.partitions import restore_partitions
from streams.runtime.processor import Processor
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings
from streams.transport.consumer import Event, EventConsumer, InvalidEvent
from streams.transport.producer import EventProducer
from streams.transport.topics import (
    COMMAND_RESULTS,
    COMMANDS,
    INTERACTIONS,
    MEMORY_OPS,
    partition_for,
)

log = logging.getLogger("memstream.reader")

#: A record of a batch's transaction: (topic, Avro record name, key, value).
Item = tuple[str, str, str, dict[str, Any]]


def interaction_validator(settings: Settings) -> Callable[[Event], None]:
    """Rules an event must meet before the writer takes it (else: dead-letter)."""
    commands_topic = settings.topic(COMMANDS.name)

    def validate(event: Event) -> None:
        value = event.value
        if not value["cube_id"].strip():
            raise InvalidEvent("missing cube_id")
        if event.topic == commands_topic:
            if partition_for(value["cube_id"], settings.partitions) != event.partition:
                raise InvalidEvent("command not keyed by its cube_id (wrong partition)")
            return
        if not value["speaker"].strip():
            raise InvalidEvent("missing speaker")
        if not value["content"].strip():
            raise InvalidEvent("empty content")
        size = len(value["content"].encode())
        if size > settings.max_event_bytes:
            raise InvalidEvent(
                f"content is {size} bytes, over the limit of {settings.max_event_bytes}"
            )

    return validate


@dataclass
class Embedding:
    """A batch whose texts are being embedded: its extraction, the consumer offsets past it (to
    commit with its ops) and how many interactions it holds."""

    extracted: Extracted
    offsets: list[TopicPartition]
    interactions: int


class ReaderProcessor(Processor):
    """interactions + commands -> memory-ops + command-results, exactly once in effect."""

    name = "reader"
    inputs = ("interactions", "commands")
    outputs = ("memory-ops", "command-results")
    state = "the fold of the cubes of its partitions, with fusion's vector and key indexes"

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        extractor: Extractor,
        snapshots: SnapshotStore,
        codec: Codec | None = None,
        generation: Generation | None = None,
    ) -> None:
        self.generation = generation or Generation()
        self.settings = settings
        self.codec = codec or Codec()
        self.embedder = embedder
        self.extractor = extractor
        self.snapshots = snapshots
        self.memories = CubeMemories(embedder.dim)
        own = self.generation.reader_settings(settings)
        self.reader = MemReader(
            extractor, embedder, self.memories, own.merge_threshold, self.generation.ops
        )
        self.owned: set[int] = set()
        self._revoked: set[int] = set()
        self._assigned_once = False
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="reader-commit")
        self._commit: Future[None] | None = None  # the transaction in flight
        self._embedding: Embedding | None = None  # the batch extracted, not yet fused
        #: Seconds the writer's thread spent polling and waiting for the previous commit.
        self.seconds = {"poll": 0.0, "commit_wait": 0.0}
        self.counters = {"interactions": 0, "commands": 0, "ops_emitted": 0,
                         "commands_rejected": 0, "catch_up_ops": 0, "catch_up_s": 0.0,
                         "poison_ops": 0}  # fmt: skip

    def open(self) -> None:
        s = self.settings
        self._ops_topic = s.topic(MEMORY_OPS.name)
        self._results_topic = s.topic(COMMAND_RESULTS.name)
        self._commands_topic = s.topic(COMMANDS.name)
        group = self.generation.reader_group(s)
        self._dlq = EventProducer(s, self.codec)
        self._transactions = EventProducer(
            s,
            self.codec,
            {
                "transactional.id": f"{group}-{s.worker_id}",
                "transaction.timeout.ms": s.transaction_timeout_ms,
            },
        )
        self._consumer = EventConsumer(
            [s.topic(INTERACTIONS.name), self._commands_topic],
            group,
            s,
            self.codec,
            validator=interaction_validator(s),
            dead_letters=self._dlq,
            commit_interval=float("inf"),
            config={
                # Range gives each member the same partition numbers of both topics.
                "partition.assignment.strategy": "range",
                "session.timeout.ms": s.session_timeout_ms,
                "heartbeat.interval.ms": max(500, s.session_timeout_ms // 5),
                "max.poll.interval.ms": 600_000,
                "isolation.level": "read_committed",
            },
            on_assign=self._assigned,
            on_revoke=self._revoked_cb,
            on_lost=self._lost,
        )

    def close(self) -> None:
        self._drop()  # not committed: the next owner reads its events again
        self._settle()  # its outcome no longer matters here: the next owner reads the log
        self._committer.shutdown()
        self.reader.close()
        for closer in (getattr(self, "_consumer", None), getattr(self, "_transactions", None),
                       getattr(self, "_dlq", None)):  # fmt: skip
            if closer is not None:
                closer.close()

    def ready(self) -> bool:
        return self._assigned_once

    def stats(self) -> dict[str, Any]:
        extra = {}
        if hasattr(self.extractor, "fallbacks"):  # the LLM extractor: interactions it could
            extra["llm_fallbacks"] = self.extractor.fallbacks  # not extract (rules instead)
        return {**self.counters, **extra, "partitions": sorted(self.owned),
                "memories": len(self.memories), "ops_generation": self.generation.ops,
                "reader_version": self.reader.version,
                "time_s": {k: round(v, 2) for k, v in {**self.seconds,
                                                       **self.reader.seconds}.items()}}  # fmt: skip

    # partitions --------------------------------------------------------------------------------

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        self._drop()
        self._settle()
        now = {tp.partition for tp in partitions}
        # Eager rebalancing revokes everything first; what comes back unchanged keeps its fold
        # (no other member can have owned it in between), the rest is forgotten.
        gone = (self.owned | self._revoked) - now
        if gone:
            self._forget(gone)
        if now - self.owned:
            self._catch_up(sorted(now - self.owned))
        self.owned = now
        self._revoked = set()
        self._assigned_once = True

    def _revoked_cb(self, partitions: list[TopicPartition]) -> None:
        self._drop()
        self._settle()
        revoked = {tp.partition for tp in partitions}
        self._revoked |= revoked & self.owned
        self.owned -= revoked

    def _lost(self, partitions: list[TopicPartition]) -> None:
        self._drop()
        self._settle()
        lost = {tp.partition for tp in partitions}
        self._forget(lost)
        self.owned -= lost

    def _forget(self, partitions: set[int]) -> None:
        n = self.settings.partitions
        dropped = self.memories.drop_cubes(lambda cube: partition_for(cube, n) in partitions)
        log.info("forgot partitions %s (%d memories)", sorted(partitions), dropped)

    def _catch_up(self, partitions: list[int]) -> None:
        """Fold the given partitions of memory-ops up to the end of the log."""
        began = time.monotonic()
        done = restore_partitions(self.settings, self.snapshots, self._ops_topic, partitions,
                                  self.memories.load, self._fold_logged,
                                  self.generation.snapshot_key(self._ops_topic))  # fmt: skip
        tail = sum(r.tail.messages for r in done.values())
        self.counters["catch_up_ops"] += tail
        self.counters["catch_up_s"] += time.monotonic() - began
        log.info("partitions %s caught up in %.2f s: %d ops from snapshots at %s", partitions,
                 time.monotonic() - began, tail,
                 {p: r.snapshot_offset for p, r in done.items()})  # fmt: skip

    def _fold_logged(self, msg: Message) -> None:
        """Fold one op of the log; a poison op is skipped here (the views processor records it
        in the dead-letter topic: one record per bad message)."""
        try:
            op = self.codec.decode(msg.value(), reader=MEMORY_OPS.record).record
            if op["generation"] == self.generation.ops:  # the fold of this extraction only
                self.memories.apply(op)
        except (DecodeError, FoldError) as exc:
            self.counters["poison_ops"] += 1
            log.warning("skipping op at %s/%d@%d: %s", msg.topic(), msg.partition(),
                        msg.offset(), exc)  # fmt: skip

    # the writer --------------------------------------------------------------------------------

    def step(self) -> None:
        if self._commit is not None and self._commit.done():
            self._committed()  # a failed commit fails the processor here, not one batch later
        began = time.perf_counter()
        # With a batch embedding, take only what is ready: nothing new means it is finished now.
        wait = 0.0 if self._embedding is not None else 0.2
        batch = self._consumer.poll_batch(self.settings.effective_reader_batch, wait)
        offsets = self._consumer.take_offsets()
        self.seconds["poll"] += time.perf_counter() - began
        # A partition revoked during the poll is not ours to write for any more (a revocation
        # also dropped the batch that was embedding: its events are read again from the log).
        batch = [e for e in batch if e.partition in self.owned]
        offsets = [tp for tp in offsets if tp.partition in self.owned]
        if not offsets:
            self._finish()
            return
        if all(e.topic != self._commands_topic for e in batch):
            # Extract this batch while the one before still embeds, then fuse and publish that
            # one: the embedder is never left waiting for a batch's single-threaded part.
            before = self._embedding
            extracted = self.reader.extract(
                [Sourced(e.value, e.topic, e.partition, e.offset) for e in batch],
                before.extracted if before is not None else None,
            )
            self._finish()
            self._embedding = Embedding(extracted, offsets, len(batch))
            return
        # A command acts on the fold as every interaction before it left it.
        self._finish()
        items: list[Item] = []
        for topic, events in _runs(batch):
            if topic == self._commands_topic:
                for event in events:
                    items.extend(self._command(event))
            else:
                ops = self.reader.process(
                    [Sourced(e.value, e.topic, e.partition, e.offset) for e in events]
                )
                items.extend(self._op_items(ops))
                self.counters["interactions"] += len(events)
        self._publish(items, offsets)

    def _finish(self) -> None:
        """Fuse the batch that is embedding and publish its ops (none: nothing to do)."""
        if self._embedding is None:
            return
        embedding, self._embedding = self._embedding, None
        ops = self.reader.fuse(embedding.extracted)
        self.counters["interactions"] += embedding.interactions
        self._publish(self._op_items(ops), embedding.offsets)

    def _drop(self) -> None:
        """Forget the batch that is embedding (partitions are moving): nothing of it is folded
        or published, and its events are read again from the committed offsets."""
        self._embedding = None

    def _op_items(self, ops: list[dict[str, Any]]) -> list[Item]:
        """The reader's ops as records of the batch's transaction (and counted)."""
        self.counters["ops_emitted"] += len(ops)
        return [(self._ops_topic, MEMORY_OPS.record, op["cube_id"], op) for op in ops]

    def _publish(self, items: list[Item], offsets: list[TopicPartition]) -> None:
        """One transaction: a batch's records and the consumer offsets past it, committed in a
        thread of its own once the transaction before it committed."""
        metadata = self._consumer.group_metadata()  # of this batch's generation, taken now
        self._committed()
        self._commit = self._committer.submit(
            self._transactions.publish_transaction, items, offsets, metadata
        )

    def _committed(self) -> None:
        """Wait for the transaction in flight; raises what made it fail."""
        if self._commit is None:
            return
        began = time.perf_counter()
        try:
            self._commit.result()
        finally:
            self._commit = None
            self.seconds["commit_wait"] += time.perf_counter() - began

    def _settle(self) -> None:
        """Let the commit in flight finish without raising (in a rebalance callback, which must
        not raise into the consumer's poll, the next step raises its failure)."""
        if self._commit is not None:
            wait([self._commit])

    def _command(self, event: Event) -> list[Item]:
        command = event.value
        outcome = apply_command(self.memories, command)
        self.counters["commands"] += 1
        if outcome.status == "REJECTED":
            self.counters["commands_rejected"] += 1
        self.counters["ops_emitted"] += len(outcome.ops)
        source = {"topic": event.topic, "partition": event.partition, "offset": event.offset}
        cube = command["cube_id"]
        result = result_record(command, outcome, source)
        ops = outcome.ops
        if self.generation.ops:
            # A command names memories of one extraction; each generation's writer answers it
            # on its own record (and its ops belong to its generation).
            ops = [{**op, "generation": self.generation.ops} for op in ops]
            result["event_id"] = str(
                uuid.uuid5(NAMESPACE, f"g{self.generation.ops}/{result['event_id']}")
            )
        return [
            *((self._ops_topic, MEMORY_OPS.record, cube, op) for op in ops),
            (self._results_topic, COMMAND_RESULTS.record, cube, result),
        ]  # fmt: skip


def _runs(events: list[Event]) -> Iterator[tuple[str, list[Event]]]:
    """Consecutive events of the same topic, in order: interactions are embedded together, a
    command in between is applied exactly where it came."""
    run: list[Event] = []
    for event in events:
        if run and event.topic != run[0].topic:
            yield run[0].topic, run
            run = []
        run.append(event)
    if run:
        yield run[0].topic, run

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

The writer of a re-extracted generation carries over what commands did to the generation it
re-extracts (DELETE, ARCHIVE, EXPIRE, RESTORE; :class:`processors.commands.Carryover`): while
its generation is being built it reads that generation's ops from ``memory-ops`` (kept forever,
unlike the commands) for the partitions it owns, from offset 0 when it is assigned them, then
follows them (:class:`BaseOps`), and gives each memory it re-extracts the effects its old
counterpart had, in the transaction that adds it, or as soon as an effect is read. A command
that names a memory of the old generation is applied to the memories re-extracted from its
items. Once its generation is live, a restarted writer reads the old ops only when such a
command comes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from processors.commands import CARRIED, Carryover, apply_command, result_record
from processors.embedder import Embedder
from processors.extract import Extractor
from processors.fusion import CubeMemories
from processors.ops import NAMESPACE
from processors.reader import Extracted, MemReader, Sourced
from schemas import Codec
from streams.runtime.generations import Generation, InvalidReaderSettings
from streams.runtime.partitions import restore_partitions
from streams.runtime.processor import Processor
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings
from streams.transport.consumer import Event, EventConsumer, InvalidEvent, raise_if_fatal
from streams.transport.follower import OpReader, read_partitions
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
    """Rules an event must meet before the writer takes it (else: dead-letter).

    An interaction meets the limits the API checks at the door (:mod:`schemas.limits`, through
    :func:`~streams.transport.events.interaction_problem`): one that reached the log by another
    path (a producer of its own) and breaks them is dead-lettered here, so it never crashes the
    writer and never reaches a view that would refuse it. A command names its cube and memory
    within the same limits, on its cube's partition.
    """
    from schemas.limits import (
        CUBE_ID_BYTES,
        ID_BYTES,
        METADATA_ENTRIES,
        NAME_BYTES,
        REASON_BYTES,
        VERSION_MAX,
    )
    from streams.transport.events import interaction_problem

    commands_topic = settings.topic(COMMANDS.name)

    def validate(event: Event) -> None:
        value = event.value
        if not value["cube_id"].strip():
            raise InvalidEvent("missing cube_id")
        if event.topic == commands_topic:
            if partition_for(value["cube_id"], settings.partitions) != event.partition:
                raise InvalidEvent("command not keyed by its cube_id (wrong partition)")
            # Its reason and evidence become its ops' (and its result's): bounded like the
            # API bounds them, or one command could make the writer's transaction too large.
            for name, limit in (("cube_id", CUBE_ID_BYTES), ("memory_id", ID_BYTES),
                                ("issued_by", NAME_BYTES), ("reason", REASON_BYTES)):  # fmt: skip
                size = len(value[name].encode())
                if size > limit:
                    raise InvalidEvent(f"{name} is {size} bytes, over the limit of {limit}")
            evidence = value.get("evidence") or {}
            if len(evidence) > METADATA_ENTRIES or any(
                len(k.encode()) > NAME_BYTES for k in evidence
            ):
                raise InvalidEvent(
                    f"evidence has {len(evidence)} entries (at most {METADATA_ENTRIES}, each "
                    f"named in at most {NAME_BYTES} bytes)"
                )
            expected = value.get("expected_version")
            if expected is not None and not 1 <= expected <= VERSION_MAX:
                raise InvalidEvent(f"expected_version {expected} is outside 1 .. {VERSION_MAX}")
            return
        problem = interaction_problem(value, settings.max_event_bytes)
        if problem is not None:
            raise InvalidEvent(problem)

    return validate


class BaseOps:
    """The ops of the generation a re-extraction re-extracts, for the partitions its writer
    owns, fed to its :class:`Carryover`: read from offset 0 when a partition is loaded, then
    followed without blocking. Through the one follower: committed transactions only, the
    base generation's ops only, poison skipped and counted (the views record it)."""

    def __init__(self, settings: Settings, codec: Codec, carry: Carryover) -> None:
        self.settings = settings
        self.carry = carry
        self.reader = OpReader(settings, codec, generation=carry.base)
        self.positions: dict[int, int] = {}
        self.ops = 0
        self._consumer: Consumer | None = None

    def load(self, partitions: list[int]) -> dict[str, set[str]]:
        """Read these partitions from offset 0 and follow them from there on; returns the base
        memories per cube whose counterparts may need an effect."""
        partitions = [p for p in partitions if p not in self.positions]
        found: dict[str, set[str]] = {}
        if not partitions:
            return found
        done = read_partitions(self.settings, self.reader.topic, dict.fromkeys(partitions, 0),
                               lambda msg: self._observe(msg, found))  # fmt: skip
        for p, caught_up in done.items():
            self.positions[p] = caught_up.next_offset
        self._assign()
        return found

    def poll(self, limit: int = 5000) -> dict[str, set[str]]:
        """What the followed partitions got since (without waiting)."""
        found: dict[str, set[str]] = {}
        if self._consumer is None or not self.positions:
            return found
        for msg in self._consumer.consume(limit, timeout=0):
            if msg.error() is not None:
                raise_if_fatal(msg.error())
                continue
            if msg.partition() in self.positions:
                self._observe(msg, found)
                self.positions[msg.partition()] = msg.offset() + 1
        return found

    def forget(self, partitions: set[int]) -> None:
        for p in partitions:
            self.positions.pop(p, None)
        if self._consumer is not None:
            self._assign()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _observe(self, msg: Message, found: dict[str, set[str]]) -> None:
        event = self.reader.event(msg)
        if event is None:
            return  # another generation's op, or poison (counted by the follower's policy)
        self.ops += 1
        op = event.value
        touched = self.carry.observe(op, msg.offset())
        if touched:
            found.setdefault(op["cube_id"], set()).update(touched)

    def _assign(self) -> None:
        if self._consumer is None:
            self._consumer = Consumer({
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": self.settings.group(f"base-ops-{uuid.uuid4().hex[:8]}"),
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            })  # fmt: skip
        topic = self.reader.topic
        self._consumer.assign(
            [TopicPartition(topic, p, offset) for p, offset in sorted(self.positions.items())]
        )


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
        try:
            own = self.generation.reader_settings(settings)
        except InvalidReaderSettings as exc:
            # A live generation recorded by an older version with settings this one refuses:
            # a writer that raised here would crash-loop the server on every start, so it runs
            # with the deployment's settings and says so (a new re-extraction replaces it).
            log.error("generation %d's reader settings are invalid (%s): running with the "
                      "deployment's", self.generation.id, exc)  # fmt: skip
            own = settings
        self.reader = MemReader(
            extractor, embedder, self.memories, own.merge_threshold, self.generation.ops
        )
        self.owned: set[int] = set()
        self._revoked: set[int] = set()
        self._assigned_once = False
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="reader-commit")
        self._commit: Future[None] | None = None  # the transaction in flight
        self._embedding: Embedding | None = None  # the batch extracted, not yet fused
        g = self.generation
        #: A re-extraction carries over what commands did to the generation it re-extracts;
        #: while it is being built, from the start (later, once a command names an old memory).
        self.carry = Carryover(g.base_ops, g.ops) if g.ops > 0 else None
        self._eager = self.carry is not None and g.switched_at is None
        self._base_ops: BaseOps | None = None
        self._carry_due: set[int] = set()  # partitions whose memories all need a look
        self._carry_touched: dict[str, set[str]] = {}  # base memories per cube, to carry
        self._carry_polled = 0.0
        #: Seconds the writer's thread spent polling and waiting for the previous commit.
        self.seconds = {"poll": 0.0, "commit_wait": 0.0}
        self.counters = {"interactions": 0, "commands": 0, "ops_emitted": 0,
                         "commands_rejected": 0, "catch_up_ops": 0, "catch_up_s": 0.0,
                         "poison_ops": 0, "carried_ops": 0}  # fmt: skip

    def open(self) -> None:
        s = self.settings
        self._ops_topic = s.topic(MEMORY_OPS.name)
        self._ops = OpReader(s, self.codec, generation=self.generation.ops)
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
        if self.carry is not None:
            self._base_ops = BaseOps(s, self.codec, self.carry)

    def close(self) -> None:
        self._drop()  # not committed: the next owner reads its events again
        self._settle()  # its outcome no longer matters here: the next owner reads the log
        self._committer.shutdown()
        self.reader.close()
        for closer in (getattr(self, "_consumer", None), getattr(self, "_transactions", None),
                       getattr(self, "_dlq", None), self._base_ops):  # fmt: skip
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
            if self._eager:
                self._load_base(sorted(now - self.owned))
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
        if self.carry is not None and self._base_ops is not None:
            self.carry.drop_cubes(lambda cube: partition_for(cube, n) in partitions)
            self._base_ops.forget(partitions)
            self._carry_due -= partitions
            self._carry_touched = {c: ids for c, ids in self._carry_touched.items()
                                   if partition_for(c, n) not in partitions}  # fmt: skip
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
        """Fold one op of the log through the follower; a poison op is skipped here (the views
        record it in the dead-letter topic: one record per bad message)."""
        if self._ops.fold(self.memories, msg) is None:
            self.counters["poison_ops"] = self._ops.poisoned

    # carrying over a re-extracted generation's commands ------------------------------------

    def _load_base(self, partitions: list[int]) -> None:
        """Read the base generation's ops of these partitions (from offset 0); every memory of
        them is looked at before the next transaction."""
        if self._base_ops is None:
            return
        new = [p for p in partitions if p not in self._base_ops.positions]
        if not new:
            return
        began = time.monotonic()
        self._touch(self._base_ops.load(new))
        self._carry_due |= set(new)
        log.info("partitions %s: ops generation %d's ops read in %.2f s, to carry over",
                 new, self.carry.base if self.carry else -1,
                 time.monotonic() - began)  # fmt: skip

    def _touch(self, found: dict[str, set[str]]) -> None:
        for cube, ids in found.items():
            self._carry_touched.setdefault(cube, set()).update(ids)

    def _carried_items(self) -> list[Item]:
        """The ops that carry over effects read since the last transaction (and, after an
        assignment, those any memory of the new partitions still lacks), folded."""
        if self.carry is None or self._base_ops is None:
            return []
        self._touch(self._base_ops.poll())
        self._carry_polled = time.monotonic()
        targets: list[str] = []
        if self._carry_due:
            n, due = self.settings.partitions, self._carry_due & self.owned
            with self.memories.lock:
                targets += [m.memory_id for m in self.memories.table.memories.values()
                            if partition_for(m.cube_id, n) in due]  # fmt: skip
            self._carry_due = set()
        touched, self._carry_touched = self._carry_touched, {}
        for cube, base_ids in touched.items():
            if partition_for(cube, self.settings.partitions) in self.owned:
                targets += self.carry.counterparts_of(self.memories, cube, base_ids)
        ops = [
            op
            for target in dict.fromkeys(targets)
            for op in self.carry.carry(self.memories, target)
        ]
        self.counters["carried_ops"] += len(ops)
        return self._records(ops)

    def _carry_births(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The effects the memories these ops add must have at once (their source items'
        memories of the base generation had them), folded."""
        if self.carry is None or self._base_ops is None:
            return []
        loaded, n = self._base_ops.positions, self.settings.partitions
        born = [
            op["memory_id"]
            for op in ops
            if op["version"] == 1
            and op["op"] in ("ADD", "MERGE")
            and partition_for(op["cube_id"], n) in loaded
        ]
        carried = [c for memory_id in born for c in self.carry.carry(self.memories, memory_id)]
        self.counters["carried_ops"] += len(carried)
        return carried

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
            if self._base_ops is not None and time.monotonic() - self._carry_polled >= 1.0:
                items = self._carried_items()  # effects the old writer applied meanwhile
                if items:
                    self._publish(items, [], carry=False)
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
        """The reader's ops as records of the batch's transaction (and counted), with the
        effects a re-extraction carries over to the memories they add."""
        return self._records([*ops, *self._carry_births(ops)])

    def _records(self, ops: list[dict[str, Any]]) -> list[Item]:
        self.counters["ops_emitted"] += len(ops)
        return [(self._ops_topic, MEMORY_OPS.record, op["cube_id"], op) for op in ops]

    def _publish(
        self, items: list[Item], offsets: list[TopicPartition], carry: bool = True
    ) -> None:
        """One transaction: a batch's records and the consumer offsets past it, committed in a
        thread of its own once the transaction before it committed (a re-extraction's carried
        effects read meanwhile go last: they are folded on top of the batch)."""
        if carry:
            items = [*items, *self._carried_items()]
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
        if (
            self.carry is not None
            and command["command"] in CARRIED
            and self.memories.get(command["memory_id"]) is None
        ):
            # A memory of the generation this one re-extracts: applied to the memories
            # re-extracted from its items (its old ops read first, once, and up to now).
            self._load_base([event.partition])
            self._touch(self._base_ops.poll() if self._base_ops else {})
            outcome = self.carry.command(self.memories, command)
        else:
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

"""Access statistics per memory, from the QueryEvents on ``memstream.queries``: the input of the
scheduler, which promotes hot memories and demotes cold ones.

Every QueryEvent lists the memories a search returned, best first. Each returned memory gets a
hit, weighted by its rank (1/rank, the weight reciprocal-rank fusion gives it in search): a
memory ranked first is likely the one the agent used, while the tenth of a top-10 was probably
skipped, so counting both the same would make every memory that turns up in wide searches hot.
The best rank ever seen is kept too, so the scheduler can tell a memory that leads some searches
from one that only trails many.

Exactly-once effect without Faust transactions: each table value carries the source partition
and offset of the last event it counted. A key is written only while handling an event of its
cube, and a cube's events all live in one partition (the message key is the cube id; events
keyed otherwise are refused), so the offsets a key sees only grow; after a crash or rebalance
Faust redelivers from the last committed offset, and every event at or below a key's guard is
skipped for that key.
Faust flushes the changelog before it commits source offsets, so the guard is never behind a
commit. A partly applied event (a kill between two writes) is completed on redelivery.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import faust
from faust.types import EventT, Message, StreamT
from mode import CrashingSupervisor

from schemas import Codec, DecodeError
from streams.pipeline.agents.runner import (
    BATCH_MAX,
    BATCH_S,
    FaustProcessor,
    acked_only_if_done,
    owned_partitions,
    writing_for,
)
from streams.pipeline.agents.tables import HEAT_BUCKET_S, HEAT_HORIZON_S, heat_table, totals_table
from streams.pipeline.agents.topics import queries_topic
from streams.settings import Settings
from streams.transport.consumer import InvalidEvent, dead_letter_bytes
from streams.transport.producer import EventProducer
from streams.transport.topics import QUERIES

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: ``await dead_letter(message, error_type, reason)``: publish a refused message to the DLQ.
DeadLetterSink = Callable[[Message, str, str], Awaitable[None]]


def memory_key(cube_id: str, memory_id: str) -> str:
    """The tables' key of one memory. Memory ids are uuids, so the last ``/`` splits it."""
    return f"{cube_id}/{memory_id}"


class AccessView:
    """A lock-protected copy of the tables for readers on other threads (the HTTP API, the
    scheduler): a Faust table is a dict the agent mutates on its own loop, and iterating it from
    another thread can raise mid-rebalance. The agent writes here right after each table write;
    a recovery reloads it from the recovered tables.

    Values are replaced, never mutated, so readers get copies of consistent records.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, dict[str, dict[str, Any]]] = {}  # cube -> memory -> total
        self._heat: dict[str, dict[float, dict[str, Any]]] = {}  # key -> bucket start -> value
        self._counters = {"events": 0, "hits": 0, "duplicates": 0, "dead_lettered": 0}

    def put_total(self, cube_id: str, memory_id: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._totals.setdefault(cube_id, {})[memory_id] = value

    def put_bucket(self, key: str, start: float, value: dict[str, Any]) -> None:
        with self._lock:
            self._heat.setdefault(key, {})[start] = value

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                self._counters[name] += n

    def load_totals(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Replace the totals with a recovered table's contents."""
        totals: dict[str, dict[str, dict[str, Any]]] = {}
        for key, value in items:
            cube_id, _, memory_id = key.rpartition("/")
            totals.setdefault(cube_id, {})[memory_id] = value
        with self._lock:
            self._totals = totals

    def load_heat(self, items: Iterable[tuple[str, float, dict[str, Any]]]) -> None:
        """Replace the heat buckets with a recovered table's ``(key, start, value)``s."""
        heat: dict[str, dict[float, dict[str, Any]]] = {}
        for key, start, value in items:
            heat.setdefault(key, {})[start] = value
        with self._lock:
            self._heat = heat

    def prune(self, now_s: float) -> None:
        """Forget buckets past the horizon (Faust drops them from the table on its own timer)."""
        with self._lock:
            for key in list(self._heat):
                buckets = self._heat[key]
                for start in [s for s in buckets if not _recent(s, now_s)]:
                    del buckets[start]
                if not buckets:
                    del self._heat[key]

    def top(self, cube_id: str, limit: int, now_s: float) -> list[dict[str, Any]]:
        """A cube's memories, hottest first: rank-weighted hits over the last hour, then over
        all time, then the latest hit."""
        with self._lock:
            rows = [
                self._row(cube_id, memory_id, total, now_s)
                for memory_id, total in self._totals.get(cube_id, {}).items()
            ]
        rows.sort(
            key=lambda r: (-r["recent_score"], -r["score"], -r["last_hit_ms"], r["memory_id"])
        )
        return rows[:limit]

    def memory(self, cube_id: str, memory_id: str, now_s: float) -> dict[str, Any] | None:
        with self._lock:
            total = self._totals.get(cube_id, {}).get(memory_id)
            return None if total is None else self._row(cube_id, memory_id, total, now_s)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                **self._counters,
                "keys": sum(len(memories) for memories in self._totals.values()),
                "heat_buckets": sum(len(buckets) for buckets in self._heat.values()),
            }

    def _row(
        self, cube_id: str, memory_id: str, total: dict[str, Any], now_s: float
    ) -> dict[str, Any]:
        buckets = self._heat.get(memory_key(cube_id, memory_id), {})
        recent = [value for start, value in buckets.items() if _recent(start, now_s)]
        return {
            "cube_id": cube_id,
            "memory_id": memory_id,
            "hits": total["hits"],
            "score": total["score"],
            "best_rank": total["best_rank"],
            "last_hit_ms": total["last_hit_ms"],
            "recent_hits": sum(value["hits"] for value in recent),
            "recent_score": sum(value["score"] for value in recent),
        }


def _recent(bucket_start: float, now_s: float) -> bool:
    """Whether a heat bucket ends within the horizon (Faust expires it after that)."""
    return bucket_start + HEAT_BUCKET_S > now_s - HEAT_HORIZON_S


class AccessStats:
    """The access-statistics agent declared on a Faust app: its topic, tables, agent and view.

    Separate from the processor so that a unit test can drive the very same agent with
    ``access.agent.test_context()`` and no broker.
    """

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        dead_letter: DeadLetterSink,
        codec: Codec | None = None,
        batch_s: float = BATCH_S,
    ) -> None:
        self.codec = codec or Codec()
        self.batch_s = batch_s
        self.view = AccessView()
        self.topic = queries_topic(app, settings)
        self.totals = totals_table(app)
        self.heat = heat_table(app)
        self._app = app
        self._dead_letter = dead_letter
        # One callback for both tables: Faust calls it after every rebalance, once all of them
        # have caught up with their changelogs.
        self.totals.on_recover(self._on_recovered)
        # A crashing supervisor: an unexpected error in the agent crashes the app (and so the
        # processor, which the host restarts from the log) instead of Faust restarting the actor
        # and carrying on past the event that failed.
        self.agent = app.agent(
            self.topic, name="access-stats", supervisor_strategy=CrashingSupervisor
        )(self._consume)

    async def _consume(self, stream: StreamT[bytes]) -> None:
        async for events in stream.take_events(BATCH_MAX, within=self.batch_s):
            with acked_only_if_done(events):
                await self.handle(events)

    async def handle(self, events: Sequence[EventT]) -> None:
        """Count a batch of QueryEvents, dead-lettering those that are not valid ones."""
        valid: list[tuple[EventT, dict[str, Any]]] = []
        for event in events:
            message = event.message
            try:
                valid.append((event, self._decode(message)))
            except (DecodeError, InvalidEvent) as exc:
                reason = exc.reason if isinstance(exc, DecodeError) else str(exc)
                await self._dead_letter(message, type(exc).__name__, reason)
                self.view.count(dead_lettered=1)
        self._apply(valid)

    def _decode(self, message: Message) -> dict[str, Any]:
        record = self.codec.decode(message.value, reader=QUERIES.record).record
        cube_id = record["cube_id"]
        if not cube_id or message.key != cube_id.encode():
            raise InvalidEvent(
                f"message key {message.key!r} is not the cube id {cube_id!r}: a QueryEvent must "
                "be keyed by its cube, or its counts would not stay in one partition"
            )
        return record

    def _apply(self, batch: Iterable[tuple[EventT, dict[str, Any]]]) -> None:
        """Add a batch of ``(event, record)`` hits to both tables, skipping every key that has
        counted an event already; each key changed is written once, at the end, for the last
        event that changed it (see :func:`~streams.pipeline.agents.runner.writing_for`).

        No await in here: the tables and the view change together, between two batches.
        """
        totals: dict[str, tuple[EventT, dict[str, Any]]] = {}  # key -> (last event, new total)
        # (key, bucket start) -> (last event, the table relative to its time, new value)
        buckets: dict[tuple[str, float], tuple[EventT, Any, dict[str, Any]]] = {}
        events = counted = skipped = 0
        for event, record in batch:
            partition, offset = event.message.partition, event.message.offset
            events += 1
            cube_id = record["cube_id"]
            when_ms = _millis(record["event_time"])
            heat = self.heat.relative_to(when_ms / 1000)
            bucket_start, _end = heat.table.window.current(when_ms / 1000)
            ranks: dict[str, int] = {}
            for rank, hit in enumerate(record["results"], start=1):
                ranks.setdefault(hit["memory_id"], rank)  # a memory listed twice: its best rank
            for memory_id, rank in ranks.items():
                key = memory_key(cube_id, memory_id)
                total = totals[key][1] if key in totals else self.totals[key]
                if _counted(total, partition, offset):
                    skipped += 1
                else:
                    counted += 1
                    totals[key] = (
                        event,
                        {
                            "hits": total.get("hits", 0) + 1,
                            "score": total.get("score", 0.0) + 1.0 / rank,
                            "best_rank": min(total.get("best_rank", rank), rank),
                            "last_hit_ms": max(total.get("last_hit_ms", when_ms), when_ms),
                            "partition": partition,
                            "offset": offset,
                        },
                    )
                slot = (key, bucket_start)
                bucket = buckets[slot][2] if slot in buckets else heat[key].value()
                if not _counted(bucket, partition, offset):
                    buckets[slot] = (event, heat, {
                        "hits": bucket.get("hits", 0) + 1,
                        "score": bucket.get("score", 0.0) + 1.0 / rank,
                        "partition": partition,
                        "offset": offset,
                    })  # fmt: skip
        for key, (event, total) in totals.items():
            with writing_for(event):
                self.totals[key] = total
            cube_id, _, memory_id = key.rpartition("/")
            self.view.put_total(cube_id, memory_id, total)
        for (key, start), (event, heat, bucket) in buckets.items():
            with writing_for(event):
                heat[key] = bucket
            self.view.put_bucket(key, start, bucket)
        self.view.count(events=events, hits=counted, duplicates=skipped)

    def reload(self, partitions: set[int], now_s: float) -> None:
        """Reload the view from the tables after a rebalance, keeping the keys of the source
        ``partitions`` this instance now owns and the heat buckets still within the horizon.

        What is dropped goes from the tables' stores too, because Faust leaves it there: its
        memory store forgets, on revocation, only the keys it read from a changelog, never
        those this process wrote (so a revoked partition's counts would stay readable here,
        going stale), and it expires only the windows this process wrote, never those read back
        from the changelog.
        """
        totals = self.totals.data
        for key, value in list(totals.items()):
            if value.get("partition") not in partitions:
                totals.pop(key, None)
        heat = self.heat.table.data
        for window_key, value in list(heat.items()):
            _key, (start, _end) = window_key
            if value.get("partition") not in partitions or not _recent(start, now_s):
                heat.pop(window_key, None)
        self.view.load_totals(totals.items())
        self.view.load_heat((key, start, value) for (key, (start, _end)), value in heat.items())

    async def _on_recovered(self) -> None:
        self.reload(owned_partitions(self._app, self.topic.get_topic_name()), time.time())


def _counted(value: dict[str, Any], partition: int, offset: int) -> bool:
    """Whether a table value has counted the event at ``offset`` of ``partition`` already."""
    return value.get("partition") == partition and value["offset"] >= offset


def _millis(value: datetime) -> int:
    """Milliseconds since the epoch, exactly (a float timestamp can round 0.999 ms away)."""
    return (value - EPOCH) // timedelta(milliseconds=1)


class AccessStatsAgent(FaustProcessor):
    """Access statistics per memory as a hosted processor: QueryEvents in, Faust tables (and
    their changelogs) as state, a thread-safe read API for the HTTP layer and the scheduler.

    Undecodable events are dead-lettered from a worker thread (``run_in_executor``): the DLQ
    publish waits for the broker's ack, which must not stall Faust's loop (its commit timer,
    changelog sends, rebalance callbacks, the one-second step), while the agent still awaits it,
    so the event's offset moves on only once its dead letter is on record.
    """

    name = "access-stats"
    inputs = ("queries",)
    outputs = ("dlq",)
    state = (
        "per-memory access totals and 10-minute heat buckets over the last hour "
        "(Faust in-memory tables, recovered from their changelog topics)"
    )

    #: How often step() forgets heat buckets past the horizon in the read view.
    prune_interval_s = 60.0

    def __init__(self, settings: Settings, codec: Codec | None = None) -> None:
        super().__init__(settings)
        self.codec = codec or Codec()
        self.access: AccessStats | None = None
        self._dead_letters: EventProducer | None = None
        self._worker = f"{socket.gethostname()}/{settings.group(self.name)}"
        self._pruned_at = time.monotonic()

    def declare(self, app: faust.App) -> None:
        self._dead_letters = EventProducer(self.settings, self.codec)
        self.access = AccessStats(app, self.settings, self._dead_letter, self.codec)

    def step(self) -> None:
        super().step()
        if self.access is not None and time.monotonic() - self._pruned_at > self.prune_interval_s:
            self.access.view.prune(time.time())
            self._pruned_at = time.monotonic()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._dead_letters is not None:
                self._dead_letters.close()

    def top(self, cube_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """A cube's most accessed memories, hottest first (see :meth:`AccessView.top`); each a
        dict of ``cube_id, memory_id, hits, score, best_rank, last_hit_ms, recent_hits,
        recent_score``. Safe from any thread."""
        return [] if self.access is None else self.access.view.top(cube_id, limit, time.time())

    def memory(self, cube_id: str, memory_id: str) -> dict[str, Any] | None:
        """One memory's statistics as in :meth:`top`, or None if it was never returned."""
        if self.access is None:
            return None
        return self.access.view.memory(cube_id, memory_id, time.time())

    def stats(self) -> dict[str, Any]:
        """``events`` counted (redeliveries included), ``hits`` counted, ``duplicates`` (hits
        skipped as already counted), ``dead_lettered``, ``keys`` (memories), ``heat_buckets``."""
        view = self.access.view if self.access is not None else AccessView()
        return {**view.stats(), "recovered": self.ready()}

    async def _dead_letter(self, message: Message, error_type: str, reason: str) -> None:
        assert self._dead_letters is not None
        publish = partial(
            dead_letter_bytes,
            self._dead_letters,
            self.settings,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            error_type=error_type,
            reason=reason,
            worker=self._worker,
        )
        await asyncio.get_running_loop().run_in_executor(None, publish)

"""MemScheduler as a Faust agent: QueryEvents make memories hot, the policy keeps each cube's
top-N hot memories activated, and its decisions go to the one writer as ACTIVATE / DEACTIVATE
commands. Heat and the decision are pure (:mod:`processors.scheduler`); this module is their
wiring: two agents, two tables and a timer on an app of the scheduler's own.

- ``scheduler-heat`` (agent on ``queries``): per memory, the decayed heat of
  :func:`~processors.scheduler.add_hit` and the plain statistics shown as evidence (hits, best
  rank, last hit). The same QueryEvents and 1/rank weights as the access-statistics agent, with
  its offset guard against redeliveries (a value carries the source partition and offset of the
  last event it counted; a cube's events all live in one partition), folded into one decayed
  value instead of its 10-minute buckets, so that the half-life is the policy's.
- ``scheduler-memories`` (agent on ``memory-ops``): per memory, what the log says of it
  (version, status, type, activated), by :func:`~processors.scheduler.track`; a memory still as
  its ADD made it (:data:`~processors.scheduler.FRESH`, most of them) is not stored. What is
  activated is what the ACTIVATE / DEACTIVATE ops say, never what the scheduler asked for: a
  command may be rejected (the memory was archived meanwhile, or moved to another version).
- a timer every ``scheduler_interval_s``: each owned cube whose policy interval has passed is
  decided, and the commands are published on ``commands``, keyed by cube.

Both topics are keyed by cube and co-partitioned, so Faust's assignor gives one instance a
cube's queries and ops together, and each table key lives in one changelog partition.

Exactly-once effect: a decision's command id is ``command_id("scheduler", cube, memory,
kind, version)``, the memory's version as memory-ops last showed it, and the command carries that
``expected_version``. The same decision taken again (after a restart, before its op was folded
here) is the same command, which the writer answers DUPLICATE; a decision on a stale version is
refused by the writer and taken anew once the newer op arrives. A sent command is not resent
for a few intervals (``retry_s``) while its op is on its way.

Undecodable events are skipped and counted, not dead-lettered here: the access-statistics agent
dead-letters the same queries, and the views processor the same ops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
from faust.types import EventT, StreamT
from mode import CrashingSupervisor

from processors.commands import command_id
from processors.scheduler import (
    FRESH,
    Decision,
    Heat,
    SchedulerPolicy,
    Tracked,
    add_hit,
    decide,
    track,
)
from schemas import Codec, DecodeError
from streams.pipeline.agents.access import EPOCH, memory_key
from streams.pipeline.agents.runner import (
    BATCH_MAX,
    BATCH_S,
    FaustAppFailed,
    FaustProcessor,
    acked_only_if_done,
    owned_partitions,
    writing_for,
)
from streams.pipeline.agents.topics import memory_ops_topic, queries_topic
from streams.settings import Settings
from streams.transport.producer import EventProducer
from streams.transport.topics import COMMANDS, MEMORY_OPS, QUERIES

log = logging.getLogger("memstream.scheduler")

ISSUER = "scheduler"

#: ``send(commands)``: publish ``(cube_id, command)`` pairs and return once they are acked.
Send = Callable[[list[tuple[str, dict[str, Any]]]], None]


def policy_from(settings: Settings) -> SchedulerPolicy:
    """The default policy of every cube, from the settings."""
    return SchedulerPolicy(
        top_n=settings.scheduler_top_n,
        min_heat=settings.scheduler_min_heat,
        half_life_s=settings.scheduler_half_life_s,
        interval_s=settings.scheduler_interval_s,
    )


def decision_command(cube_id: str, decision: Decision, issued_by: str, now: datetime) -> dict:
    """The Command of one decision; its id depends only on what was decided on which version."""
    return {
        "command_id": command_id(
            ISSUER, cube_id, decision.memory_id, decision.kind, str(decision.version)
        ),
        "cube_id": cube_id,
        "memory_id": decision.memory_id,
        "command": decision.kind,
        "issued_by": issued_by,
        "event_time": now,
        "reason": f"scheduler: {decision.reason}",
        "expected_version": decision.version,
        "evidence": dict(decision.evidence),
        "payload": None,
    }


class Scheduler:
    """The scheduler's agents, tables and timer declared on a Faust app.

    ``policies`` names cubes whose policy differs from ``default`` (per-cube policies later
    come from ``memstream.cubes``); ``ready()`` gates decisions until the tables are recovered.
    """

    #: A sent command is not sent again for this many of its cube's intervals (its op is due).
    retry_intervals = 5.0

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        send: Send,
        ready: Callable[[], bool],
        codec: Codec | None = None,
        policies: Mapping[str, SchedulerPolicy] | None = None,
    ) -> None:
        self.codec = codec or Codec()
        self.default = policy_from(settings)
        self.policies = dict(policies or {})
        self.issued_by = f"{ISSUER}/{settings.worker_id}"
        self.queries = queries_topic(app, settings)
        self.ops = memory_ops_topic(app, settings)
        self.heat = app.Table(
            "scheduler-heat",
            key_type=str,
            default=dict,
            help="MemScheduler: decayed heat and hit statistics per memory.",
        )
        self.memories = app.Table(
            "scheduler-memories",
            key_type=str,
            default=dict,
            help="MemScheduler: version, status, type, activated per memory.",
        )
        self.counters = {
            "scheduler_queries": 0,
            "scheduler_hits": 0,
            "scheduler_duplicates": 0,
            "scheduler_ops": 0,
            "scheduler_skipped": 0,
            "scheduler_ticks": 0,
            "scheduler_decisions": 0,
            "scheduler_activate": 0,
            "scheduler_deactivate": 0,
            "scheduler_activated": 0,
            "scheduler_cubes": 0,
        }
        self.failure: BaseException | None = None
        self._app, self._send, self._ready = app, send, ready
        self._decided_at: dict[str, float] = {}  # cube -> monotonic time of its last decision
        self._sent: dict[str, tuple[str, float]] = {}  # key -> (command id, monotonic sent)
        tick = min([self.default.interval_s, *(p.interval_s for p in self.policies.values())])
        app.agent(self.queries, name="scheduler-heat", supervisor_strategy=CrashingSupervisor)(
            self._consume_queries
        )
        app.agent(self.ops, name="scheduler-ops", supervisor_strategy=CrashingSupervisor)(
            self._consume_ops
        )
        app.timer(tick, name="scheduler-decide")(self._tick)

    def policy(self, cube_id: str) -> SchedulerPolicy:
        return self.policies.get(cube_id, self.default)

    # -- following the log ------------------------------------------------------------------

    async def _consume_queries(self, stream: StreamT[bytes]) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_S):
            with acked_only_if_done(events):
                self.count_queries(events)

    async def _consume_ops(self, stream: StreamT[bytes]) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_S):
            with acked_only_if_done(events):
                for event in events:
                    self.follow_op(event)

    def _decode(self, event: EventT, record: str) -> dict[str, Any] | None:
        message = event.message
        try:
            value = self.codec.decode(message.value, reader=record).record
        except DecodeError:
            self.counters["scheduler_skipped"] += 1
            return None
        if not value["cube_id"] or message.key != value["cube_id"].encode():
            self.counters["scheduler_skipped"] += 1  # not in its cube's partition
            return None
        return value

    def count_queries(self, events: Iterable[EventT]) -> None:
        """Add a batch of QueryEvents' hits to the heat table, each key changed written once
        (no await: one batch at a time)."""
        heats: dict[str, tuple[EventT, dict[str, Any]]] = {}  # key -> (last event, new value)
        for event in events:
            record = self._decode(event, QUERIES.record)
            if record is None:
                continue
            partition, offset = event.message.partition, event.message.offset
            cube_id = record["cube_id"]
            when_ms = (record["event_time"] - EPOCH) // timedelta(milliseconds=1)
            half_life = self.policy(cube_id).half_life_s
            ranks: dict[str, int] = {}
            for rank, hit in enumerate(record["results"], start=1):
                ranks.setdefault(hit["memory_id"], rank)
            for memory_id, rank in ranks.items():
                key = memory_key(cube_id, memory_id)
                value = heats[key][1] if key in heats else self.heat[key]
                if value.get("partition") == partition and value["offset"] >= offset:
                    self.counters["scheduler_duplicates"] += 1
                    continue
                heat = add_hit(Heat.from_dict(value), rank, when_ms, half_life)
                heats[key] = event, {**heat.as_dict(), "partition": partition, "offset": offset}
                self.counters["scheduler_hits"] += 1
            self.counters["scheduler_queries"] += 1
        for key, (event, value) in heats.items():
            with writing_for(event):
                self.heat[key] = value

    def follow_op(self, event: EventT) -> None:
        """Track one memory op of a batch (a redelivered version changes nothing). A memory
        still in the state its ADD made (:data:`~processors.scheduler.FRESH`) is not stored."""
        op = self._decode(event, MEMORY_OPS.record)
        if op is None:
            return
        key = memory_key(op["cube_id"], op["memory_id"])
        value = self.memories[key]  # a missing key reads as {} (the default), unstored
        state = track(Tracked.from_dict(value), op)
        if state.version != value.get("version"):
            if value or state != FRESH:
                with writing_for(event):
                    self.memories[key] = {**state.as_dict(), "partition": event.message.partition}
            self._sent.pop(key, None)  # its version moved: a new decision gets a new id
        self.counters["scheduler_ops"] += 1

    # -- deciding ---------------------------------------------------------------------------

    async def _tick(self) -> None:
        self.counters["scheduler_ticks"] += 1
        try:
            commands = self.decide_due(time.time(), time.monotonic())
            if commands:
                await asyncio.get_running_loop().run_in_executor(None, self._send, commands)
        except Exception as exc:  # the processor's next step raises it: the host restarts it
            log.exception("scheduler: a decision failed")
            self.failure = exc

    def owned(self) -> set[int]:
        return owned_partitions(self._app, self.queries.get_topic_name())

    def decide_due(self, now_s: float, monotonic_s: float) -> list[tuple[str, dict[str, Any]]]:
        """The commands of every owned cube whose interval has passed (none before recovery).
        Runs on the app's loop between two events, so the tables do not move under it."""
        if not self._ready():
            return []
        owned = self.owned()
        heats: dict[str, dict[str, Heat]] = {}
        for key, value in self.heat.items():
            if value.get("partition") in owned:
                cube_id, _, memory_id = key.rpartition("/")
                heats.setdefault(cube_id, {})[memory_id] = Heat.from_dict(value)
        tracked: dict[str, dict[str, Tracked]] = {}
        activated = 0
        for key, value in self.memories.items():
            if value.get("partition") not in owned:
                continue
            cube_id, _, memory_id = key.rpartition("/")
            state = Tracked.from_dict(value)
            activated += state.activated
            if state.activated or memory_id in heats.get(cube_id, {}):
                tracked.setdefault(cube_id, {})[memory_id] = state
        for cube_id, cube_heats in heats.items():  # hot memories in the state their ADD made
            known = tracked.setdefault(cube_id, {})
            for memory_id in cube_heats.keys() - known.keys():
                known[memory_id] = FRESH
        self.counters["scheduler_activated"] = activated
        self.counters["scheduler_cubes"] = len(set(heats) | set(tracked))
        now = datetime.fromtimestamp(now_s, UTC)
        now_ms = (now - EPOCH) // timedelta(milliseconds=1)
        commands: list[tuple[str, dict[str, Any]]] = []
        for cube_id in sorted(set(heats) | set(tracked)):
            policy = self.policy(cube_id)
            if monotonic_s - self._decided_at.get(cube_id, -1e18) < policy.interval_s * 0.95:
                continue
            self._decided_at[cube_id] = monotonic_s
            known = tracked.get(cube_id, {})
            for decision in decide(policy, now_ms, heats.get(cube_id, {}), known):
                command = decision_command(cube_id, decision, self.issued_by, now)
                key = memory_key(cube_id, decision.memory_id)
                sent = self._sent.get(key)
                retry_s = policy.interval_s * self.retry_intervals
                if sent and sent[0] == command["command_id"] and monotonic_s - sent[1] < retry_s:
                    continue
                self._sent[key] = (command["command_id"], monotonic_s)
                commands.append((cube_id, command))
                self.counters["scheduler_" + decision.kind.lower()] += 1
            self.counters["scheduler_decisions"] += 1
        return commands


class SchedulerAgent(FaustProcessor):
    """MemScheduler as a hosted processor: ``queries`` and ``memory-ops`` in, ACTIVATE /
    DEACTIVATE commands out (see the module docstring)."""

    name = "scheduler"
    inputs = ("queries", "memory-ops")
    outputs = ("commands",)
    state = (
        "per-memory decayed heat and hit statistics, per-memory version/status/activated "
        "(Faust in-memory tables, recovered from their changelog topics)"
    )

    def __init__(
        self,
        settings: Settings,
        codec: Codec | None = None,
        policies: Mapping[str, SchedulerPolicy] | None = None,
    ) -> None:
        super().__init__(settings)
        self.codec = codec or Codec()
        self.policies = policies
        self.scheduler: Scheduler | None = None
        self._producer: EventProducer | None = None

    def declare(self, app: faust.App) -> None:
        self._producer = EventProducer(self.settings, self.codec)
        self.scheduler = Scheduler(
            app, self.settings, self._send, self.ready, self.codec, self.policies
        )

    def _send(self, commands: list[tuple[str, dict[str, Any]]]) -> None:
        assert self._producer is not None
        topic = self.settings.topic(COMMANDS.name)
        self._producer.publish_many(topic, COMMANDS.record, commands)

    def step(self) -> None:
        super().step()
        if self.scheduler is not None and self.scheduler.failure is not None:
            failure = self.scheduler.failure
            raise FaustAppFailed(f"{self.name}: a decision failed: {failure!r}") from failure

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._producer is not None:
                self._producer.close()

    def stats(self) -> dict[str, Any]:
        """``scheduler_*`` counters: queries and hits counted, duplicates skipped, ops followed,
        events skipped, decisions (cube-intervals decided), activate / deactivate commands sent,
        memories activated now and cubes followed (in the owned partitions)."""
        counters = dict(self.scheduler.counters) if self.scheduler is not None else {}
        return {**counters, "recovered": self.ready()}

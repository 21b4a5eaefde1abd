"""Replay: build the next view generation beside the live one, then switch to it in one step.

``memstream replay --rebuild`` asks for a new generation of the views of the same extraction:
a second views processor, in a new consumer group, refolds ``memory-ops`` from offset 0 through
the same fold into a new Milvus collection, a new ClickHouse ops table and a new working set,
while the live one keeps serving. ``--reextract`` asks for a new extraction too: a second
reader, in a new group, rereads ``interactions`` from offset 0 and writes the next ops
generation into the log beside the old one (its ops carry the generation and reader version).

Every process runs a :class:`GenerationWatcher`, which follows the pointer in MinIO
(:mod:`streams.runtime.generations`): it hosts the next generation's processors of its role
(so an interrupted replay resumes where its groups committed), and a views process switches
when the next generation has caught up: its Milvus alias and ClickHouse views, the API's
stores, then the processors (the new ones go on under the live names, the old ones stop), and
only then drops the old generation's collection and table.

A replay never takes the server down. A next generation that cannot start (reader settings
that do not validate, a pointer from an older version or edited by hand) is abandoned at once,
and one whose processors keep failing (``views-next``, ``reader-next``: the host gives up on
them after its ``max_failures``, and tells this class instead of failing the process) is
abandoned too: it is moved to ``failed`` in the pointer with the reason (``GET /v1/replay``,
the log), every process stops its processors and drops what it had built of it, and the current
generation serves on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka.admin import AdminClient

from streams.pipeline.build import Stores
from streams.pipeline.views import ViewsProcessor
from streams.runtime.generations import Generation, GenerationState, GenerationStore, Kind
from streams.runtime.lag import lags
from streams.runtime.processor import Processor
from streams.transport.topics import COMMANDS, INTERACTIONS, MEMORY_OPS

if TYPE_CHECKING:
    from streams.pipeline.roles import Runtime

log = logging.getLogger("memstream.replay")
NEXT_VIEWS, NEXT_READER = "views-next", "reader-next"


class Replay:
    """Starts replays and carries out what the generation pointer says, for one process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.next_stores: Stores | None = None
        self.switches = 0
        #: The next generation whose processors this process hosts (None: none).
        self.hosting: int | None = None
        #: Next processors the host gave up on: (generation id, processor, last error).
        self._given_up: list[tuple[int, str, str | None]] = []
        self._given_up_lock = threading.Lock()  # not _lock: a sync may be joining that thread
        self._lock = threading.RLock()

    @property
    def _store(self) -> GenerationStore:
        if self.runtime.generations is None:
            raise RuntimeError("this runtime has no generation store")
        return self.runtime.generations

    def state(self) -> GenerationState:
        return self._store.read()

    def start(self, kind: Kind, reader: dict[str, Any] | None = None) -> GenerationState:
        """Begin building the next generation (``GenerationBusy`` while one is building;
        ``InvalidReaderSettings``/``ValueError`` for one that could not start: nothing is
        stored then)."""
        with self._lock:
            state = self._store.read().begin(kind, reader, self.runtime.settings)
            self._store.write(state)
            log.info("replay: building generation %d (%s, ops generation %d)", state.next.id,
                     kind, state.next.ops)  # fmt: skip
        self.sync(state)
        return state

    def sync(self, state: GenerationState | None = None) -> GenerationState:
        """Make this process's processors match the pointer; switch when the next generation
        has caught up (a views process)."""
        with self._lock:
            state = state or self._store.read()
            if state.repaired:  # an unreadable next generation: abandoned, on record
                log.error("replay: %s; abandoned, generation %d keeps serving", state.repaired,
                          state.current.id)  # fmt: skip
                self._store.write(state)
            rt = self.runtime
            if state.current.id != rt.generation.id:
                self._follow(state.current)
            state = self._give_up_failed(state)
            nxt = state.next
            if self.hosting is not None and (nxt is None or nxt.id != self.hosting):
                self._stop_next(self.hosting)  # abandoned (by another process, maybe)
            if nxt is None:
                return state
            problem = nxt.problem(state.current, rt.settings)
            if problem is not None:
                return self._abandon(state, problem)
            if rt.stores is not None and NEXT_VIEWS not in rt.host.slots:
                self.next_stores = rt.stores.for_generation(nxt)
                self._host(NEXT_VIEWS, rt.views(self.next_stores), nxt)
            if (
                "reader" in rt.processors
                and nxt.ops != state.current.ops
                and NEXT_READER not in rt.host.slots
            ):
                self._host(NEXT_READER, rt.reader(nxt), nxt)
            if rt.stores is not None and self._caught_up(state):
                state = self._switch(state)
            return state

    def _host(self, name: str, factory: Any, nxt: Generation) -> None:
        """Host a next-generation processor; if it keeps failing, the host gives up on it
        (not on the process) and the replay is abandoned at the next sync."""

        def gave_up(processor: str, error: str | None) -> None:
            with self._given_up_lock:
                self._given_up.append((nxt.id, processor, error))

        self.hosting = nxt.id
        self.runtime.host.add(name, factory, on_give_up=gave_up)

    def _give_up_failed(self, state: GenerationState) -> GenerationState:
        """Abandon the next generation if the host gave up on one of its processors."""
        with self._given_up_lock:
            given_up, self._given_up = self._given_up, []
        for generation, processor, error in given_up:
            if state.next is not None and state.next.id == generation:
                host = self.runtime.host
                state = self._abandon(state, f"its processor {processor} failed "
                                             f"{host.max_failures} times in {host.window_s:.0f}"
                                             f" s (last: {error})")  # fmt: skip
        return state

    def _abandon(self, state: GenerationState, reason: str) -> GenerationState:
        """Give up on the next generation: on record in the pointer, its processors stopped and
        what was built of it dropped; the current generation serves on."""
        nxt = state.next
        assert nxt is not None
        abandoned = state.abandoned(reason)
        self._store.write(abandoned)
        log.error("replay: generation %d (%s, ops generation %d) abandoned: %s; generation %d "
                  "keeps serving", nxt.id, nxt.kind, nxt.ops, reason,
                  state.current.id)  # fmt: skip
        self._stop_next(nxt.id)
        return abandoned

    def _stop_next(self, generation: int) -> None:
        """Stop this process's processors of an abandoned next generation and drop its views
        (best effort: a failure leaves garbage behind, never a process down)."""
        rt = self.runtime
        for name in (NEXT_READER, NEXT_VIEWS):
            rt.host.remove(name)
        self.hosting = None
        stores, self.next_stores = self.next_stores, None
        if stores is None:
            return
        try:
            stores.drop()
            self._delete_group(stores.generation.views_group(rt.settings))
        except Exception:
            log.exception("replay: dropping abandoned generation %d failed (drop it by hand)",
                          generation)  # fmt: skip

    def _caught_up(self, state: GenerationState) -> bool:
        nxt, s = state.next, self.runtime.settings
        assert nxt is not None
        views = self.runtime.host.get(NEXT_VIEWS)
        if not isinstance(views, ViewsProcessor) or not views.caught_up():
            return False
        questions = {MEMORY_OPS.name: (nxt.views_group(s), s.topic(MEMORY_OPS.name))}
        if nxt.ops != state.current.ops:  # a re-extraction: its writer must have caught up too
            group = nxt.reader_group(s)
            questions |= {t.name: (group, s.topic(t.name)) for t in (INTERACTIONS, COMMANDS)}
        found = lags(s, questions)
        for value in found.values():
            if isinstance(value, Exception):
                raise value
        return not any(found.values())

    def _switch(self, state: GenerationState) -> GenerationState:
        rt, new_stores = self.runtime, self.next_stores
        assert new_stores is not None and rt.stores is not None
        switched = state.switched()
        old_stores, old = rt.stores, state.current
        new_stores.activate()
        rt.stores = new_stores  # the API answers from the new generation from here on
        self._store.write(switched)
        self._follow(switched.current)
        self.switches += 1
        log.info("replay: switched the views from generation %d to %d", old.id,
                 switched.current.id)  # fmt: skip
        try:
            old_stores.drop()
            self._delete_group(old.views_group(rt.settings))
        except Exception:
            log.exception("replay: dropping generation %d failed (drop it by hand)", old.id)
        return switched

    def _follow(self, current: Generation) -> None:
        """The live processors become those of ``current`` (promoted, or started afresh)."""
        rt, host = self.runtime, self.runtime.host
        if rt.stores is not None:
            if NEXT_VIEWS in host.slots:
                host.promote(NEXT_VIEWS, "views")
                if self.next_stores is not None:
                    rt.stores = self.next_stores
            elif rt.stores.generation.id != current.id:
                rt.stores = rt.stores.for_generation(current)
                host.remove("views")
                host.add("views", rt.views(rt.stores))
            self.next_stores = None
        if "reader" in rt.processors:
            if NEXT_READER in host.slots:
                host.promote(NEXT_READER, "reader")
            elif rt.generation.ops != current.ops:
                host.remove("reader")
                host.add("reader", rt.reader(current))
        if self.hosting == current.id:
            self.hosting = None  # its processors are the live ones now
        rt.generation = current

    def _delete_group(self, group: str) -> None:
        admin = AdminClient({"bootstrap.servers": self.runtime.settings.kafka_bootstrap})
        for future in admin.delete_consumer_groups([group], request_timeout=10).values():
            future.result(15)

    def progress(self) -> dict[str, Any]:
        """The pointer and how far the next generation's processors are."""
        state = self.state()
        body: dict[str, Any] = {**state.to_json(), "switches": self.switches}
        for name in (NEXT_VIEWS, NEXT_READER):
            instance = self.runtime.host.get(name)
            if instance is not None:
                body[name] = instance.stats()
        return body


class GenerationWatcher(Processor):
    """Follows the generation pointer once a second (see :class:`Replay`)."""

    name = "generations"
    inputs = ("minio:generations",)
    outputs = ("the next generation's processors", "the views switch")
    state = "none (the pointer is in MinIO)"

    def __init__(self, runtime: Runtime, every_s: float = 1.0) -> None:
        self.runtime = runtime
        self.every_s = every_s
        self.checks = 0

    def open(self) -> None:
        pass

    def step(self) -> None:
        time.sleep(self.every_s)
        self.runtime.replay.sync()
        self.checks += 1

    def ready(self) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        return {"generation": self.runtime.generation.id, "checks": self.checks}

"""Which processors a ``memstream serve --role`` process runs, and the parts they share.

- ``reader``: the writer (MemReader + commands). Run N of them: they split the partitions of
  ``interactions``/``commands`` in one consumer group; the embedder is the cost, partitions are
  the unit of parallelism.
- ``views``: the sinks, the search working set, the audit writer and the Faust agents, and the
  query API. With embedded stores (milvus-lite, chdb: one process per data dir) run one; with a
  Milvus and a ClickHouse server, N split the ``memory-ops`` partitions.
- ``all``: both, in one process (the default, one machine).

Every role serves ``/healthz``, ``/readyz`` and ``/v1/status`` and accepts published events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from processors.embedder import Embedder
from processors.extract import Extractor
from processors.fold import Memory
from schemas import Codec
from sinks.blobs import BlobStore
from streams.pipeline.activation import ActivationProcessor
from streams.pipeline.agents import AccessStatsAgent
from streams.pipeline.agents.scheduler import SchedulerAgent
from streams.pipeline.audit import AuditProcessor
from streams.pipeline.build import (
    Stores,
    default_extractor,
    embedder_for,
    generation_store,
    snapshot_store,
)
from streams.pipeline.parameter import AdapterRecorder, adapters_in, parameter_processor
from streams.pipeline.reader import ReaderProcessor
from streams.pipeline.replay import GenerationWatcher, Replay
from streams.pipeline.views import ViewsProcessor
from streams.runtime.foreground import Foreground
from streams.runtime.generations import Generation, GenerationStore
from streams.runtime.host import Factory, Host
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings
from streams.transport.topics import TopicsAtStart, topics_at_start

if TYPE_CHECKING:
    from processors.lm import LocalLM

ROLES: dict[str, tuple[str, ...]] = {
    "reader": ("reader", "generations"),
    "views": (
        "views",
        "audit",
        "access-stats",
        "scheduler",
        "activation",
        "parameter",
        "generations",
    ),
    "all": (
        "reader",
        "views",
        "audit",
        "access-stats",
        "scheduler",
        "activation",
        "parameter",
        "generations",
    ),
}


@dataclass
class Runtime:
    """A process's host and the shared parts its API needs (``stores`` only with views).

    ``generation`` is the view generation its live processors build; ``stores`` are that
    generation's (a replay switches both, see :mod:`streams.pipeline.replay`).
    """

    settings: Settings
    role: str
    host: Host
    embedder: Embedder
    stores: Stores | None
    generation: Generation = field(default_factory=Generation)
    snapshots: SnapshotStore | None = None
    generations: GenerationStore | None = None
    codec: Codec = field(default_factory=Codec)
    extractor: Extractor | None = None
    #: When the API last served a search or a chat turn: background LM work waits for a pause.
    foreground: Foreground = field(default_factory=Foreground)
    #: The topics when the process started: created, or why they could not be (``/readyz``).
    topics: TopicsAtStart = field(default_factory=TopicsAtStart)
    replay: Replay = field(init=False)

    def __post_init__(self) -> None:
        self.replay = Replay(self)

    @property
    def processors(self) -> tuple[str, ...]:
        return ROLES[self.role]

    def views_processor(self) -> ViewsProcessor | None:
        """The live views processor (None while it restarts, or in a reader process)."""
        views = self.host.get("views")
        return views if isinstance(views, ViewsProcessor) else None

    def memories(self) -> list[Memory]:
        """Every memory state the live views fold (the partitions this worker owns)."""
        views = self.views_processor()
        if views is None:
            return []
        return [m for table in list(views.folds.values()) for m in list(table.memories.values())]

    def lm(self) -> LocalLM:
        """The local LM of this process, loaded on first use (chat, activation memory)."""
        from processors.lm import load_lm

        s = self.settings
        return load_lm(s.effective_lm_dir, s.lm_model, threads=s.lm_threads or None)

    def reader(self, generation: Generation) -> Factory:
        """A factory of the writer of ``generation``'s extraction."""
        if self.extractor is None or self.snapshots is None:
            raise ValueError(f"role {self.role!r} runs no reader")
        extractor, snapshots = self.extractor, self.snapshots
        return lambda: ReaderProcessor(
            self.settings, self.embedder, extractor, snapshots, self.codec, generation
        )

    def views(self, stores: Stores) -> Factory:
        """A factory of the views processor that builds ``stores`` (one generation's)."""
        if self.snapshots is None:
            raise ValueError("no snapshot store")
        snapshots = self.snapshots
        return lambda: ViewsProcessor(self.settings, stores, snapshots, self.codec)


def build_runtime(
    settings: Settings,
    role: str | None = None,
    embedder: Embedder | None = None,
    extractor: Extractor | None = None,
    extra: dict[str, Factory] | None = None,
) -> Runtime:
    """Open the parts a role needs and a host with its processors (not started), for the
    current generation; a replay in progress resumes with the generations processor. The
    topics of ``settings.topic_prefix`` that do not exist yet are created first (a new prefix
    needs no ``memstream infra up``); when they cannot be, ``runtime.topics.reason`` says why."""
    role = role or settings.role
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    names = ROLES[role]
    topics = topics_at_start(settings)
    embedder = embedder or embedder_for(settings)
    generations = generation_store(settings)
    current = generations.read().current
    stores = Stores(settings, embedder, current) if "views" in names else None
    if stores is not None:
        stores.activate()
    runtime = Runtime(
        settings,
        role,
        Host({}),
        embedder,
        stores,
        current,
        snapshot_store(settings),
        generations,
        Codec(),
        (extractor or default_extractor(settings)) if "reader" in names else None,
        topics=topics,
    )
    factories: dict[str, Factory] = {}
    if "reader" in names:
        factories["reader"] = runtime.reader(current)
    if stores is not None:
        factories["views"] = runtime.views(stores)
        factories["audit"] = lambda: AuditProcessor(settings, stores, runtime.codec)
    if "access-stats" in names:
        factories["access-stats"] = lambda: AccessStatsAgent(settings, runtime.codec)
    if "scheduler" in names:
        factories["scheduler"] = lambda: SchedulerAgent(settings, runtime.codec)
    if "activation" in names and settings.activation_memory:
        factories["activation"] = lambda: ActivationProcessor(
            settings, runtime.views_processor, runtime.lm, BlobStore.from_settings(settings),
            runtime.codec, foreground=runtime.foreground,
        )  # fmt: skip
    if "parameter" in names and settings.parameter_memory:
        factories["parameter"] = lambda: parameter_processor(
            settings, runtime.memories, AdapterRecorder(settings, runtime.memories),
            current=lambda: adapters_in(runtime.memories()),
        )  # fmt: skip
    factories["generations"] = lambda: GenerationWatcher(runtime)
    factories.update(extra or {})
    runtime.host = Host(factories)
    return runtime

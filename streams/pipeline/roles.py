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

from dataclasses import dataclass

from processors.embedder import Embedder
from processors.extract import Extractor
from schemas import Codec
from streams.pipeline.agents import AccessStatsAgent
from streams.pipeline.audit import AuditProcessor
from streams.pipeline.build import Stores, default_extractor, embedder_for, snapshot_store
from streams.pipeline.reader import ReaderProcessor
from streams.pipeline.views import ViewsProcessor
from streams.runtime.host import Factory, Host
from streams.settings import Settings

ROLES: dict[str, tuple[str, ...]] = {
    "reader": ("reader",),
    "views": ("views", "audit", "access-stats"),
    "all": ("reader", "views", "audit", "access-stats"),
}


@dataclass
class Runtime:
    """A process's host and the shared parts its API needs (``stores`` only with views)."""

    settings: Settings
    role: str
    host: Host
    embedder: Embedder
    stores: Stores | None


def build_runtime(
    settings: Settings,
    role: str | None = None,
    embedder: Embedder | None = None,
    extractor: Extractor | None = None,
    extra: dict[str, Factory] | None = None,
) -> Runtime:
    """Open the parts a role needs and a host with its processors (not started)."""
    role = role or settings.role
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    names = ROLES[role]
    codec = Codec()
    embedder = embedder or embedder_for(settings)
    snapshots = snapshot_store(settings)
    stores = Stores(settings, embedder) if "views" in names else None
    factories: dict[str, Factory] = {}
    if "reader" in names:
        the_extractor = extractor or default_extractor(settings)
        factories["reader"] = lambda: ReaderProcessor(
            settings, embedder, the_extractor, snapshots, codec
        )
    if stores is not None:
        factories["views"] = lambda: ViewsProcessor(settings, stores, snapshots, codec)
        factories["audit"] = lambda: AuditProcessor(settings, stores, codec)
    if "access-stats" in names:
        factories["access-stats"] = lambda: AccessStatsAgent(settings, codec)
    factories.update(extra or {})
    return Runtime(settings, role, Host(factories), embedder, stores)

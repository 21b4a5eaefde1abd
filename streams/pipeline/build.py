"""The parts a process builds once and its processors share: embedder, extractor, view stores.

Embedded engines allow one client per process (milvus-lite per data file, chdb per directory),
and the embedder takes seconds to load, so these are opened here, once, and handed to the
processors; a restarted processor gets the same ones.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from processors.embedder import Embedder, load_embedder
from processors.extract import Extractor, LLMExtractor, RuleExtractor
from sinks.audit_sql import AuditSQL
from sinks.clickhouse import ClickHouseSink
from sinks.stores import clickhouse_client, milvus_view, minio_client
from sinks.vault import VaultSink
from streams.query.search import Searcher
from streams.runtime.generations import Generation, GenerationStore
from streams.runtime.host import name_os_thread
from streams.runtime.snapshots import SnapshotStore
from streams.settings import Settings

#: Run in each embedder thread: named "embed" for the OS (``top -H``, ``bench/cpu.py``). One
#: object, so ``load_embedder``'s cache (keyed by its arguments) still loads the model once.
_NAME_EMBED_THREAD = partial(name_os_thread, "embed")


def embedder_for(settings: Settings) -> Embedder:
    """The configured embedder, loaded once per process (ONNX exports cached in the tools dir)."""
    return load_embedder(settings.embedder, settings.tools_dir / "onnx",
                         on_thread_start=_NAME_EMBED_THREAD)  # fmt: skip


def default_extractor(settings: Settings) -> Extractor:
    if settings.llm_base_url:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else ""
        return LLMExtractor(settings.llm_base_url, settings.llm_model, key)
    return RuleExtractor()


def snapshot_store(settings: Settings) -> SnapshotStore:
    return SnapshotStore(minio_client(settings), settings.minio_bucket)


def generation_store(settings: Settings) -> GenerationStore:
    return GenerationStore(minio_client(settings), settings.minio_bucket, settings)


class Stores:
    """The view stores of one generation of a views process and the search over them.

    ``lock`` serialises the embedded engines' clients between the views writer, the audit
    writer and the API's reads (chdb and milvus-lite clients are not safe to share unguarded).
    A replay's next generation shares the clients and the lock (:meth:`for_generation`): one
    embedded engine per process.
    """

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        generation: Generation | None = None,
        *,
        shared: Stores | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.generation = generation or Generation()
        g = self.generation
        if shared is None:
            self.milvus = milvus_view(settings, g.collection)
            self.clickhouse = ClickHouseSink(clickhouse_client(settings), g.ops_table)
            self.vault = VaultSink(minio_client(settings), settings.minio_bucket)
            self.lock = threading.Lock()
        else:
            with shared.lock:
                self.milvus = milvus_view(settings, g.collection, shared.milvus.client)
                self.clickhouse = ClickHouseSink(shared.clickhouse.client, g.ops_table)
            self.vault = shared.vault
            self.lock = shared.lock
        self.searcher = Searcher(self.milvus, embedder, settings.search_budget_rows)

    def for_generation(self, generation: Generation) -> Stores:
        """Fresh stores for another generation, on the same clients."""
        return Stores(self.settings, self.embedder, generation, shared=self)

    def activate(self) -> None:
        """Make these the stores other readers see: the Milvus alias, the ClickHouse views."""
        with self.lock:
            self.milvus.activate()
            self.clickhouse.activate()

    def drop(self) -> None:
        """Drop this (retired) generation's collection and ops table."""
        with self.lock:
            self.milvus.drop()
            self.clickhouse.drop()

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return self.clickhouse.history(memory_id)

    def audit(self, sql: str) -> list[dict[str, Any]]:
        """User SQL through the one audit executor; raises :class:`sinks.audit_sql.AuditError`."""
        with self.lock:
            return AuditSQL(self.clickhouse.client).run(sql).records()

    def rows(self, expr: str, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.milvus.rows(expr, limit)

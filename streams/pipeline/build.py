"""The parts a process builds once and its processors share: embedder, extractor, view stores.

Embedded engines allow one client per process (milvus-lite per data file, chdb per directory),
and the embedder takes seconds to load, so these are opened here, once, and handed to the
processors; a restarted processor gets the same ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from processors.embedder import Embedder, load_embedder
from processors.extract import Extractor, LLMExtractor, RuleExtractor
from sinks.audit_sql import AuditSQL, AuditUnavailable
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

    Each store has a lock of its own: ``milvus_lock`` serialises the milvus-lite client between
    the views writer and the API's listings, ``clickhouse_lock`` the ClickHouse client between
    the views writer and the audit writer (chdb and milvus-lite clients are not safe to share
    unguarded); the vault's MinIO client is thread-safe. :meth:`locked` takes both, in one
    order. A replay's next generation shares the clients and the locks
    (:meth:`for_generation`): one embedded engine per process.

    Reads of ClickHouse that may take long (audit SQL, a memory's history) take no lock: each
    opens a read connection of its own (:meth:`reading`). chdb 4.x hosts one engine per process
    but any number of connections to it, each with its own session, and runs queries on
    different connections in parallel (the GIL is released while one runs): while a 22 s query
    ran on one, inserts and reads on another took 14 ms on average (0.38 s at most, on 2 busy
    cores). A server URL gets an HTTP client per read, as any client would.
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
            self.milvus_lock = threading.Lock()
            self.clickhouse_lock = threading.Lock()
        else:
            self.milvus_lock, self.clickhouse_lock = shared.milvus_lock, shared.clickhouse_lock
            with self.locked():
                self.milvus = milvus_view(settings, g.collection, shared.milvus.client)
                self.clickhouse = ClickHouseSink(shared.clickhouse.client, g.ops_table)
            self.vault = shared.vault
        self.searcher = Searcher(self.milvus, embedder, settings.search_budget_rows)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Both store locks (Milvus first, always): for what changes both stores at once."""
        with self.milvus_lock, self.clickhouse_lock:
            yield

    def for_generation(self, generation: Generation) -> Stores:
        """Fresh stores for another generation, on the same clients."""
        return Stores(self.settings, self.embedder, generation, shared=self)

    def activate(self) -> None:
        """Make these the stores other readers see: the Milvus alias, the ClickHouse views."""
        with self.locked():
            self.milvus.activate()
            self.clickhouse.activate()

    def drop(self) -> None:
        """Drop this (retired) generation's collection and ops table."""
        with self.locked():
            self.milvus.drop()
            self.clickhouse.drop()

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A ClickHouse client of its own for one read, closed after: it never waits for the
        writer's lock, nor the writer for it (opening one on chdb takes ~8 ms)."""
        client = clickhouse_client(self.settings)
        try:
            yield client
        finally:
            client.close()

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        """Every version of the memory and of those it replaced or that replaced it, on a read
        connection: its lineage walk is a query per hop, and the writer need not wait for it."""
        with self.reading() as client:
            return self.clickhouse.history(memory_id, client=client)

    def audit(self, sql: str) -> list[dict[str, Any]]:
        """User SQL through the one audit executor, on a read connection of its own (a query
        may run for the audit time limit: neither the writer nor another audit waits for it);
        raises :class:`sinks.audit_sql.AuditError`."""
        try:
            client = clickhouse_client(self.settings)
        except Exception as exc:  # chdb and clickhouse-connect raise their own kinds
            raise AuditUnavailable("UNAVAILABLE", "ClickHouse could not be reached") from exc
        try:
            return AuditSQL(client).run(sql).records()
        finally:
            client.close()

    def rows(self, expr: str, limit: int) -> list[dict[str, Any]]:
        with self.milvus_lock:
            return self.milvus.rows(expr, limit)

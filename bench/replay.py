"""The rebuild's speed: a log of N ops folded into fresh views, stage by stage, in one run.

A view is the fold of ``memory-ops`` (the truth) written to a store, so losing a store, changing
its schema or adding one means replaying the whole log into it. This benchmark publishes N
synthetic ops with a realistic mix (ADDs with 384-dim float32 embeddings, repeats as MERGE
pairs, changed facts as UPDATE + ADD, scheduler ACTIVATE/DEACTIVATE, lifecycle ARCHIVE,
RESTORE, EXPIRE, DELETE) on a fresh topic prefix, then measures, on the same log:

1. the Kafka read + decode rate (the runtime's catch-up reader), and the fold alone (decode +
   :class:`~processors.fold.MemoryTable` apply, one table per partition);
2. each sink alone, fed the folded states and ops in the batches the views processor uses
   (2,000 messages): Milvus (``MilvusSink.write`` + the final flush), ClickHouse
   (``write_ops``), the vault, the search working set (``Searcher.apply``);
3. the whole rebuild: a fresh :class:`~streams.pipeline.views.ViewsProcessor` (its consumer
   group has no committed offsets, so it folds from offset 0 exactly like a rebuild) on fresh
   stores, in a process of its own (chdb allows one engine directory per process), until it has
   caught up;
4. each store's own bulk-insert rate (the ceiling): raw pymilvus inserts of prebuilt rows, raw
   clickhouse-connect inserts of the very rows ``write_ops`` builds, raw MinIO puts of the vault's
   objects (the vault only gets archived memories).

It checks that the rebuilt views hold what the fold says (Milvus rows = searchable memories,
ClickHouse rows = ops, vault objects = archived memories, working set = searchable memories),
prints a table, writes ``results/replay-<N>.json``, and deletes its topics, consumer group,
buckets and data directories (``--keep`` leaves them).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench import report, synthetic
from processors.fold import Memory, MemoryTable
from processors.ops import (
    embedding_bytes,
    embedding_vector,
    make_op,
    memory_id,
    op_event_id,
    plaintext_payload,
)
from schemas import Codec
from sinks.clickhouse import ClickHouseSink
from sinks.milvus import row_fields
from sinks.stores import clickhouse_client, milvus_view, minio_client
from sinks.vault import VaultSink, vault_key
from streams.settings import Settings
from streams.transport.consumer import Event
from streams.transport.topics import ALL_TOPICS, MEMORY_OPS, admin_client, ensure_topics

BATCH = 2000  # messages per step of the views processor (one poll + consume(1999))
PUBLISH_BATCH = 5000
MILVUS_CEILING_BATCH = 10_000
MILVUS_CEILING_ROWS = 100_000  # milvus-lite takes ~2-3k rows/s: the first 100k tell the rate
CLICKHOUSE_CEILING_BATCH = 100_000
MINIO_CEILING_OBJECTS = 2000
VECTOR_POOL = 8192  # distinct unit vectors; memory i carries vector i mod the pool

# Decisions of the synthetic writer and their weights. MERGE and UPDATE decisions are two ops
# each (the old memory's and the new one's), as the reader emits them.
DECISIONS = (
    ("add", 38.0),
    ("merge", 6.0),
    ("update", 6.0),
    ("schedule", 30.0),  # ACTIVATE or DEACTIVATE, whichever the memory allows
    ("archive", 1.0),
    ("restore", 0.3),
    ("expire", 0.7),
    ("delete", 0.7),
)
SPEAKERS = ("Caroline", "Melanie", "Jon", "Gina", "Audrey", "Andrew", "Evan", "Sam")
PHRASES = (
    "I moved to a flat near the river last month and the light in the mornings is wonderful",
    "we are planning a trip to the mountains in spring, probably with the kids",
    "my new job at the design studio starts on Monday and I am a bit nervous about it",
    "I finally finished the painting of the lighthouse I started two years ago",
    "the adoption agency called back and the interview is next week",
    "I have been running every morning and signed up for a half marathon",
    "my favourite book this year was a novel about a family of beekeepers",
    "we adopted a second dog, a very shy greyhound called Pixel",
)


class _Pool:
    """A set that picks a random member in O(1) (swap-remove)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: str) -> None:
        self.pos[item] = len(self.items)
        self.items.append(item)

    def remove(self, item: str) -> None:
        i = self.pos.pop(item)
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i

    def pick(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]


def _text(i: int) -> str:
    return f"{SPEAKERS[i % len(SPEAKERS)]} said: {PHRASES[(i // 8) % len(PHRASES)]} (note {i})."


def _key(i: int) -> str | None:
    return f"subject-{i % 211}" if i % 3 == 0 else None


def _tags(i: int) -> list[str]:
    return [f"t{i % 17}", f"topic{i % 5}"]


def mixed_ops(
    n: int, cubes: int, seed: int = synthetic.SEED, dim: int = 384
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Exactly ``n`` ops of a realistic op log, as ``(cube_id, op)`` in log order; deterministic.

    Every op is valid for the memory's state (the fold refuses none): the writer keeps each
    memory's version and status. ADD and the new memory of a MERGE carry a 384-dim float32
    embedding and a sentence-length text; the closing UPDATE of a changed fact carries the old
    memory's content with its ``valid_to`` set, as the reader writes it.
    """
    rng = random.Random(seed)
    vrng = np.random.default_rng(seed)
    pool = vrng.normal(size=(VECTOR_POOL, dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    vectors = [embedding_bytes(v) for v in pool]
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    kinds, weights = zip(*DECISIONS, strict=True)
    # memory id -> [cube, version, status, activated, closed, index, valid_from, source id]
    state: dict[str, list[Any]] = {}
    active, archived = _Pool(), _Pool()
    emitted = made = commands = 0

    def payload(i: int, at: datetime, src: str, **extra: Any) -> tuple[str, dict[str, Any]]:
        return plaintext_payload(
            _text(i), vectors[i % VECTOR_POOL], "synthetic", key=_key(i), tags=_tags(i),
            valid_from=at, source={"event_id": src, "session_id": f"session-{i // 40}",
                                   "turn_id": f"D{i // 40}:{i % 40}", "topic": None,
                                   "partition": None, "offset": None}, **extra,
        )  # fmt: skip

    def op(kind: str, mid: str, version: int, at: datetime, cause: str, **fields: Any) -> dict:
        s = state[mid]
        return make_op(event_id=op_event_id(cause, 0, kind, mid), cube_id=s[0], memory_id=mid,
                       version=version, op=kind, event_time=at, actor="bench/replay",
                       caused_by=[cause], **fields)  # fmt: skip

    def new_memory(cube: str, at: datetime) -> tuple[str, int, str]:
        nonlocal made
        i, made = made, made + 1
        src = f"interaction-{i}"
        mid = memory_id(cube, src, 0)
        state[mid] = [cube, 1, "active", False, False, i, at, src]
        active.add(mid)
        return mid, i, src

    def bump(mid: str, status: str | None = None) -> int:
        s = state[mid]
        s[1] += 1
        if status is not None and status != s[2]:
            if s[2] == "active":
                active.remove(mid)
            elif s[2] == "archived":
                archived.remove(mid)
            s[2] = status
            if status == "active":
                active.add(mid)
            elif status == "archived":
                archived.add(mid)
        return int(s[1])

    while emitted < n:
        at = t0 + timedelta(seconds=emitted)
        kind = rng.choices(kinds, weights)[0]
        if kind in ("merge", "update") and (emitted + 2 > n or not active):
            kind = "add"
        if kind in ("schedule", "archive", "expire", "delete") and not active:
            kind = "add"
        if kind == "restore" and not archived:
            kind = "schedule" if active else "add"
        if kind == "add":
            cube = f"cube-{rng.randrange(cubes)}"
            mid, i, src = new_memory(cube, at)
            yield cube, op("ADD", mid, 1, at, src, reason="extracted", payload=payload(i, at, src))
            emitted += 1
            continue
        if kind in ("merge", "update"):
            old = active.pick(rng)
            o = state[old]
            if kind == "update" and o[4]:
                kind = "merge"  # a fact already closed is not updated again; it is repeated
            cube = o[0]
            new, i, src = new_memory(cube, at)
            if kind == "merge":
                reason = f"repeat of {old} (cosine 0.971)"
                v = bump(old, "merged")
                yield cube, op("MERGE", old, v, at, src, superseded_by=new, reason=reason)
                yield cube, op("MERGE", new, 1, at, src, supersedes=[old], reason=reason,
                               payload=payload(i, o[6], src))  # fmt: skip
            else:
                reason = f"newer fact about {_key(o[5]) or 'subject'}"
                closed = payload(o[5], o[6], o[7], valid_to=at)
                o[4] = True
                v = bump(old)
                yield cube, op("UPDATE", old, v, at, src, superseded_by=new, reason=reason,
                               payload=closed)  # fmt: skip
                yield cube, op("ADD", new, 1, at, src, supersedes=[old], reason=reason,
                               payload=payload(i, at, src))  # fmt: skip
            emitted += 2
            continue
        commands += 1
        cause = f"command-{commands}"
        if kind == "restore":
            mid = archived.pick(rng)
            yield state[mid][0], op("RESTORE", mid, bump(mid, "active"), at, cause)
        else:
            mid = active.pick(rng)
            s = state[mid]
            if kind == "schedule":
                s[3] = not s[3]
                yield s[0], op("ACTIVATE" if s[3] else "DEACTIVATE", mid, bump(mid), at, cause)
            elif kind == "archive":
                s[3] = False
                yield s[0], op("ARCHIVE", mid, bump(mid, "archived"), at, cause)
            elif kind == "expire":
                yield s[0], op("EXPIRE", mid, bump(mid, "expired"), at, cause)
            else:
                yield s[0], op("DELETE", mid, bump(mid, "deleted"), at, cause)
        emitted += 1


# recorders: the rows a sink would send, captured without a store ---------------------------


class _Recorder:
    """A stand-in client that keeps what a sink hands it (inserts, puts) instead of sending."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        self.objects: list[tuple[str, bytes]] = []

    def command(self, *args: Any, **kwargs: Any) -> None:
        return None

    def query(self, *args: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(column_names=[], result_rows=[])

    def insert(self, table: str, rows: list[list[Any]], column_names: Sequence[str]) -> None:
        self.columns = list(column_names)
        self.rows.extend(rows)

    def put_object(self, bucket: str, key: str, data: io.BytesIO, length: int,
                   **kwargs: Any) -> None:  # fmt: skip
        self.objects.append((key, data.read()))


class _NoEmbedder:
    """The views never embed (vectors are in the ops); nothing here searches."""

    model_id = "none"
    dim = 384

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError("the replay benchmark does not search")


# stages -------------------------------------------------------------------------------------


def _rate(count: int, seconds: float) -> int:
    return round(count / seconds) if seconds > 0 else 0


def _stage(ops: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"ops": ops, "seconds": round(seconds, 3), "ops_per_s": _rate(ops, seconds), **extra}


def _store_settings(prefix: str, data_dir: Path, bucket: str) -> Settings:
    """Settings of a process with fresh embedded stores in ``data_dir`` (milvus-lite, chdb)."""
    return Settings(topic_prefix=prefix, data_dir=data_dir, minio_bucket=bucket,
                    milvus_uri=None, clickhouse_url=None)  # fmt: skip


def _publish(settings: Settings, n: int, console: Console) -> tuple[float, Counter[str]]:
    from streams.transport.producer import EventProducer

    topic = settings.topic(MEMORY_OPS.name)
    cubes = min(500, max(10, n // 2000))
    mix: Counter[str] = Counter()
    published, seconds = 0, 0.0
    with EventProducer(settings) as producer, Progress(console=console) as progress:
        task = progress.add_task(f"publishing {n:,} ops", total=n)
        batch: list[tuple[str, dict[str, Any]]] = []
        log = mixed_ops(n, cubes)
        while published < n:
            batch = [item for _, item in zip(range(PUBLISH_BATCH), log, strict=False)]
            for _, op in batch:
                mix[op["op"]] += 1
            started = time.perf_counter()
            producer.publish_many(topic, MEMORY_OPS.record, batch)
            seconds += time.perf_counter() - started
            published += len(batch)
            progress.update(task, completed=published)
    return seconds, mix


def _read(settings: Settings) -> tuple[float, list[tuple[int, int, bytes | None, bytes]]]:
    """Every message of the log through the runtime's catch-up reader, decoded as it comes;
    the raw messages are kept (in consumed order) for the fold."""
    from confluent_kafka import Message

    from streams.transport.follower import read_partitions

    codec, topic = Codec(), settings.topic(MEMORY_OPS.name)
    raw: list[tuple[int, int, bytes | None, bytes]] = []

    def handle(msg: Message) -> None:
        codec.decode(msg.value(), reader=MEMORY_OPS.record)
        raw.append((msg.partition(), msg.offset(), msg.key(), msg.value()))

    started = time.perf_counter()
    read_partitions(settings, topic, dict.fromkeys(range(settings.partitions), 0), handle)
    return time.perf_counter() - started, raw


def _fold(
    topic: str, raw: list[tuple[int, int, bytes | None, bytes]]
) -> tuple[dict[str, float], dict[int, MemoryTable], list[tuple[list[Memory], list[Event]]]]:
    """The fold alone, timed as the views processor does it (decode, apply to the partition's
    table, keep nothing but the folds); then, untimed, the batches for the sinks (each batch's
    changed states and its events). Return the timings, the folds and the batches."""
    codec = Codec()
    decode_s = apply_s = 0.0
    timed: dict[int, MemoryTable] = {}
    clock = time.perf_counter
    for p, _, _, value in raw:
        t0 = clock()
        record = codec.decode(value, reader=MEMORY_OPS.record).record
        t1 = clock()
        table = timed.get(p)
        if table is None:
            table = timed[p] = MemoryTable()
        table.apply(record)
        apply_s += clock() - t1
        decode_s += t1 - t0
    del timed
    # Kept for every sink stage: a million events would make the collector rescan them all
    # the time, a cost the views processor (which keeps none) never pays; so build them with
    # the collector off, then freeze them out of its sight.
    gc.disable()
    try:
        tables: dict[int, MemoryTable] = {}
        batches = []
        for start in range(0, len(raw), BATCH):
            chunk = []
            changed: dict[str, Memory] = {}
            for p, offset, key, value in raw[start : start + BATCH]:
                d = codec.decode(value, reader=MEMORY_OPS.record)
                chunk.append(Event(topic, p, offset, key, d.name, d.writer_version, d.record, 0))
                table = tables.get(p)
                if table is None:
                    table = tables[p] = MemoryTable()
                for m in table.apply(d.record):
                    changed[m.memory_id] = m
            batches.append((list(changed.values()), chunk))
    finally:
        gc.enable()
    gc.freeze()
    return {"decode_s": decode_s, "apply_s": apply_s}, tables, batches


def _sinks_alone(
    settings: Settings, batches: list[tuple[list[Memory], list[Event]]], n: int
) -> tuple[dict[str, dict[str, Any]], dict[str, int], Any, Any]:
    """Each sink alone over the same batches; return the stages, the stores' counts and the
    (Milvus sink, chdb client) for the ceilings (one chdb directory per process)."""
    from streams.query.search import Searcher

    stages: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}

    milvus = milvus_view(settings)
    started = time.perf_counter()
    upserted = deleted = 0
    for states, _ in batches:
        up, gone = milvus.put(states)
        upserted, deleted = upserted + up, deleted + gone
    milvus.flush()
    seconds = time.perf_counter() - started
    rows = upserted + deleted
    stages["milvus_sink"] = _stage(n, seconds, rows=rows, upserted=upserted, deleted=deleted,
                                   rows_per_s=_rate(rows, seconds))  # fmt: skip
    counts["milvus_rows"] = milvus.count()

    client = clickhouse_client(settings)
    clickhouse = ClickHouseSink(client)
    started = time.perf_counter()
    written = sum(clickhouse.write_ops(events) for _, events in batches)
    seconds = time.perf_counter() - started
    stages["clickhouse_sink"] = _stage(n, seconds, rows=written, rows_per_s=_rate(written, seconds))
    counts["clickhouse_rows"] = clickhouse.count_ops()

    vault = VaultSink(minio_client(settings), settings.minio_bucket)
    started = time.perf_counter()
    objects = sum(vault.put(states) for states, _ in batches)
    seconds = time.perf_counter() - started
    stages["vault_sink"] = _stage(n, seconds, objects=objects,
                                  objects_per_s=_rate(objects, seconds))  # fmt: skip

    searcher = Searcher(milvus, _NoEmbedder())  # type: ignore[arg-type]
    started = time.perf_counter()
    for states, _ in batches:
        searcher.apply(states)
    seconds = time.perf_counter() - started
    stages["working_set"] = _stage(n, seconds)
    counts["working_set_memories"] = searcher.working_set.stats()["memories"]
    return stages, counts, milvus, client


def _ceilings(
    settings: Settings,
    milvus_of_sink: Any,
    chdb: Any,
    memories: list[Memory],
    batches: list[tuple[list[Memory], list[Event]]],
    bucket: str,
) -> dict[str, dict[str, Any]]:
    """Each store's own bulk-insert rate, on prebuilt rows (building them is not timed)."""
    out: dict[str, dict[str, Any]] = {}

    # Milvus: the end state's searchable rows, inserted raw in large batches, then flushed.
    searchable = [m for m in memories if m.searchable][:MILVUS_CEILING_ROWS]
    ceiling = milvus_view(settings, "replay_ceiling", milvus_of_sink.client)
    seconds = 0.0
    for start in range(0, len(searchable), MILVUS_CEILING_BATCH):
        rows = [{**row_fields(m), "vector": embedding_vector(m.embedding).tolist()}
                for m in searchable[start : start + MILVUS_CEILING_BATCH]]  # fmt: skip
        began = time.perf_counter()
        ceiling.client.insert(ceiling.collection, rows)
        seconds += time.perf_counter() - began
    began = time.perf_counter()
    ceiling.client.flush(ceiling.collection)
    seconds += time.perf_counter() - began
    out["milvus_insert"] = {"rows": len(searchable), "batch": MILVUS_CEILING_BATCH,
                            "seconds": round(seconds, 3),
                            "rows_per_s": _rate(len(searchable), seconds)}  # fmt: skip
    ceiling.client.drop_collection(ceiling.collection)

    # ClickHouse: the very rows write_ops builds (captured), inserted raw in large batches.
    target = ClickHouseSink(chdb, "replay_ceiling")  # the ops table's DDL, another name
    events = [e for _, chunk in batches for e in chunk]
    seconds, total = 0.0, 0
    for start in range(0, len(events), CLICKHOUSE_CEILING_BATCH):
        recorder = _Recorder()
        ClickHouseSink(recorder).write_ops(events[start : start + CLICKHOUSE_CEILING_BATCH])
        began = time.perf_counter()
        chdb.insert(target.ops_table, recorder.rows, column_names=recorder.columns)
        seconds += time.perf_counter() - began
        total += len(recorder.rows)
    out["clickhouse_insert"] = {"rows": total, "batch": CLICKHOUSE_CEILING_BATCH,
                                "seconds": round(seconds, 3),
                                "rows_per_s": _rate(total, seconds)}  # fmt: skip
    target.drop()

    # MinIO: the vault's own objects (archived memories), put raw; at least a few hundred so
    # the rate means something, cycling the bodies when the log archived fewer.
    recorder = _Recorder()
    VaultSink(recorder, bucket).put(m for m in memories if m.status == "archived")  # type: ignore[arg-type]
    bodies = recorder.objects or [("vault/none.json", b"{}")]
    count = min(MINIO_CEILING_OBJECTS, max(len(bodies), 300))
    client = minio_client(settings)
    began = time.perf_counter()
    for j in range(count):
        key, body = bodies[j % len(bodies)]
        client.put_object(bucket, f"ceiling/{j}/{key}", io.BytesIO(body), len(body),
                          content_type="application/json")  # fmt: skip
    seconds = time.perf_counter() - began
    out["minio_put"] = {"objects": count,
                        "bytes_mean": round(sum(len(b) for _, b in bodies) / len(bodies)),
                        "seconds": round(seconds, 3),
                        "objects_per_s": _rate(count, seconds)}  # fmt: skip
    return out


def rebuild(prefix: str, data_dir: Path, bucket: str, n: int) -> dict[str, Any]:
    """A fresh views processor on fresh stores, stepped until it has caught up with the log
    (run in a process of its own: chdb allows one engine directory per process)."""
    from sinks.stores import ensure_bucket
    from streams.pipeline.build import Stores, snapshot_store
    from streams.pipeline.views import ViewsProcessor

    console = Console()
    settings = _store_settings(prefix, data_dir, bucket)
    ensure_bucket(settings)
    stores = Stores(settings, _NoEmbedder())  # type: ignore[arg-type]
    processor = ViewsProcessor(settings, stores, snapshot_store(settings))

    def caught_up() -> bool:
        return (
            processor.ready()
            and len(processor.ends) == settings.partitions
            and sum(processor.ends.values()) >= n
            and all(processor.positions.get(p, 0) >= end for p, end in processor.ends.items())
        )

    steps, joined = 0, 0.0
    started = time.perf_counter()
    processor.open()
    try:
        with Progress(console=console) as progress:
            task = progress.add_task(f"rebuilding the views from {n:,} ops", total=n)
            while not caught_up():
                processor.step()
                steps += 1
                if not joined and processor.ends:  # the group's first assignment
                    joined = time.perf_counter() - started
                progress.update(task, completed=processor.counters["ops_folded"])
            if stores.milvus.unflushed:
                with stores.milvus_lock:
                    stores.milvus.flush()
        seconds = time.perf_counter() - started
        with stores.locked():
            milvus_rows = stores.milvus.count()
            clickhouse_rows = stores.clickhouse.count_ops()
        counters = processor.stats()
        ws = stores.searcher.working_set.stats()["memories"]
        generation = getattr(processor, "generation", None)
        group = generation.views_group(settings) if generation else settings.group("views")
    finally:
        processor.close()
    return {**_stage(counters["ops_folded"], seconds), "counters": counters,
            "milvus_rows": milvus_rows, "clickhouse_rows": clickhouse_rows,
            "working_set_memories": ws, "views_group": group, "steps": steps,
            "group_join_s": round(joined, 3),
            "mean_batch": round(counters["ops_folded"] / max(steps, 1), 1)}  # fmt: skip


def _rebuild_in_child(prefix: str, data_dir: Path, bucket: str, n: int) -> dict[str, Any]:
    data_dir.mkdir(parents=True, exist_ok=True)
    out = data_dir / "rebuild.json"
    args = json.dumps({"prefix": prefix, "data_dir": str(data_dir), "bucket": bucket, "n": n,
                       "out": str(out)})  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "bench.replay", "--rebuild-child", args], check=True,
                   cwd=root)  # fmt: skip
    return json.loads(out.read_text())


def _vault_keys(settings: Settings, bucket: str) -> set[str]:
    client = minio_client(settings)
    return {o.object_name for o in client.list_objects(bucket, prefix="vault/", recursive=True)}


def _cleanup(
    settings: Settings, buckets: Sequence[str], data_dir: Path, groups: Sequence[str]
) -> None:
    """Delete the run's topics, its views consumer group, its buckets and its data dirs."""
    admin = admin_client(settings)
    topics = [settings.topic(spec.name) for spec in ALL_TOPICS]
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        with suppress(Exception):  # a topic that is already gone is fine
            future.result()
    with suppress(Exception):  # so is a group that is already gone
        for future in admin.delete_consumer_groups(list(groups)).values():
            future.result()
    client = minio_client(settings)
    from minio.deleteobjects import DeleteObject

    for bucket in buckets:
        if not client.bucket_exists(bucket):
            continue
        names = [DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True)]
        for error in client.remove_objects(bucket, names):
            raise RuntimeError(f"could not delete {error.name} from {bucket}: {error.message}")
        client.remove_bucket(bucket)
    shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def _results_in(directory: Path | None) -> Iterator[None]:
    saved = report.RESULTS
    if directory is not None:
        report.RESULTS = directory
    try:
        yield
    finally:
        report.RESULTS = saved


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else ""


def table(results: dict[str, Any]) -> Table:
    """The stages in 80 columns: ops, seconds, ops/s, and % of the store's own ceiling (a
    sink's rows/s against the store's bulk rows/s; the rebuild against the serial estimate)."""
    s, c = results["stages"], results["ceilings"]
    t = Table(title=f"memstream bench replay: {results['ops']:,} ops", title_justify="left")
    t.add_column("stage")
    for name in ("ops", "seconds", "ops/s", "% of ceiling"):
        t.add_column(name, justify="right")

    def row(label: str, st: dict[str, Any], pct: str = "") -> None:
        t.add_row(label, f"{st['ops']:,}", f"{st['seconds']:.2f}", f"{st['ops_per_s']:,}", pct)

    row("publish (produce + ack)", s["publish"])
    row("kafka read + decode", s["kafka_read_decode"])
    row("fold (decode + apply)", s["fold"])
    row("milvus sink (write+flush)", s["milvus_sink"],
        _pct(s["milvus_sink"]["rows_per_s"], c["milvus_insert"]["rows_per_s"]))  # fmt: skip
    row("clickhouse sink (write_ops)", s["clickhouse_sink"],
        _pct(s["clickhouse_sink"]["rows_per_s"], c["clickhouse_insert"]["rows_per_s"]))  # fmt: skip
    row("vault sink", s["vault_sink"],
        _pct(s["vault_sink"]["objects_per_s"], c["minio_put"]["objects_per_s"]))  # fmt: skip
    row("working set apply", s["working_set"])
    row("serial estimate (sum)", s["serial_estimate"])
    row("whole rebuild (views)", s["rebuild"],
        _pct(s["rebuild"]["ops_per_s"], s["serial_estimate"]["ops_per_s"]))  # fmt: skip
    t.add_section()
    for label, ceiling, unit in (("milvus bulk insert (rows)", c["milvus_insert"], "rows"),
                                 ("clickhouse insert (rows)", c["clickhouse_insert"], "rows"),
                                 ("minio put (objects)", c["minio_put"], "objects")):  # fmt: skip
        t.add_row(label, f"{ceiling[unit]:,}", f"{ceiling['seconds']:.2f}",
                  f"{ceiling[unit + '_per_s']:,}", "")  # fmt: skip
    return t


def run(ops: int = 100_000, results_dir: Path | None = None, keep: bool = False) -> dict[str, Any]:
    console = Console()
    # A SIGTERM still runs the cleanup below (the topics, buckets and data of the run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = [round(x, 2) for x in os.getloadavg()]
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-replay-{run_id}."
    data_dir = Path(tempfile.mkdtemp(prefix="memstream-replay-"))
    alone_bucket, rebuild_bucket = f"bench-replay-{run_id}-alone", f"bench-replay-{run_id}"
    alone = _store_settings(prefix, data_dir / "alone", alone_bucket)
    ensure_topics(alone)
    from sinks.stores import ensure_bucket

    ensure_bucket(alone)
    topic = alone.topic(MEMORY_OPS.name)
    groups = [alone.group("views")]
    try:
        publish_s, mix = _publish(alone, ops, console)
        with console.status("reading the log back (catch-up reader, decoding)..."):
            read_s, raw = _read(alone)
        with console.status("folding (decode + MemoryTable.apply, views-sized batches)..."):
            timing, tables, batches = _fold(topic, raw)
        del raw
        memories = [m for t in tables.values() for m in t.memories.values()]
        searchable = sum(m.searchable for m in memories)
        archived = sum(m.status == "archived" for m in memories)
        with console.status("each sink alone (Milvus, ClickHouse, vault, working set)..."):
            stages, counts, milvus, chdb = _sinks_alone(alone, batches, ops)
        with console.status("each store's own bulk-insert rate..."):
            ceilings = _ceilings(alone, milvus, chdb, memories, batches, alone_bucket)
        milvus.client.drop_collection(milvus.collection)  # free milvus-lite's memory first
        milvus.client.close()
        ever_archived = {e.value["memory_id"] for _, chunk in batches for e in chunk
                         if e.value["op"] == "ARCHIVE"}  # fmt: skip
        del batches
        rebuilt = _rebuild_in_child(prefix, data_dir / "rebuild", rebuild_bucket, ops)
        groups.append(rebuilt["views_group"])
        # The vault keeps what was ever archived (a RESTORE leaves the object): it must hold
        # every memory archived now, and nothing of a memory never archived.
        vault = _vault_keys(alone, rebuild_bucket)
        archived_now = {vault_key(m) for m in memories if m.status == "archived"}
        vault_ok = archived_now <= vault <= {vault_key(m) for m in memories
                                             if m.memory_id in ever_archived}  # fmt: skip
        fold_s = timing["decode_s"] + timing["apply_s"]
        folded_ops = sum(len(t.seen) for t in tables.values())
        sinks = ("milvus_sink", "clickhouse_sink", "vault_sink", "working_set")
        serial_s = fold_s + sum(stages[k]["seconds"] for k in sinks)
        results: dict[str, Any] = {
            "ops": ops,
            "op_mix": dict(sorted(mix.items())),
            "memories": len(memories),
            "searchable": searchable,
            "archived": archived,
            "vault_objects_after_rebuild": len(vault),
            "partitions": alone.partitions,
            "views_batch": BATCH,
            "stages": {
                "publish": _stage(ops, publish_s),
                "kafka_read_decode": _stage(ops, read_s),
                "fold": _stage(
                    folded_ops,
                    fold_s,
                    decode_s=round(timing["decode_s"], 3),
                    apply_s=round(timing["apply_s"], 3),
                    apply_ops_per_s=_rate(folded_ops, timing["apply_s"]),
                ),
                **stages,
                "serial_estimate": _stage(ops, serial_s),
                "rebuild": rebuilt,
            },
            "ceilings": ceilings,
            "checks": {
                "fold_applied_every_op": folded_ops == ops,
                "sink_milvus_rows_eq_searchable": counts["milvus_rows"] == searchable,
                "sink_clickhouse_rows_eq_ops": counts["clickhouse_rows"] == ops,
                "sink_working_set_eq_searchable": counts["working_set_memories"] == searchable,
                "rebuild_folded_every_op": rebuilt["ops"] == ops,
                "rebuild_milvus_rows_eq_searchable": rebuilt["milvus_rows"] == searchable,
                "rebuild_clickhouse_rows_eq_ops": rebuilt["clickhouse_rows"] == ops,
                "rebuild_vault_holds_the_archived": vault_ok,
                "rebuild_working_set_eq_searchable": rebuilt["working_set_memories"] == searchable,
                "rebuild_dead_lettered_none": rebuilt["counters"]["dead_lettered"] == 0,
            },
            "topic_prefix": prefix,
            "cleaned_up": not keep,
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        if not keep:
            with console.status("deleting the run's topics, buckets and data..."):
                _cleanup(alone, [alone_bucket, rebuild_bucket], data_dir, groups)
    console.print(table(results))
    with _results_in(results_dir):
        path = report.write(f"replay-{ops}", results, Console(file=io.StringIO()))
    console.print(f"load average {results['load_average_before']} before, "
                  f"{results['load_average_after']} after; written {path}")  # fmt: skip
    failed = [name for name, ok in results["checks"].items() if not ok]
    if failed:
        raise AssertionError(f"the rebuilt views differ from the fold: {failed}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the topics, buckets, data")
    parser.add_argument("--rebuild-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rebuild_child:
        spec = json.loads(args.rebuild_child)
        done = rebuild(spec["prefix"], Path(spec["data_dir"]), spec["bucket"], spec["n"])
        Path(spec["out"]).write_text(json.dumps(done))
        return
    run(args.ops, args.results_dir, args.keep)


if __name__ == "__main__":
    main()

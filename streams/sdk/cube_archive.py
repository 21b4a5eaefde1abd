"""Cube export and import (MemOS's MemCube dump / load / share), through the log and the writer.

An export is a cube's op history in log order, read committed from its partition of
``memory-ops``, plus the bytes of every blob its payloads point to, as one Avro object container
file. Its schema is ``schemas/export/CubeExport.v1.avsc``, a union of the op and a blob chunk,
with the op branch filled in by the newest ``MemoryOp`` version the codec has; the file's header
carries that schema, so an export keeps every field the log had (``generation`` included), and
the header's metadata says what the file is (format and version, source cube and topic prefix,
op count, export time, and the sha256 of every entry's encoding).

An import reads and checks the whole file first (format, version, a MemoryOp schema the codec
knows, the op count and the digest, each blob's sha256), so a bad file publishes nothing. Then
each op becomes an IMPORT command (``processors.commands.import_command``) on ``commands``: the
one writer maps the ids into the target cube, assigns the versions from its fold and answers
every command on ``command-results``, which the importer reads back until each is answered.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import IO, Any

import fastavro
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from minio.error import S3Error

from processors.commands import import_command, payload_branch
from schemas import Codec, DecodeError
from schemas.codec import SCHEMA_DIR, schema_fingerprint
from sinks.stores import minio_client
from streams.settings import Settings
from streams.transport.consumer import raise_if_fatal
from streams.transport.follower import OpReader, read_partition
from streams.transport.producer import EventProducer, PublishError
from streams.transport.topics import (
    COMMAND_RESULTS,
    COMMANDS,
    MEMORY_OPS,
    partition_for,
    retry_kafka,
)

FORMAT = "memstream.cube-export"
FORMAT_VERSION = 1
TEMPLATE = SCHEMA_DIR / "export" / f"CubeExport.v{FORMAT_VERSION}.avsc"
OP = "memstream.v1.MemoryOp"
BLOB = "memstream.v1.CubeBlob"
CHUNK = 4 * 1024 * 1024
PUBLISH_BATCH = 1000

# stage, done, total (None: not known yet). The CLI draws it as a progress bar.
Progress = Callable[[str, int, int | None], None]


def _quiet(stage: str, done: int, total: int | None) -> None:
    """The default progress: none."""


class CubeArchiveError(Exception):
    """An export or import refused, with a one-line reason for the user."""


@dataclass(frozen=True)
class ExportSummary:
    cube: str
    target: str
    ops: int
    blobs: int
    bytes: int


@dataclass
class Archive:
    """A checked export file: its metadata, its ops (read as the newest MemoryOp), its blobs."""

    metadata: dict[str, str]
    ops: list[dict[str, Any]]
    blobs: dict[str, Blob] = field(default_factory=dict)

    @property
    def source_cube(self) -> str:
        return self.metadata["memstream.source_cube"]

    def close(self) -> None:
        """Drop the blobs' spooled bytes."""
        for blob in self.blobs.values():
            blob.data.close()


@dataclass
class Blob:
    """An object's bytes, spooled to disk past 64 MiB (a KV cache or an adapter can be large)."""

    uri: str
    sha256: str
    size: int
    data: IO[bytes]


def _spool() -> IO[bytes]:
    """Room for one blob's bytes; the :class:`Blob` holding it closes it."""
    return tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)


@dataclass(frozen=True)
class ImportSummary:
    cube: str
    source_cube: str
    commands: int
    statuses: dict[str, int]
    rejected: list[tuple[str, str]]  # (memory id, reason)


# the file schema -------------------------------------------------------------------------------


@cache
def file_schema() -> Any:
    """The export template with its op branch replaced by the newest MemoryOp schema (as written
    in its .avsc file, docs and defaults kept)."""
    latest = Codec().registry.latest("MemoryOp")
    op_schema = json.loads((SCHEMA_DIR / f"MemoryOp.v{latest.version}.avsc").read_text())
    union = [op_schema if branch == OP else branch for branch in json.loads(TEMPLATE.read_text())]
    return fastavro.parse_schema(union, named_schemas={})


def _encoded(schema: Any, entry: tuple[str, dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, entry)
    return buf.getvalue()


def _tagged(op: dict[str, Any]) -> dict[str, Any]:
    """The op with its payload's union branch named (a decoded payload is an untagged dict)."""
    payload = op.get("payload")
    if payload and not isinstance(payload, tuple):
        return {**op, "payload": (payload_branch(payload), payload)}
    return op


# export ----------------------------------------------------------------------------------------


def read_cube_ops(
    settings: Settings, cube: str, generation: int | None = None, progress: Progress = _quiet
) -> list[dict[str, Any]]:
    """The cube's ops in log order: its partition of memory-ops, committed transactions only,
    ops keyed by (and of) the cube, of ``generation`` if given (else all), through the follower
    (an op the codec cannot read is skipped, as every fold skips it)."""
    topic = settings.topic(MEMORY_OPS.name)
    partition = partition_for(cube, settings.partitions)
    end = _high_watermark(settings, topic, partition)
    reader, ops, seen = OpReader(settings, cube=cube, generation=generation), [], set()
    progress("reading ops", 0, end)

    def handle(msg: Message) -> None:
        progress("reading ops", msg.offset() + 1, end)
        event = reader.event(msg)
        if event is None or event.value["event_id"] in seen:
            return
        op = event.value
        seen.add(op["event_id"])
        ops.append(op)

    read_partition(settings, topic, partition, 0, handle)
    progress("reading ops", end, end)
    return ops


def export_cube(
    settings: Settings,
    cube: str,
    target: str,
    generation: int | None = None,
    progress: Progress = _quiet,
) -> ExportSummary:
    """Write the cube's ops and blobs to ``target`` (a path or ``s3://bucket/key``)."""
    ops = read_cube_ops(settings, cube, generation, progress)
    if not ops:
        which = "" if generation is None else f" of generation {generation}"
        raise CubeArchiveError(
            f"cube {cube!r} has no ops{which} in {settings.topic(MEMORY_OPS.name)}"
        )
    with _blobs_of(settings, ops, progress) as blobs:
        schema = file_schema()

        def entries() -> Iterator[tuple[str, dict[str, Any]]]:
            written: set[str] = set()
            for op in ops:
                blob = blobs.get(_blob_sha(op) or "")
                if blob is not None and blob.sha256 not in written:
                    written.add(blob.sha256)
                    yield from _chunks(blob)
                yield OP, _tagged(op)

        digest = hashlib.sha256()
        for entry in entries():
            digest.update(_encoded(schema, entry))
        metadata = {
            "memstream.format": FORMAT,
            "memstream.format_version": str(FORMAT_VERSION),
            "memstream.source_cube": cube,
            "memstream.source_prefix": settings.topic_prefix,
            "memstream.op_count": str(len(ops)),
            "memstream.blob_count": str(len(blobs)),
            "memstream.generation": "all" if generation is None else str(generation),
            "memstream.exported_at": datetime.now(UTC).isoformat(),
            "memstream.sha256": digest.hexdigest(),
        }

        def counted() -> Iterator[tuple[str, dict[str, Any]]]:
            done = 0
            for entry in entries():
                yield entry
                if entry[0] == OP:
                    done += 1
                    progress("writing", done, len(ops))

        with _writable(settings, target) as out:
            fastavro.writer(out, schema, counted(), codec="deflate", metadata=metadata)
            size = out.tell()
    return ExportSummary(cube, target, len(ops), len(blobs), size)


def _blob_sha(op: dict[str, Any]) -> str | None:
    payload = op.get("payload")
    if isinstance(payload, tuple):
        payload = payload[1]
    if payload and "uri" in payload and "sha256" in payload:
        return payload["sha256"]
    return None


def _chunks(blob: Blob) -> Iterator[tuple[str, dict[str, Any]]]:
    blob.data.seek(0)
    offset = 0
    while True:
        data = blob.data.read(CHUNK)
        if not data and offset:
            return
        yield BLOB, {"uri": blob.uri, "sha256": blob.sha256, "size": blob.size,
                     "offset": offset, "data": data}  # fmt: skip
        offset += len(data)
        if offset >= blob.size:
            return


@contextmanager
def _blobs_of(
    settings: Settings, ops: list[dict[str, Any]], progress: Progress
) -> Iterator[dict[str, Blob]]:
    """The objects the ops' payloads point to, read from MinIO and checked against their
    sha256 (an export never ships bytes that are not what the op says)."""
    wanted: dict[str, str] = {}
    for op in ops:
        sha = _blob_sha(op)
        if sha is not None:
            payload = op["payload"][1] if isinstance(op["payload"], tuple) else op["payload"]
            wanted.setdefault(sha, payload["uri"])
    blobs: dict[str, Blob] = {}
    try:
        if wanted:
            client = minio_client(settings)
            for done, (sha, uri) in enumerate(wanted.items(), 1):
                bucket, key = _object_of(uri, settings.minio_bucket)
                spool = _spool()
                blobs[sha] = Blob(uri, sha, 0, spool)
                try:
                    response = client.get_object(bucket, key)
                except S3Error as exc:
                    raise CubeArchiveError(f"blob {uri}: {exc.code} ({exc.message})") from None
                digest = hashlib.sha256()
                try:
                    for data in response.stream(CHUNK):
                        digest.update(data)
                        spool.write(data)
                finally:
                    response.close()
                    response.release_conn()
                if digest.hexdigest() != sha:
                    raise CubeArchiveError(f"blob {uri}: its bytes do not match sha256 {sha}")
                blobs[sha].size = spool.tell()
                progress("reading blobs", done, len(wanted))
        yield blobs
    finally:
        for blob in blobs.values():
            blob.data.close()


def _object_of(uri: str, bucket: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``, or of a bare key in the deployment's bucket."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket or not key:
            raise CubeArchiveError(f"{uri}: an s3 location is s3://bucket/key")
        return bucket, key
    return bucket, uri


# where files live ------------------------------------------------------------------------------


@contextmanager
def _writable(settings: Settings, target: str) -> Iterator[IO[bytes]]:
    """A file to write the export to; it appears at ``target`` (a path or an s3 object) only
    once it is complete."""
    if target.startswith("s3://"):
        bucket, key = _object_of(target, settings.minio_bucket)
        with tempfile.TemporaryFile() as out:
            yield out
            size = out.tell()
            out.seek(0)
            try:
                minio_client(settings).put_object(bucket, key, out, length=size)
            except S3Error as exc:
                raise CubeArchiveError(f"{target}: {exc.code} ({exc.message})") from None
        return
    path = Path(target)
    if not path.parent.is_dir():
        raise CubeArchiveError(f"{target}: no directory {path.parent}")
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with part.open("wb") as out:
            yield out
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


@contextmanager
def _readable(settings: Settings, source: str) -> Iterator[IO[bytes]]:
    if source.startswith("s3://"):
        bucket, key = _object_of(source, settings.minio_bucket)
        with tempfile.TemporaryFile() as local:
            try:
                response = minio_client(settings).get_object(bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchBucket"):
                    raise CubeArchiveError(f"no object {source} ({exc.code})") from None
                raise CubeArchiveError(f"{source}: {exc.code} ({exc.message})") from None
            try:
                for data in response.stream(CHUNK):
                    local.write(data)
            finally:
                response.close()
                response.release_conn()
            local.seek(0)
            yield local
        return
    path = Path(source)
    if not path.is_file():
        raise CubeArchiveError(f"no file {source}")
    with path.open("rb") as handle:
        yield handle


# import ----------------------------------------------------------------------------------------


def read_archive(settings: Settings, source: str, progress: Progress = _quiet) -> Archive:
    """Read and check a whole export file; raise :class:`CubeArchiveError` for anything that is
    not a complete, intact cube export this memstream can replay."""
    with _readable(settings, source) as handle:
        try:
            return _check(handle, source, progress)
        except CubeArchiveError:
            raise
        except Exception as exc:  # fastavro's errors of a truncated or damaged container
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise CubeArchiveError(
                f"{source}: truncated or corrupt export ({type(exc).__name__}: {detail})"
            ) from None


def _check(handle: IO[bytes], source: str, progress: Progress) -> Archive:
    if handle.read(4) != b"Obj\x01":
        raise CubeArchiveError(f"{source}: not an Avro object container file")
    handle.seek(0)
    reader = fastavro.reader(handle, return_record_name=True, return_record_name_override=True)
    meta = {k: v for k, v in reader.metadata.items() if k.startswith("memstream.")}
    if meta.get("memstream.format") != FORMAT:
        raise CubeArchiveError(f"{source}: not a memstream cube export")
    if meta.get("memstream.format_version") != str(FORMAT_VERSION):
        raise CubeArchiveError(
            f"{source}: cube export format version {meta.get('memstream.format_version')} is "
            f"not supported (this memstream reads version {FORMAT_VERSION})"
        )
    codec = Codec()
    schema = reader.writer_schema
    op_schema = next((b for b in schema if isinstance(b, dict) and b.get("name") == OP), None)
    op_version = codec.registry.by_fingerprint(schema_fingerprint(op_schema or "null"))
    if op_version is None or op_version.name != "MemoryOp":
        raise CubeArchiveError(f"{source}: its ops use a MemoryOp schema this memstream lacks")
    expected = int(meta["memstream.op_count"])
    cube = meta["memstream.source_cube"]
    digest = hashlib.sha256()
    archive = Archive(meta, [])
    building: dict[str, tuple[Blob, Any]] = {}
    try:
        for name, record in reader:
            digest.update(_encoded(schema, (name, record)))
            if name == BLOB:
                _take_chunk(archive, building, record, source)
                continue
            op = codec.decode(codec.encode("MemoryOp", record, version=op_version.version)).record
            if op["cube_id"] != cube:
                raise CubeArchiveError(f"{source}: holds an op of cube {op['cube_id']!r}, "
                                       f"not of {cube!r}")  # fmt: skip
            sha = _blob_sha(op)
            if sha is not None and sha not in archive.blobs:
                raise CubeArchiveError(f"{source}: op {op['event_id']} needs blob {sha}, missing")
            archive.ops.append(op)
            progress("checking", len(archive.ops), expected)
        if building:
            raise CubeArchiveError(f"{source}: blob {next(iter(building))} is incomplete")
    except BaseException:
        archive.close()
        raise
    if len(archive.ops) != expected or digest.hexdigest() != meta["memstream.sha256"]:
        archive.close()
        raise CubeArchiveError(
            f"{source}: truncated or corrupt export ({len(archive.ops)} of {expected} ops read, "
            "content digest does not match)"
        )
    return archive


def _take_chunk(
    archive: Archive, building: dict[str, tuple[Blob, Any]], chunk: dict[str, Any], source: str
) -> None:
    """Append one chunk to its blob; a complete blob must hash to its sha256."""
    sha = chunk["sha256"]
    if sha not in building:
        spool = _spool()
        building[sha] = (Blob(chunk["uri"], sha, chunk["size"], spool), hashlib.sha256())
    blob, digest = building[sha]
    if chunk["offset"] != blob.data.tell():
        raise CubeArchiveError(f"{source}: blob {sha} has a chunk out of order")
    blob.data.write(chunk["data"])
    digest.update(chunk["data"])
    if blob.data.tell() >= blob.size:
        del building[sha]
        if digest.hexdigest() != sha or blob.data.tell() != blob.size:
            blob.data.close()
            raise CubeArchiveError(f"{source}: blob {blob.uri} does not match its sha256")
        archive.blobs[sha] = blob


def import_archive(
    settings: Settings,
    archive: Archive,
    into: str | None = None,
    progress: Progress = _quiet,
    timeout: float = 120.0,
) -> ImportSummary:
    """Replay a checked archive into cube ``into`` (default: the source cube's name) through the
    writer, and wait until it has answered every command (``timeout``: seconds without an
    answer before giving up, e.g. no reader running)."""
    cube = into or archive.source_cube
    try:
        relocated = _upload_blobs(settings, archive)
        commands = [
            import_command(cube, _relocated(op, relocated), f"import/{archive.source_cube}")
            for op in archive.ops
        ]
    finally:
        archive.close()
    results_topic = settings.topic(COMMAND_RESULTS.name)
    partition = partition_for(cube, settings.partitions)
    start = _high_watermark(settings, results_topic, partition)
    topic = settings.topic(COMMANDS.name)
    with EventProducer(settings) as producer:
        for begin in range(0, len(commands), PUBLISH_BATCH):
            batch = commands[begin : begin + PUBLISH_BATCH]
            try:
                producer.publish_many(topic, COMMANDS.record, [(cube, c) for c in batch])
            except PublishError as exc:
                raise CubeArchiveError(f"publishing to {topic}: {exc}") from None
            progress("publishing", begin + len(batch), len(commands))
    answers = _await_results(settings, results_topic, partition, start,
                             {c["command_id"] for c in commands}, progress, timeout)  # fmt: skip
    statuses = Counter(status for status, _, _ in answers.values())
    rejected = [(memory, reason) for status, memory, reason in answers.values()
                if status == "REJECTED"]  # fmt: skip
    return ImportSummary(cube, archive.source_cube, len(commands), dict(statuses), rejected)


def _upload_blobs(settings: Settings, archive: Archive) -> dict[str, str]:
    """Put every blob in this deployment's bucket under its source key; return the new uri of
    each (by sha256), which the imported ops then name."""
    if not archive.blobs:
        return {}
    client, bucket, moved = minio_client(settings), settings.minio_bucket, {}
    for sha, blob in archive.blobs.items():
        _, key = _object_of(blob.uri, bucket)
        blob.data.seek(0)
        try:
            client.put_object(bucket, key, blob.data, length=blob.size)
        except S3Error as exc:
            raise CubeArchiveError(f"storing blob {key}: {exc.code} ({exc.message})") from None
        moved[sha] = f"s3://{bucket}/{key}"
    return moved


def _relocated(op: dict[str, Any], uris: dict[str, str]) -> dict[str, Any]:
    sha = _blob_sha(op)
    if sha is None:
        return op
    return {**op, "payload": {**op["payload"], "uri": uris[sha]}}


def _await_results(
    settings: Settings,
    topic: str,
    partition: int,
    start: int,
    pending: set[str],
    progress: Progress,
    timeout: float,
) -> dict[str, tuple[str, str, str]]:
    """Read command-results from ``start`` until every pending command has its result: the
    writer publishes it in the transaction of the ops it caused (read committed)."""
    total, answers, codec = len(pending), {}, Codec()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": settings.group(f"import-{uuid.uuid4().hex[:8]}"),
                         "enable.auto.commit": False,
                         "isolation.level": "read_committed"})  # fmt: skip
    try:
        consumer.assign([TopicPartition(topic, partition, start)])
        last = time.monotonic()
        progress("applying", 0, total)
        while pending:
            if time.monotonic() - last > timeout:
                raise CubeArchiveError(
                    f"the writer answered {len(answers)} of {total} commands; no answer for "
                    f"{timeout:.0f} s (is a memstream reader running on this deployment?)"
                )
            for msg in consumer.consume(500, 0.5):
                if msg.error() is not None:
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        raise_if_fatal(msg.error())
                    continue
                try:
                    result = codec.decode(msg.value(), reader=COMMAND_RESULTS.record).record
                except DecodeError:
                    continue  # not a result of ours: the writer only writes valid ones
                if result["command_id"] in pending:
                    pending.discard(result["command_id"])
                    answers[result["command_id"]] = (
                        result["status"],
                        result["memory_id"],
                        result["reason"],
                    )
                    last = time.monotonic()
            progress("applying", len(answers), total)
    finally:
        consumer.close()
    return answers


def _high_watermark(settings: Settings, topic: str, partition: int) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": settings.group("cube-archive"),
                         "isolation.level": "read_committed"})  # fmt: skip
    try:
        tp = TopicPartition(topic, partition)
        return retry_kafka(lambda: consumer.get_watermark_offsets(tp, 10), attempts=10)[1]
    finally:
        consumer.close()

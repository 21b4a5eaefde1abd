"""Avro single-object encoding over every kept schema version.

A message is ``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
canonical form + the Avro binary body. The reader finds the writer schema by that fingerprint among
all versions kept in ``schemas/`` and resolves it to its own reader schema (by default the
newest version of the same record), so events written years ago stay readable.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8
SCHEMA_DIR = Path(__file__).parent
_FILE_NAME = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>\d+)\.avsc$")


class SchemaError(Exception):
    """A schema file is missing, malformed, or two files claim the same name and version."""


class DecodeError(ValueError):
    """Bytes that are not a readable memstream event; ``reason`` says why, for the dead-letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SchemaVersion:
    """One kept version of one record schema."""

    name: str
    version: int
    parsed: Any
    fingerprint: bytes


@dataclass(frozen=True)
class Decoded:
    """A decoded event: the record as the reader schema sees it, and who wrote it."""

    name: str
    writer_version: int
    record: dict[str, Any]


class SchemaRegistry:
    """All kept versions of all record schemas, found by short name or by fingerprint."""

    def __init__(self, versions: Iterable[SchemaVersion]) -> None:
        self._by_name: dict[str, dict[int, SchemaVersion]] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for sv in versions:
            known = self._by_name.setdefault(sv.name, {})
            if sv.version in known:
                raise SchemaError(f"{sv.name} v{sv.version} is defined twice")
            known[sv.version] = sv
            clash = self._by_fingerprint.get(sv.fingerprint)
            if clash is not None:
                raise SchemaError(
                    f"{sv.name} v{sv.version} has the same canonical form as "
                    f"{clash.name} v{clash.version}: a new version must change the schema"
                )
            self._by_fingerprint[sv.fingerprint] = sv

    @classmethod
    def from_directories(cls, *directories: Path) -> SchemaRegistry:
        """Load every ``<Name>.v<N>.avsc`` file in the given directories."""
        versions = []
        for directory in directories:
            for path in sorted(Path(directory).glob("*.avsc")):
                match = _FILE_NAME.match(path.name)
                if not match:
                    raise SchemaError(f"{path}: schema files are named <Record>.v<N>.avsc")
                versions.append(
                    parse_version(json.loads(path.read_text()), int(match["version"]), path)
                )
        return cls(versions)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[SchemaVersion]:
        return [self._by_name[name][v] for v in sorted(self._require(name))]

    def latest(self, name: str) -> SchemaVersion:
        known = self._require(name)
        return known[max(known)]

    def get(self, name: str, version: int) -> SchemaVersion:
        known = self._require(name)
        if version not in known:
            raise SchemaError(f"{name} has no version {version} (kept: {sorted(known)})")
        return known[version]

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        return self._by_fingerprint.get(fp)

    def _require(self, name: str) -> dict[int, SchemaVersion]:
        if name not in self._by_name:
            raise SchemaError(f"unknown record schema {name!r} (known: {self.names()})")
        return self._by_name[name]


def parse_version(schema: Mapping[str, Any], version: int, origin: object = "") -> SchemaVersion:
    """Parse one schema document into a :class:`SchemaVersion` (its own named-type scope)."""
    try:
        parsed = fastavro.parse_schema(dict(schema), named_schemas={})
    except Exception as exc:
        raise SchemaError(f"{origin}: invalid Avro schema: {exc}") from exc
    return SchemaVersion(
        parsed["name"].rsplit(".", 1)[-1], version, parsed, schema_fingerprint(parsed)
    )


def schema_fingerprint(parsed: Any) -> bytes:
    """The 8 header bytes: CRC-64-AVRO of the parsing canonical form, little-endian."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


class Codec:
    """Encodes and decodes memstream events. Thread-safe: it holds no mutable state."""

    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self.registry = registry or default_registry()

    def encode(self, name: str, record: Mapping[str, Any], version: int | None = None) -> bytes:
        """Encode ``record`` with the given (default: newest) version of schema ``name``."""
        sv = self.registry.latest(name) if version is None else self.registry.get(name, version)
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(sv.fingerprint)
        fastavro.schemaless_writer(buf, sv.parsed, dict(record))
        return buf.getvalue()

    def decode(
        self, data: bytes | None, reader: str | None = None, reader_version: int | None = None
    ) -> Decoded:
        """Decode one message; raise :class:`DecodeError` for anything that is not a valid event.

        ``reader`` names the record type the caller expects (a different type is an error);
        by default the writer's own record type is read with its newest kept version.
        """
        if not data:
            raise DecodeError("empty message")
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoding (missing C3 01 header)")
        writer = self.registry.by_fingerprint(bytes(data[2:HEADER_SIZE]))
        if writer is None:
            raise DecodeError(
                f"unknown writer schema fingerprint {bytes(data[2:HEADER_SIZE]).hex()}"
            )
        name = reader or writer.name
        if name != writer.name:
            raise DecodeError(f"expected a {name} event, got {writer.name} v{writer.version}")
        try:
            target = (
                self.registry.latest(name)
                if reader_version is None
                else self.registry.get(name, reader_version)
            )
        except SchemaError as exc:
            raise DecodeError(str(exc)) from exc
        body = io.BytesIO(memoryview(data)[HEADER_SIZE:])
        try:
            record = fastavro.schemaless_reader(body, writer.parsed, target.parsed)
        except Exception as exc:
            raise DecodeError(
                f"corrupt {writer.name} v{writer.version} body: {type(exc).__name__}: {exc}"
            ) from exc
        if body.tell() != len(data) - HEADER_SIZE:
            raise DecodeError(
                f"corrupt {writer.name} v{writer.version} body: "
                f"{len(data) - HEADER_SIZE - body.tell()} trailing bytes"
            )
        return Decoded(writer.name, writer.version, record)


@cache
def default_registry() -> SchemaRegistry:
    """The registry of every schema version shipped in ``schemas/``."""
    return SchemaRegistry.from_directories(SCHEMA_DIR)

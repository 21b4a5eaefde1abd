"""The Avro single-object codec: round trips, typed errors, schema evolution."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas import Codec, DecodeError, SchemaError, SchemaRegistry
from schemas.codec import MAGIC, SCHEMA_DIR, schema_fingerprint

V2_DIR = Path(__file__).parent / "fixtures" / "schemas_v2"
NOW = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


def interaction(**extra: object) -> dict[str, object]:
    return {
        "event_id": "e-1",
        "cube_id": "cube-a",
        "session_id": "s-1",
        "turn_id": "D1:3",
        "actor": "agent-7",
        "speaker": "Caroline",
        "role": "USER",
        "content": "I went to a LGBTQ support group yesterday.",
        "event_time": NOW,
        "metadata": {"k": "v"},
        **extra,
    }


SAMPLES = {
    "Interaction": interaction(),
    "MemoryOp": {
        "event_id": "op-1",
        "cube_id": "cube-a",
        "memory_id": "m-1",
        "version": 1,
        "op": "ADD",
        "memory_type": "PLAINTEXT",
        "event_time": NOW,
        "actor": "memreader/1",
        "caused_by": ["e-1"],
        "supersedes": [],
        "reason": "extracted",
        "payload": (
            "memstream.v1.PlaintextPayload",
            {
                "text": "Caroline went to a LGBTQ support group on 7 May 2023.",
                "key": "caroline/support-group",
                "tags": ["lgbtq", "support group"],
                "embedding": b"\x00\x00\x80?" * 4,
                "embedding_model": "all-MiniLM-L6-v2",
                "valid_from": NOW,
                "valid_to": None,
                "source": {
                    "event_id": "e-1",
                    "session_id": "s-1",
                    "turn_id": "D1:3",
                    "topic": "memstream.interactions",
                    "partition": 0,
                    "offset": 3,
                },
            },
        ),
    },
    "QueryEvent": {
        "event_id": "q-1",
        "cube_id": "cube-a",
        "actor": "agent-7",
        "query": "support group",
        "top_k": 5,
        "event_time": NOW,
        "results": [{"memory_id": "m-1", "score": 0.5}],
        "latency_ms": 3.5,
    },
    "CubeEvent": {
        "event_id": "c-1",
        "cube_id": "cube-a",
        "kind": "GRANT",
        "actor": "owner",
        "event_time": NOW,
        "subject": "agent-7",
        "permissions": ["READ", "WRITE"],
        "policy": {"archive_after_days": 30, "ttl_days": None},
    },
    "DeadLetter": {
        "event_id": "d-1",
        "source_topic": "memstream.interactions",
        "partition": 2,
        "offset": 41,
        "key": b"cube-a",
        "value": b"\xff\x00garbage",
        "error_type": "DecodeError",
        "error": "not Avro",
        "failed_at": NOW,
    },
    "Command": {
        "command_id": "c-1",
        "cube_id": "cube-a",
        "memory_id": "m-1",
        "command": "ACTIVATE",
        "issued_by": "scheduler/1",
        "event_time": NOW,
        "reason": "hot",
        "expected_version": 3,
        "evidence": {"heat": 0.9},
        "payload": {
            "uri": "s3://b/kv/ab.safetensors",
            "model_id": "m",
            "token_count": 12,
            "dtype": "float32",
            "sha256": "ab",
            "memory_ids": ["m-1"],
        },
    },
    "CommandResult": {
        "event_id": "r-1",
        "command_id": "c-1",
        "cube_id": "cube-a",
        "memory_id": "m-1",
        "command": "ACTIVATE",
        "issued_by": "scheduler/1",
        "status": "REJECTED",
        "reason": "no memory m-1 in cube cube-a",
        "op_event_ids": [],
        "version": None,
        "event_time": NOW,
        "source": {"topic": "memstream.commands", "partition": 2, "offset": 9},
    },
    "FoldSnapshot": {
        "topic": "memstream.memory-ops",
        "partition": 1,
        "next_offset": 100,
        "ops_folded": 99,
        "chunk": 0,
        "chunks": 1,
        "states": [
            {
                "memory_id": "m-1",
                "cube_id": "cube-a",
                "memory_type": "PLAINTEXT",
                "version": 2,
                "status": "active",
                "created_at": NOW,
                "updated_at": NOW,
                "text": "a fact",
                "key": None,
                "tags": ["x"],
                "embedding": b"\x00" * 8,
                "embedding_model": "m",
                "valid_from": NOW,
                "valid_to": None,
                "source": None,
                "activated": True,
                "payload_json": "{}",
                "caused_by": ["e"],
                "supersedes": [],
                "superseded_by": None,
                "last_event_id": "e",
            },
        ],
    },
}


def test_every_shipped_schema_is_loaded() -> None:
    codec = Codec()
    assert codec.registry.names() == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(name: str) -> None:
    codec = Codec()
    data = codec.encode(name, SAMPLES[name])
    assert data[:2] == MAGIC
    assert data[2:10] == codec.registry.latest(name).fingerprint
    decoded = codec.decode(data)
    assert decoded.name == name
    assert decoded.writer_version == codec.registry.latest(name).version
    for key, value in SAMPLES[name].items():
        if isinstance(value, tuple):
            value = value[1]
        if isinstance(value, dict) and key != "metadata":
            assert {k: decoded.record[key][k] for k in value} == value
        else:
            assert decoded.record[key] == value


def test_fingerprint_is_crc64_avro_little_endian() -> None:
    # The Avro specification's test vector: CRC-64-AVRO("null") = 0x63dd24e7cc258f8a.
    assert schema_fingerprint("null") == (0x63DD24E7CC258F8A).to_bytes(8, "little")


def test_a_v1_memory_op_reads_as_generation_0() -> None:
    codec = Codec()
    data = codec.encode("MemoryOp", SAMPLES["MemoryOp"], version=1)
    decoded = codec.decode(data, reader="MemoryOp")
    assert decoded.writer_version == 1
    assert decoded.record["generation"] == 0
    assert decoded.record["reader_version"] == ""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty message"),
        (os.urandom(64).replace(b"\xc3", b"\x00"), "missing C3 01 header"),
        (
            MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"body",
            "unknown writer schema fingerprint",
        ),
    ],
)
def test_undecodable_bytes_raise_one_typed_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        Codec().decode(data)
    assert reason in info.value.reason


def test_truncated_and_padded_bodies_are_corrupt() -> None:
    codec = Codec()
    data = codec.encode("Interaction", interaction())
    with pytest.raises(DecodeError, match="corrupt Interaction v1 body"):
        codec.decode(data[:-5])
    with pytest.raises(DecodeError, match="trailing bytes"):
        codec.decode(data + b"\x00")


def test_reader_refuses_another_record_type() -> None:
    codec = Codec()
    data = codec.encode("QueryEvent", SAMPLES["QueryEvent"])
    with pytest.raises(DecodeError, match="expected a Interaction event, got QueryEvent v1"):
        codec.decode(data, reader="Interaction")


def test_encoding_an_invalid_record_fails_before_the_log() -> None:
    bad = interaction()
    del bad["cube_id"]
    with pytest.raises((ValueError, TypeError, KeyError)):
        Codec().encode("Interaction", bad)


class TestEvolution:
    """v2 adds a defaulted field: each side reads the other's events."""

    registry = SchemaRegistry.from_directories(SCHEMA_DIR, V2_DIR)

    def test_both_versions_are_kept(self) -> None:
        assert [sv.version for sv in self.registry.versions("Interaction")] == [1, 2]
        assert self.registry.latest("Interaction").version == 2

    def test_v2_reader_reads_v1_events_with_the_default(self) -> None:
        v1_bytes = Codec().encode("Interaction", interaction())
        decoded = Codec(self.registry).decode(v1_bytes, reader="Interaction")
        assert decoded.writer_version == 1
        assert decoded.record["language"] == "und"
        assert decoded.record["content"] == interaction()["content"]

    def test_v1_reader_reads_v2_events_without_the_new_field(self) -> None:
        codec = Codec(self.registry)
        v2_bytes = codec.encode("Interaction", interaction(language="en"))
        assert codec.decode(v2_bytes).record["language"] == "en"
        decoded = codec.decode(v2_bytes, reader="Interaction", reader_version=1)
        assert decoded.writer_version == 2
        assert "language" not in decoded.record
        assert decoded.record["speaker"] == "Caroline"

    def test_a_v1_only_reader_rejects_v2_bytes_as_unknown(self) -> None:
        v2_bytes = Codec(self.registry).encode("Interaction", interaction(language="en"))
        with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
            Codec().decode(v2_bytes)


def test_a_version_that_changes_nothing_is_refused(tmp_path: Path) -> None:
    schema = json.loads((SCHEMA_DIR / "QueryEvent.v1.avsc").read_text())
    schema["doc"] = "only the doc changed"
    (tmp_path / "QueryEvent.v2.avsc").write_text(json.dumps(schema))
    with pytest.raises(SchemaError, match="same canonical form"):
        SchemaRegistry.from_directories(SCHEMA_DIR, tmp_path)


def test_badly_named_schema_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "query.avsc").write_text("{}")
    with pytest.raises(SchemaError, match=r"<Record>\.v<N>\.avsc"):
        SchemaRegistry.from_directories(tmp_path)


def test_kafka_murmur2_matches_the_java_client() -> None:
    """Test vectors of Kafka's own UtilsTest.testMurmur2 (as signed 32-bit ints)."""
    import ctypes

    from streams.transport.topics import murmur2, partition_for

    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}  # fmt: skip
    for data, expected in cases.items():
        assert ctypes.c_int32(murmur2(data)).value == expected
    assert all(0 <= partition_for(f"cube-{i}", 6) < 6 for i in range(100))
    assert partition_for("cube-1", 6) == partition_for(b"cube-1", 6)

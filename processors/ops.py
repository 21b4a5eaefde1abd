"""Building memory ops: deterministic ids and the op record of ``MemoryOp.v2.avsc``.

Ids are derived from the source, never drawn at random, so reprocessing an interaction after a
crash or a rebalance emits byte-identical ops, which the fold and every sink drop by event id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "memstream")

PLAINTEXT_PAYLOAD = "memstream.v1.PlaintextPayload"
ACTIVATION_PAYLOAD = "memstream.v1.ActivationPayload"
PARAMETER_PAYLOAD = "memstream.v1.ParameterPayload"


def _generation(generation: int) -> str:
    # Generation 0 keeps the ids of logs written before generations existed.
    return f"g{generation}/" if generation else ""


def memory_id(cube_id: str, source_event_id: str, item_index: int, generation: int = 0) -> str:
    """The id of the memory that item ``item_index`` of a source event creates (each
    re-extraction of the log, a generation, has its own ids: both live in the log side by side)."""
    name = f"{_generation(generation)}memory/{cube_id}/{source_event_id}/{item_index}"
    return str(uuid.uuid5(NAMESPACE, name))


def op_event_id(
    source_event_id: str, item_index: int, kind: str, memory_id: str, generation: int = 0
) -> str:
    """The event id of the ``kind`` op on ``memory_id`` that item ``item_index`` of a source
    yields (one item may yield ops on two memories: the new one and the one it replaces)."""
    name = f"{_generation(generation)}op/{source_event_id}/{item_index}/{kind}/{memory_id}"
    return str(uuid.uuid5(NAMESPACE, name))


def embedding_bytes(vector: Sequence[float] | np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def embedding_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


def plaintext_payload(
    text: str,
    embedding: bytes,
    embedding_model: str,
    *,
    key: str | None = None,
    tags: Iterable[str] = (),
    valid_from: datetime | None = None,
    valid_to: datetime | None = None,
    source: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    return (
        PLAINTEXT_PAYLOAD,
        {
            "text": text,
            "key": key,
            "tags": list(tags),
            "embedding": embedding,
            "embedding_model": embedding_model,
            "valid_from": valid_from,
            "valid_to": valid_to,
            "source": source,
        },
    )


def make_op(
    *,
    event_id: str,
    cube_id: str,
    memory_id: str,
    version: int,
    op: str,
    event_time: datetime,
    actor: str,
    memory_type: str = "PLAINTEXT",
    caused_by: Iterable[str] = (),
    supersedes: Iterable[str] = (),
    superseded_by: str | None = None,
    reason: str = "",
    payload: tuple[str, dict[str, Any]] | None = None,
    generation: int = 0,
    reader_version: str = "",
) -> dict[str, Any]:
    """A MemoryOp record ready for the codec (the payload union branch named explicitly)."""
    return {
        "event_id": event_id,
        "cube_id": cube_id,
        "memory_id": memory_id,
        "version": version,
        "op": op,
        "memory_type": memory_type,
        "event_time": event_time,
        "actor": actor,
        "caused_by": list(caused_by),
        "supersedes": list(supersedes),
        "superseded_by": superseded_by,
        "reason": reason,
        "generation": generation,
        "reader_version": reader_version,
        "payload": payload,
    }


def payload_of(op: dict[str, Any]) -> dict[str, Any] | None:
    """The payload record of an op, whether built here (a tagged tuple) or decoded (a dict)."""
    payload = op.get("payload")
    if isinstance(payload, tuple):
        return payload[1]
    return payload

"""The vault: archived memories as JSON objects in MinIO, under ``vault/<cube>/<memory>.json``.

A memory leaves the plaintext view when it is archived; the vault keeps its full state (text,
embedding, provenance) so a RESTORE can bring it back without the log's help.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from minio import Minio

from processors.fold import Memory
from sinks.contract import Batch, Refused, write_isolating


def vault_key(memory: Memory) -> str:
    return f"vault/{memory.cube_id}/{memory.memory_id}.json"


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(type(value).__name__)


class VaultSink:
    name = "vault"

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def write(self, batch: Batch) -> list[Refused]:
        """The sink contract (:mod:`sinks.contract`): the batch's archived states, one MinIO
        refuses (a key it cannot name) returned with the reason."""
        archived = [m for m in batch.states if m.status == "archived"]
        return write_isolating(self.name, archived, self.put, lambda m: m.memory_id, self._alive)

    def flush(self) -> None:
        """Every object is durable once its put returned."""

    def _alive(self) -> bool:
        return bool(self.client.bucket_exists(self.bucket))

    def put(self, memories: Iterable[Memory]) -> int:
        """Store every archived memory's state; idempotent (same key, same content)."""
        count = 0
        for memory in memories:
            if memory.status != "archived":
                continue
            body = json.dumps(asdict(memory), default=_encode).encode()
            self.client.put_object(
                self.bucket,
                vault_key(memory),
                io.BytesIO(body),
                len(body),
                content_type="application/json",
            )
            count += 1
        return count

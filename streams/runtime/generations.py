"""View generations: which fold of the log the views show, and the one being built beside it.

The log is the truth and every view is rebuilt from it. A **generation** is one materialisation
of the views (a Milvus collection, a ClickHouse ops table, a consumer group, a working set) of
one **ops generation** (one extraction of the interactions: 0 for the first reader, +1 for each
``memstream replay --reextract``). ``replay --rebuild`` builds generation N+1 of the same ops
generation from offset 0 beside the live N; ``--reextract`` also starts a reader of ops
generation K+1 over ``interactions`` from offset 0, so the log then holds both extractions. When
the new generation has caught up, the views switch to it in one step (the API's stores, the
Milvus alias, the ClickHouse views) and the old one is dropped.

The pointer (current, next, retired) lives in MinIO, where every role can read it: reader
processes follow it to promote their next-generation reader, views processes to switch.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from minio import Minio
from minio.error import S3Error

from streams.settings import Settings

Kind = Literal["initial", "rebuild", "reextract"]
#: Reader settings a re-extraction may change (recorded with its generation, so a restart of
#: that generation's reader uses the same ones).
READER_SETTINGS = ("merge_threshold",)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Generation:
    """One generation of the views; ``ops`` is the generation of ops it folds."""

    id: int = 0
    ops: int = 0
    kind: Kind = "initial"
    reader: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=_now)
    switched_at: str | None = None
    until: int | None = None

    @property
    def collection(self) -> str:
        """Its Milvus collection (generation 0 keeps the name from before generations)."""
        return "memories" if self.id == 0 else f"memories_g{self.id}"

    @property
    def ops_table(self) -> str:
        """Its ClickHouse table of ops (``memory_ops`` is a view of the current one)."""
        return f"memory_ops_g{self.id}"

    def views_group(self, settings: Settings) -> str:
        return settings.group("views" if self.id == 0 else f"views.g{self.id}")

    def reader_group(self, settings: Settings) -> str:
        return settings.group("reader" if self.ops == 0 else f"reader.g{self.ops}")

    def snapshot_key(self, topic: str) -> str:
        """Where the fold snapshots of its ops generation live (they hold that fold only)."""
        return topic if self.ops == 0 else f"{topic}.g{self.ops}"

    def reader_settings(self, settings: Settings) -> Settings:
        """The settings its reader runs with: the deployment's, with the generation's own."""
        return settings.model_copy(update=self.reader) if self.reader else settings


@dataclass(frozen=True)
class GenerationState:
    current: Generation = field(default_factory=Generation)
    next: Generation | None = None
    retired: tuple[Generation, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "current": asdict(self.current),
            "next": asdict(self.next) if self.next else None,
            "retired": [asdict(g) for g in self.retired],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationState:
        return cls(
            current=Generation(**data["current"]),
            next=Generation(**data["next"]) if data.get("next") else None,
            retired=tuple(Generation(**g) for g in data.get("retired", ())),
        )

    def begin(self, kind: Kind, reader: dict[str, Any] | None = None) -> GenerationState:
        """The state with a next generation to build (refused while one is being built)."""
        if self.next is not None:
            raise GenerationBusy(
                f"generation {self.next.id} ({self.next.kind}) is still being built"
            )
        unknown = set(reader or {}) - set(READER_SETTINGS)
        if unknown:
            raise ValueError(
                f"a re-extraction may change {', '.join(READER_SETTINGS)}, not "
                f"{', '.join(sorted(unknown))}"
            )
        ops = self.current.ops + 1 if kind == "reextract" else self.current.ops
        settings = {**self.current.reader, **(reader or {})} if kind == "reextract" else (
            self.current.reader
        )  # fmt: skip
        nxt = Generation(id=self.current.id + 1, ops=ops, kind=kind, reader=settings)
        return replace(self, next=nxt)

    def at(self, when: datetime) -> Generation:
        """The generation the views showed at ``when``: the last one switched to by then (the
        first one shows everything before any switch)."""
        shown = None
        for g in (*self.retired, self.current):
            if g.switched_at is None or datetime.fromisoformat(g.switched_at) <= when:
                shown = g
        return shown or self.current

    def switched(self) -> GenerationState:
        """The state after the views moved to the next generation."""
        if self.next is None:
            raise ValueError("no generation is being built")
        return GenerationState(
            current=replace(self.next, switched_at=_now()),
            next=None,
            retired=(*self.retired, self.current)[-20:],
        )


class GenerationBusy(RuntimeError):
    """A replay was asked for while another one is still building its generation."""


class GenerationStore:
    """The pointer in MinIO, one object per deployment (named by its topic prefix)."""

    def __init__(self, client: Minio, bucket: str, settings: Settings) -> None:
        self.client = client
        self.bucket = bucket
        self.key = f"generations/{settings.topic_prefix}json"

    def read(self) -> GenerationState:
        try:
            response = self.client.get_object(self.bucket, self.key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return GenerationState()
            raise
        try:
            return GenerationState.from_json(json.loads(response.read()))
        finally:
            response.close()
            response.release_conn()

    def write(self, state: GenerationState) -> None:
        body = json.dumps(state.to_json(), indent=2).encode()
        self.client.put_object(
            self.bucket, self.key, io.BytesIO(body), len(body), content_type="application/json"
        )

"""View generations: which fold of the log the views show, and the one being built beside it.

The log is the truth and every view is rebuilt from it. A **generation** is one materialisation
of the views (a Milvus collection, a ClickHouse ops table, a consumer group, a working set) of
one **ops generation** (one extraction of the interactions: 0 for the first reader, +1 for each
``memstream replay --reextract``). ``replay --rebuild`` builds generation N+1 of the same ops
generation from offset 0 beside the live N; ``--reextract`` also starts a reader of ops
generation K+1 over ``interactions`` from offset 0, so the log then holds both extractions. When
the new generation has caught up, the views switch to it in one step (the API's stores, the
Milvus alias, the ClickHouse views) and the old one is dropped.

The pointer (current, next, retired, failed) lives in MinIO, where every role can read it:
reader processes follow it to promote their next-generation reader, views processes to switch.

Nothing that cannot start is ever stored: a re-extraction's reader settings are validated by the
``Settings`` model's own field definitions before :meth:`GenerationState.begin` accepts them. A
next generation that still cannot start (a pointer written by an older version, or edited by
hand) is **abandoned**, never retried: :meth:`GenerationState.abandoned` moves it to ``failed``
with the reason, and the current generation keeps serving. Generation ids and ops generations
are never reused after an abandoned one (its consumer groups and ops stay behind).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from minio import Minio
from minio.error import S3Error
from pydantic import ValidationError

from streams.settings import Settings

Kind = Literal["initial", "rebuild", "reextract"]
#: Reader settings a re-extraction may change (recorded with its generation, so a restart of
#: that generation's reader uses the same ones).
READER_SETTINGS = ("merge_threshold",)
#: How many abandoned generations the pointer keeps on record.
FAILED_KEPT = 20


class InvalidReaderSettings(ValueError):
    """Reader settings a re-extraction cannot start with. ``errors``: one per setting, each
    ``{"field", "input", "msg"}`` (what was given and why it is refused)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}={e['input']!r}: {e['msg']}" for e in errors))


def validate_reader(
    reader: Any, settings: Settings | None = None
) -> tuple[dict[str, Any], Settings]:
    """Check reader settings for a re-extraction against the ``Settings`` model's own field
    definitions (types, ranges, its validators), on top of ``settings`` (the deployment's;
    the model's defaults when None). Returns the values as stored (JSON, normalised: ``"0.9"``
    is ``0.9``) and the settings the reader runs with; raises :class:`InvalidReaderSettings`
    naming each refused setting and why (an unknown key, a bad type, out of range, not finite).
    """
    if not isinstance(reader, Mapping):
        raise InvalidReaderSettings(
            [{"field": "reader", "input": reader, "msg": "expected an object of settings"}]
        )
    errors = [
        {"field": key, "input": value,
         "msg": f"not a setting a re-extraction may change ({', '.join(READER_SETTINGS)})"}
        for key, value in reader.items() if key not in READER_SETTINGS
    ]  # fmt: skip
    if errors:
        raise InvalidReaderSettings(errors)
    base = settings if settings is not None else Settings.model_construct()
    try:
        checked = Settings.model_validate({**base.model_dump(), **reader})
    except ValidationError as exc:
        raise InvalidReaderSettings(
            [{"field": ".".join(str(x) for x in e["loc"]) or "reader", "input": e.get("input"),
              "msg": e["msg"]} for e in exc.errors()]
        ) from None  # fmt: skip
    stored = checked.model_dump(mode="json", include=set(reader))
    bad = [
        {"field": key, "input": reader[key], "msg": "must be a finite number"}
        for key, value in stored.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]
    if bad:  # NaN or infinity: no JSON document (the pointer, the API) can carry it
        raise InvalidReaderSettings(bad)
    return stored, checked


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
    #: A re-extraction: the ops generation it re-extracts, whose commands' effects (DELETE,
    #: ARCHIVE, EXPIRE, RESTORE) its writer carries over. None: ``ops - 1`` (older pointers).
    base: int | None = None

    @property
    def base_ops(self) -> int:
        """The ops generation this one's commands are carried over from."""
        return self.base if self.base is not None else max(self.ops - 1, 0)

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
        """The settings its reader runs with: the deployment's, with the generation's own,
        validated (:class:`InvalidReaderSettings` if they cannot be)."""
        return validate_reader(self.reader, settings)[1] if self.reader else settings

    def problem(self, current: Generation, settings: Settings) -> str | None:
        """Why this next generation cannot start beside ``current`` (None: it can)."""
        if self.kind not in get_args(Kind) or self.kind == "initial":
            return f"kind {self.kind!r} is neither a rebuild nor a re-extraction"
        if self.id <= current.id:
            return f"generation {self.id} is not after the current one ({current.id})"
        if self.kind == "rebuild" and (self.ops != current.ops or self.reader != current.reader):
            return "a rebuild refolds the current ops: it has their generation and reader settings"
        if self.kind == "reextract" and self.ops <= current.ops:
            return f"ops generation {self.ops} is not after the current one ({current.ops})"
        if self.kind == "reextract" and self.base_ops >= self.ops:
            return f"ops generation {self.ops} cannot re-extract ops generation {self.base_ops}"
        try:
            self.reader_settings(settings)
        except InvalidReaderSettings as exc:
            return f"its reader settings cannot start: {exc}"
        return None

    @classmethod
    def from_json(cls, data: Any) -> Generation:
        """A generation from its JSON (unknown keys ignored; ``TypeError``/``ValueError`` for
        one that is not a generation)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a generation is an object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        generation = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("id", "ops", "base"):
            value = getattr(generation, name)
            if name == "base" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
        if not isinstance(generation.reader, Mapping):
            raise ValueError(f"reader must be an object of settings, not {generation.reader!r}")
        return generation


@dataclass(frozen=True)
class GenerationState:
    current: Generation = field(default_factory=Generation)
    next: Generation | None = None
    retired: tuple[Generation, ...] = ()
    #: Abandoned next generations, newest last: ``{"generation": ..., "reason": ...,
    #: "failed_at": ...}`` (the generation as it was stored, even one that could not be read).
    failed: tuple[dict[str, Any], ...] = ()
    #: Set by :meth:`from_json` when it had to abandon an unreadable next generation: the
    #: state differs from the stored one until someone writes it back (not stored itself).
    repaired: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "current": asdict(self.current),
            "next": asdict(self.next) if self.next else None,
            "retired": [asdict(g) for g in self.retired],
            "failed": [dict(f) for f in self.failed],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationState:
        """The stored state. A ``next`` that is not a readable generation is abandoned here
        (``repaired`` says why), so no reader of the pointer ever fails on it."""
        failed = tuple(f for f in data.get("failed") or () if isinstance(f, Mapping))
        state = cls(
            current=Generation.from_json(data["current"]),
            retired=tuple(_readable(data.get("retired") or ())),
            failed=failed,
        )
        raw = data.get("next")
        if not raw:
            return state
        try:
            return replace(state, next=Generation.from_json(raw))
        except (TypeError, ValueError) as exc:
            reason = f"the stored next generation is unreadable: {exc}"
            return replace(state, failed=_failed(failed, raw, reason), repaired=reason)

    def begin(
        self, kind: Kind, reader: dict[str, Any] | None = None, settings: Settings | None = None
    ) -> GenerationState:
        """The state with a next generation to build: refused while one is being built
        (:class:`GenerationBusy`), and for reader settings that cannot start
        (:class:`InvalidReaderSettings`; a rebuild takes none: ``ValueError``)."""
        if self.next is not None:
            raise GenerationBusy(
                f"generation {self.next.id} ({self.next.kind}) is still being built"
            )
        if kind not in ("rebuild", "reextract"):
            raise ValueError(f"a replay is a rebuild or a re-extraction, not {kind!r}")
        if kind == "rebuild" and reader:
            raise ValueError("a rebuild refolds the same ops: reader settings need reextract")
        used = (self.current, *self.retired)
        abandoned = [f["generation"] for f in self.failed if isinstance(f.get("generation"), dict)]
        ids = [g.id for g in used] + [g["id"] for g in abandoned if isinstance(g.get("id"), int)]
        if kind == "reextract":
            stored, _ = validate_reader({**self.current.reader, **(reader or {})}, settings)
            ops_used = [g.ops for g in used] + [
                g["ops"] for g in abandoned if isinstance(g.get("ops"), int)
            ]
            nxt = Generation(id=max(ids) + 1, ops=max(ops_used) + 1, kind=kind, reader=stored,
                             base=self.current.ops)  # fmt: skip
        else:
            nxt = Generation(id=max(ids) + 1, ops=self.current.ops, kind=kind,
                             reader=self.current.reader, base=self.current.base)  # fmt: skip
        return replace(self, next=nxt)

    def abandoned(self, reason: str) -> GenerationState:
        """The state after giving up on the next generation (it is kept on record in
        ``failed`` with ``reason``; the current one goes on)."""
        if self.next is None:
            raise ValueError("no generation is being built")
        return replace(self, next=None, failed=_failed(self.failed, asdict(self.next), reason))

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
            failed=self.failed,
        )


def _readable(generations: Any) -> Iterator[Generation]:
    """The retired generations that can be read (one that cannot only loses its time travel)."""
    for data in generations if isinstance(generations, list) else ():
        try:
            yield Generation.from_json(data)
        except (TypeError, ValueError):
            continue


def _failed(
    failed: tuple[dict[str, Any], ...], generation: Any, reason: str
) -> tuple[dict[str, Any], ...]:
    record = {"generation": generation, "reason": reason, "failed_at": _now()}
    return (*failed, record)[-FAILED_KEPT:]


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

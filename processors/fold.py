"""Memory state = fold(memory-ops). The one place that says what an op does to a memory.

Every sink, the reader's own view of a cube, replay and time travel call :func:`fold`. It is pure:
the same ops in the same order always give the same state. Delivery is at-least-once, so an op
whose version is already applied is a duplicate and changes nothing; an op that skips a version
is held back by :class:`MemoryTable` until the missing one arrives, for a bounded number of ops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from processors.ops import payload_of

Status = Literal["active", "archived", "expired", "merged", "deleted"]

# Which ops may follow which status; anything else is an invalid op in the log.
ALLOWED: dict[str, set[str]] = {
    "active": {"UPDATE", "MERGE", "ACTIVATE", "DEACTIVATE", "ARCHIVE", "EXPIRE", "DELETE"},
    "archived": {"RESTORE", "EXPIRE", "DELETE"},
    "expired": {"DELETE"},
    "merged": {"DELETE"},
    "deleted": set(),
}


class FoldError(ValueError):
    """An op that cannot apply to the memory's state (a bug upstream, never silently dropped)."""


class VersionGap(FoldError):
    """An op arrived before the version it follows."""


@dataclass(frozen=True)
class Memory:
    """The state of one memory after its ops so far."""

    memory_id: str
    cube_id: str
    memory_type: str
    version: int
    status: Status
    created_at: datetime
    updated_at: datetime
    text: str = ""
    key: str | None = None
    tags: tuple[str, ...] = ()
    embedding: bytes = b""
    embedding_model: str = ""
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    source: dict[str, Any] | None = field(default=None, compare=False)
    activated: bool = False
    payload: dict[str, Any] = field(default_factory=dict, compare=False)
    caused_by: tuple[str, ...] = ()
    supersedes: tuple[str, ...] = ()
    superseded_by: str | None = None
    last_event_id: str = ""

    @property
    def searchable(self) -> bool:
        """Whether the plaintext view holds it: active plaintext memories, current or closed."""
        return self.status == "active" and self.memory_type == "PLAINTEXT"

    @property
    def current(self) -> bool:
        """Searchable and still true: no newer fact has closed its validity."""
        return self.searchable and self.valid_to is None


def fold(state: Memory | None, op: dict[str, Any]) -> Memory | None:
    """Apply one op to a memory's state and return the new state.

    Returns ``state`` unchanged for a duplicate (a version already applied). Raises
    :class:`VersionGap` for an op ahead of the next version and :class:`FoldError` for an op the
    state does not allow.
    """
    kind, version = op["op"], op["version"]
    if state is not None and version <= state.version:
        return state
    expected = 1 if state is None else state.version + 1
    if version != expected:
        raise VersionGap(f"{op['memory_id']}: got v{version} of {kind}, expected v{expected}")
    payload = payload_of(op) or {}
    at = op["event_time"]
    if state is None:
        if kind not in {"ADD", "MERGE"} or not payload:
            raise FoldError(f"{op['memory_id']}: {kind} on a memory that was never added")
        return Memory(
            memory_id=op["memory_id"],
            cube_id=op["cube_id"],
            memory_type=op["memory_type"],
            version=1,
            status="active",
            created_at=at,
            updated_at=at,
            caused_by=tuple(op["caused_by"]),
            supersedes=tuple(op["supersedes"]),
            last_event_id=op["event_id"],
            **_content(payload),
        )
    if kind not in ALLOWED[state.status]:
        raise FoldError(f"{state.memory_id}: {kind} is not allowed on a {state.status} memory")
    common: dict[str, Any] = {
        "version": version,
        "updated_at": at,
        "last_event_id": op["event_id"],
        "caused_by": _union(state.caused_by, op["caused_by"]),
    }
    if kind == "UPDATE":
        content = _content(payload) if payload else {}
        return replace(
            state, **common, **content, superseded_by=op["superseded_by"] or state.superseded_by
        )
    if kind == "MERGE":
        # On an existing memory a MERGE retires it: the memory named in superseded_by, created
        # by the same decision, now holds the fact with the provenance of both.
        if not op["superseded_by"]:
            raise FoldError(f"{state.memory_id}: MERGE on an existing memory names no successor")
        return replace(state, **common, status="merged", superseded_by=op["superseded_by"])
    if kind == "ACTIVATE":
        return replace(state, **common, activated=True, payload=dict(payload) or state.payload)
    if kind == "DEACTIVATE":
        return replace(state, **common, activated=False)
    if kind == "ARCHIVE":
        return replace(state, **common, status="archived", activated=False)
    if kind == "RESTORE":
        return replace(state, **common, status="active")
    if kind == "EXPIRE":
        return replace(state, **common, status="expired", valid_to=state.valid_to or at)
    if kind == "DELETE":
        return replace(state, **common, status="deleted", activated=False)
    raise FoldError(f"unknown op {kind}")


def _content(payload: dict[str, Any]) -> dict[str, Any]:
    if "text" not in payload:
        return {"payload": dict(payload)}
    return {
        "text": payload["text"],
        "key": payload.get("key"),
        "tags": tuple(payload.get("tags", ())),
        "embedding": payload.get("embedding", b""),
        "embedding_model": payload.get("embedding_model", ""),
        "valid_from": payload.get("valid_from"),
        "valid_to": payload.get("valid_to"),
        "source": payload.get("source"),
    }


def _union(old: Iterable[str], new: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*old, *new]))


#: How many later ops of its table an op ahead of a version gap waits for the missing version.
#: The one writer publishes a memory's ops in version order on one partition, so a gap is never
#: legitimate (an injected op, a writer bug): the wait is short, and then the op is rejected.
GAP_OPS = 1_000


@dataclass(frozen=True)
class Rejected:
    """An op the table held back and then refused: its gap was never filled in time, or it
    did not apply once it was. ``position`` is where the caller read it (its log offset)."""

    op: dict[str, Any]
    position: int | None
    reason: str


@dataclass(frozen=True)
class _Held:
    op: dict[str, Any]
    position: int | None
    since: int  # the table's op count when it was held


class MemoryTable:
    """Memories of many cubes, folded from ops delivered at least once and maybe out of order.

    Ops ahead of their memory's next version wait in ``pending`` until the gap is filled, for at
    most ``gap_ops`` later ops (or until :meth:`release_pending`); then they are rejected. An op
    that fills a gap is applied whatever its held successors do: a successor that does not apply
    is rejected on its own. Rejected ops collect in ``rejected`` (bounded; the views drain it
    into the dead-letter topic, other folds just skip them). ``seen`` holds every applied op's
    event id, so callers can tell "already done" in O(1).
    """

    def __init__(self, gap_ops: int = GAP_OPS) -> None:
        self.memories: dict[str, Memory] = {}
        self.pending: dict[str, dict[int, _Held]] = {}
        self.seen: set[str] = set()
        self.rejected: deque[Rejected] = deque(maxlen=100_000)
        self.gap_ops = gap_ops
        self._ops = 0

    def apply(self, op: dict[str, Any], position: int | None = None) -> list[Memory]:
        """Fold ``op`` (and any held-back successors); return the states that changed.

        Raises :class:`FoldError` when ``op`` itself cannot apply; ``position`` (its offset) is
        kept with it if it has to wait for a gap.
        """
        self._ops += 1
        if self.pending:
            self._expire()
        memory_id = op["memory_id"]
        try:
            state = fold(self.memories.get(memory_id), op)
        except VersionGap:
            self.pending.setdefault(memory_id, {})[op["version"]] = _Held(op, position, self._ops)
            return []
        if state is self.memories.get(memory_id):
            return []
        changed = [self._set(state, op["event_id"])]
        waiting = self.pending.get(memory_id, {})
        while state.version + 1 in waiting:
            held = waiting.pop(state.version + 1)
            try:
                state = fold(state, held.op)
            except FoldError as exc:
                self.rejected.append(Rejected(held.op, held.position, str(exc)))
                break
            changed.append(self._set(state, held.op["event_id"]))
        for version in [v for v in waiting if v <= state.version]:  # duplicates of applied ones
            del waiting[version]
        if not waiting:
            self.pending.pop(memory_id, None)
        return changed

    def holds(self, op: dict[str, Any]) -> bool:
        """Whether ``op`` waits in ``pending`` for the version before it."""
        held = self.pending.get(op["memory_id"], {}).get(op["version"])
        return held is not None and held.op["event_id"] == op["event_id"]

    def release_pending(self, reason: str = "its version gap was never filled") -> int:
        """Reject every held op now (the log went quiet with the gap still open)."""
        count = 0
        for memory_id in list(self.pending):
            for held in self.pending.pop(memory_id).values():
                self.rejected.append(Rejected(held.op, held.position, _gap_reason(held, reason)))
                count += 1
        return count

    def _expire(self) -> None:
        limit = self._ops - self.gap_ops
        for memory_id in list(self.pending):
            waiting = self.pending[memory_id]
            for version in [v for v, h in waiting.items() if h.since <= limit]:
                held = waiting.pop(version)
                reason = f"its version gap was not filled within {self.gap_ops} ops"
                self.rejected.append(Rejected(held.op, held.position, _gap_reason(held, reason)))
            if not waiting:
                del self.pending[memory_id]

    def _set(self, state: Memory, event_id: str) -> Memory:
        self.memories[state.memory_id] = state
        self.seen.add(event_id)
        return state

    def get(self, memory_id: str) -> Memory | None:
        return self.memories.get(memory_id)

    def load(self, states: Iterable[Memory]) -> None:
        """Take states folded elsewhere (a snapshot) as the starting point."""
        for state in states:
            self.memories[state.memory_id] = state

    def drop(self, keep: Callable[[Memory], bool]) -> list[Memory]:
        """Forget the memories ``keep`` refuses (a partition handed to another worker); return
        them."""
        gone = [m for m in self.memories.values() if not keep(m)]
        for m in gone:
            del self.memories[m.memory_id]
            self.pending.pop(m.memory_id, None)
        return gone

    def in_cube(self, cube_id: str) -> Iterator[Memory]:
        return (m for m in self.memories.values() if m.cube_id == cube_id)


def _gap_reason(held: _Held, why: str) -> str:
    op = held.op
    return f"{op['memory_id']}: v{op['version']} of {op['op']} held back, but {why}"

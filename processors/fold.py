"""Memory state = fold(memory-ops). The one place that says what an op does to a memory.

Every sink, the reader's own view of a cube, replay and time travel call :func:`fold`. It is pure:
the same ops in the same order always give the same state. Delivery is at-least-once, so an op
whose version is already applied is a duplicate and changes nothing; an op that skips a version
is held back by :class:`MemoryTable` until the missing one arrives.
"""

from __future__ import annotations

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


class MemoryTable:
    """Memories of many cubes, folded from ops delivered at least once and maybe out of order.

    Ops ahead of their memory's next version wait in ``pending`` until the gap is filled.
    ``seen`` holds every applied op's event id, so callers can tell "already done" in O(1).
    """

    def __init__(self) -> None:
        self.memories: dict[str, Memory] = {}
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}
        self.seen: set[str] = set()

    def apply(self, op: dict[str, Any]) -> list[Memory]:
        """Fold ``op`` (and any held-back successors); return the states that changed."""
        memory_id = op["memory_id"]
        try:
            state = fold(self.memories.get(memory_id), op)
        except VersionGap:
            self.pending.setdefault(memory_id, {})[op["version"]] = op
            return []
        if state is self.memories.get(memory_id):
            return []
        changed = [self._set(state, op["event_id"])]
        waiting = self.pending.get(memory_id, {})
        while state.version + 1 in waiting:
            nxt = waiting.pop(state.version + 1)
            state = fold(state, nxt)
            changed.append(self._set(state, nxt["event_id"]))
        if not waiting:
            self.pending.pop(memory_id, None)
        return changed

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

"""Commands: how the one writer turns another processor's request into an op, or refuses it.

Only the writer assigns versions, so the scheduler, the lifecycle and governance never race on
them: they send a command, and the writer checks it against its fold (the memory exists, is in
the cube, allows the op, is at the expected version, has not already had this command applied)
before building the op. Pure: the outcome depends only on the command and the fold, so a command
handled again after a crash yields the same op (same event id) or the same refusal.

IMPORT replays one op of an exported cube into another cube through this same check: the
source's memory ids are mapped into the target cube (:func:`import_memory_id`), the version is
the target fold's, and the command id is derived from the target cube and the source op, so
importing a file twice is a DUPLICATE per op, never a second op.

CREATE (Command.v3) adds a new ACTIVATION or PARAMETER memory, a KV cache or a LoRA adapter
whose tensors are already in MinIO (claim-check), as an ADD at v1 carrying the payload. Its id is
derived from the command (:func:`created_memory_id`: the cube, the memory type and the payload's
sha256), so the same tensors created twice are one memory and a repeated command a DUPLICATE.
``supersedes`` names the memory it replaces (the issuer's previous one of that type); the writer
checks each exists in the cube with the same type. Nothing is written on the replaced memory:
**the cube's current cache or adapter is its newest active memory of that type**
(:func:`current_memory`, newest by the ADD's event time), so a rollback is one command, ARCHIVE
of the current one (the one before it is current again), and a roll forward is RESTORE of it;
both go through the ordinary checks below, which ACTIVATION and PARAMETER memories pass like
plaintext ones (ARCHIVE of an active memory, RESTORE of an archived one). A command's
``evidence`` (the statistics behind a scheduler's decision) is written into its op's reason
(:func:`with_evidence`, read back with :func:`evidence_of`), since MemoryOp has no field of its
own for it and the commands topic is not kept forever.

A re-extraction (``memstream replay --reextract``) writes a new ops generation with new memory
ids, and its writer never saw the commands of the old one applied to its memories. What those
commands did must not be undone by re-reading the interactions: a memory that was deleted stays
deleted. :class:`Carryover` carries it over the event-sourced way. It folds the *base*
generation's ops (the one re-extracted; ``memory-ops`` is kept forever, the commands topic only
30 days) into what each command did (ARCHIVE, RESTORE, EXPIRE, DELETE: :data:`CARRIED`, the ops
no reader emits) and how fusion merged the base's memories, and maps them onto the new
generation by **source item**: a memory's id is uuid5 of its cube, source event and item index
(and generation), so the new memory re-extracted from the same item of the same turn is found
from the old one and back. A command's effect on an old memory applies to the new memories of
every item it held: its own and those fusion had merged into it (their MERGE chain), because
after the command none of them was visible; with another merge threshold the new generation
may keep them apart. The carried op is the writer's own op of the new generation, with the
command's id first in ``caused_by`` (a command carried twice, or handled directly and carried,
is one op), a deterministic event id and the original event time, actor and reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from processors.fold import ALLOWED, FoldError, Memory, fold
from processors.fusion import CubeMemories
from processors.ops import (
    ACTIVATION_PAYLOAD,
    NAMESPACE,
    PARAMETER_PAYLOAD,
    PLAINTEXT_PAYLOAD,
    make_op,
    op_event_id,
)
from processors.ops import memory_id as item_memory_id

Status = Literal["APPLIED", "DUPLICATE", "REJECTED"]
KINDS = ("ACTIVATE", "DEACTIVATE", "ARCHIVE", "RESTORE", "EXPIRE", "DELETE", "IMPORT", "CREATE")
# The memory type a CREATE's payload makes.
CREATED_TYPES = {ACTIVATION_PAYLOAD: "ACTIVATION", PARAMETER_PAYLOAD: "PARAMETER"}
# The fields of an op an IMPORT carries (Command.v2 ``SourceOp``).
SOURCE_OP_FIELDS = ("event_id", "cube_id", "memory_id", "version", "op", "memory_type",
                    "event_time", "actor", "caused_by", "supersedes", "superseded_by", "reason",
                    "payload")  # fmt: skip


def command_id(issuer: str, *parts: str) -> str:
    """A deterministic command id: the issuer and what led to its decision (the same decision
    taken twice, e.g. after the issuer restarts, is the same command)."""
    return str(uuid.uuid5(NAMESPACE, "command/" + "/".join((issuer, *parts))))


@dataclass(frozen=True)
class Outcome:
    """What became of one command: its ops (none unless applied) and the result record."""

    status: Status
    reason: str
    ops: list[dict[str, Any]] = field(default_factory=list)
    version: int | None = None


def apply_command(memories: CubeMemories, command: dict[str, Any]) -> Outcome:
    """Check ``command`` against the fold; when it holds, build its op and fold it at once (the
    next event of the batch must see it)."""
    kind, memory_id = command["command"], command["memory_id"]
    if kind == "IMPORT":
        return _apply_import(memories, command)
    if kind == "CREATE":
        return _apply_create(memories, command)
    state = memories.get(memory_id)

    def refuse(reason: str) -> Outcome:
        return Outcome("REJECTED", reason, version=state.version if state else None)

    if state is None:
        return refuse(f"no memory {memory_id} in cube {command['cube_id']}")
    if state.cube_id != command["cube_id"]:
        return refuse(f"memory {memory_id} belongs to another cube")
    if command["command_id"] in state.caused_by:
        return Outcome("DUPLICATE", "already applied", version=state.version)
    expected = command.get("expected_version")
    if expected is not None and expected != state.version:
        return refuse(f"memory is at v{state.version}, the command expected v{expected}")
    if kind not in ALLOWED[state.status]:
        return refuse(f"{kind} is not allowed on a {state.status} memory")
    if kind == "ACTIVATE" and state.activated and not command.get("payload"):
        return refuse("already activated")
    if kind == "DEACTIVATE" and not state.activated:
        return refuse("not activated")
    payload = command.get("payload")
    if payload and (kind != "ACTIVATE" or payload_branch(_body(payload)) != ACTIVATION_PAYLOAD):
        return refuse(f"{kind} carries a payload only ACTIVATE with an ActivationPayload may")
    op = make_op(
        event_id=op_event_id(command["command_id"], 0, kind, memory_id),
        cube_id=state.cube_id,
        memory_id=memory_id,
        version=state.version + 1,
        op=kind,
        memory_type=state.memory_type,
        event_time=command["event_time"],
        actor=command["issued_by"],
        caused_by=[command["command_id"]],
        reason=with_evidence(
            command.get("reason") or f"command {command['command_id']}", command.get("evidence")
        ),
        payload=(ACTIVATION_PAYLOAD, dict(_body(payload))) if payload else None,
    )
    memories.apply(op)
    return Outcome("APPLIED", f"{kind} v{op['version']}", [op], op["version"])


def _body(payload: dict[str, Any] | tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """A payload's record, whether decoded (a dict) or built here (a tagged tuple)."""
    return payload[1] if isinstance(payload, tuple) else payload


_EVIDENCE = re.compile(r" \[evidence (\{.*\})\]$")


def with_evidence(reason: str, evidence: dict[str, float] | None) -> str:
    """The op's reason: the command's, then its evidence as ``[evidence {json}]`` (sorted keys),
    so the statistics that led to a decision stay on record with the op."""
    if not evidence:
        return reason
    return f"{reason} [evidence {json.dumps(dict(sorted(evidence.items())))}]"


def evidence_of(reason: str) -> dict[str, float]:
    """The evidence :func:`with_evidence` wrote into an op's reason (empty if none)."""
    match = _EVIDENCE.search(reason)
    return {k: float(v) for k, v in json.loads(match[1]).items()} if match else {}


def created_memory_id(cube_id: str, memory_type: str, sha256: str) -> str:
    """The id of the ACTIVATION or PARAMETER memory a CREATE of tensors ``sha256`` makes in
    ``cube_id``: the same content created twice is the same memory."""
    return str(uuid.uuid5(NAMESPACE, f"create/{cube_id}/{memory_type}/{sha256}"))


def payload_sha256(body: dict[str, Any]) -> str:
    """The sha256 a payload names (its tensors'), or, lacking one, of the payload itself."""
    if body.get("sha256"):
        return str(body["sha256"])
    canonical = json.dumps(body, sort_keys=True, default=str).encode()
    return hashlib.sha256(canonical).hexdigest()


def create_command(
    cube_id: str,
    payload: tuple[str, dict[str, Any]],
    issued_by: str,
    event_time: Any,
    *,
    supersedes: Iterable[str] = (),
    reason: str = "",
    evidence: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The CREATE command of a new activation (``ActivationPayload``) or parameter
    (``ParameterPayload``) memory, ``payload`` a tagged ``(branch, record)``. Its memory id and
    command id both follow from the cube and the content, so an issuer that restarts and
    creates the same tensors again sends the same command."""
    branch, body = payload
    if branch not in CREATED_TYPES:
        raise ValueError(f"CREATE makes activation or parameter memories, not {branch}")
    memory_type, sha = CREATED_TYPES[branch], payload_sha256(body)
    superseded = list(supersedes)
    issuer = issued_by.split("/")[0]
    return {
        "command_id": command_id(issuer, "CREATE", cube_id, memory_type, sha, *superseded),
        "cube_id": cube_id,
        "memory_id": created_memory_id(cube_id, memory_type, sha),
        "command": "CREATE",
        "issued_by": issued_by,
        "event_time": event_time,
        "reason": reason or f"new {memory_type.lower()} memory {sha[:12]}",
        "expected_version": None,
        "evidence": dict(evidence or {}),
        "payload": payload,
        "source_op": None,
        "supersedes": superseded,
    }


def current_memory(memories: Iterable[Memory], cube_id: str, memory_type: str) -> Memory | None:
    """The cube's current memory of ``memory_type`` (its KV cache, its adapter): the newest
    active one, by the event time of its ADD, then its id. ARCHIVE of it rolls back to the one
    before; RESTORE rolls forward again."""
    live = [
        m
        for m in memories
        if m.cube_id == cube_id and m.memory_type == memory_type and m.status == "active"
    ]
    return max(live, key=lambda m: (m.created_at, m.memory_id), default=None)


def _apply_create(memories: CubeMemories, command: dict[str, Any]) -> Outcome:
    """Add the command's activation or parameter memory at v1, if its id is the one derived
    from its content and every memory it supersedes is in the cube with the same type."""
    cube, memory_id, payload = command["cube_id"], command["memory_id"], command.get("payload")
    state = memories.get(memory_id)

    def refuse(reason: str) -> Outcome:
        return Outcome("REJECTED", reason, version=state.version if state else None)

    if not payload:
        return refuse("CREATE carries no payload")
    body = dict(_body(payload))
    branch = payload[0] if isinstance(payload, tuple) else payload_branch(body)
    if branch not in CREATED_TYPES:
        return refuse("CREATE makes ACTIVATION or PARAMETER memories (a plaintext memory comes "
                      "from an interaction)")  # fmt: skip
    memory_type = CREATED_TYPES[branch]
    expected = created_memory_id(cube, memory_type, payload_sha256(body))
    if memory_id != expected:
        return refuse(f"memory {memory_id} is not the id of this content ({expected})")
    if state is not None:
        if state.cube_id == cube and command["command_id"] in state.caused_by:
            return Outcome("DUPLICATE", "already applied", version=state.version)
        return refuse(f"memory {memory_id} already exists (v{state.version}, {state.status})")
    supersedes = list(command.get("supersedes") or ())
    for old_id in supersedes:
        old = memories.get(old_id)
        if old is None or old.cube_id != cube:
            return refuse(f"supersedes {old_id}, which is not a memory of cube {cube}")
        if old.memory_type != memory_type:
            return refuse(f"supersedes {old_id}, a {old.memory_type} memory, not {memory_type}")
    op = make_op(
        event_id=op_event_id(command["command_id"], 0, "ADD", memory_id),
        cube_id=cube,
        memory_id=memory_id,
        version=1,
        op="ADD",
        memory_type=memory_type,
        event_time=command["event_time"],
        actor=command["issued_by"],
        caused_by=[command["command_id"]],
        supersedes=supersedes,
        reason=with_evidence(
            command.get("reason") or f"command {command['command_id']}", command.get("evidence")
        ),
        payload=(branch, body),
    )
    memories.apply(op)
    return Outcome("APPLIED", f"CREATE {memory_type} v1", [op], 1)


def import_memory_id(cube_id: str, source_memory_id: str) -> str:
    """The id a memory of another cube gets when imported into ``cube_id``: deterministic, so
    every op of that memory (and every supersedes / superseded_by naming it) lands on it."""
    return str(uuid.uuid5(NAMESPACE, f"import/{cube_id}/{source_memory_id}"))


def payload_branch(payload: dict[str, Any]) -> str:
    """Which payload record a decoded payload dict is (the codec returns the dict untagged)."""
    if "text" in payload:
        return PLAINTEXT_PAYLOAD
    if "base_model_id" in payload:
        return PARAMETER_PAYLOAD
    if "model_id" in payload:
        return ACTIVATION_PAYLOAD
    raise ValueError(f"unknown payload with fields {sorted(payload)}")


def import_command(cube_id: str, source_op: dict[str, Any], issued_by: str) -> dict[str, Any]:
    """The IMPORT command replaying ``source_op`` (an op of an exported cube) into ``cube_id``.
    Its id is derived from the target cube and the source op's event id: the same file imported
    twice sends the same commands, which the writer answers DUPLICATE."""
    carried = {name: source_op.get(name) for name in SOURCE_OP_FIELDS}
    payload = carried["payload"]
    if payload and not isinstance(payload, tuple):
        carried["payload"] = (payload_branch(payload), payload)
    return {
        "command_id": command_id("import", cube_id, source_op["event_id"]),
        "cube_id": cube_id,
        "memory_id": import_memory_id(cube_id, source_op["memory_id"]),
        "command": "IMPORT",
        "issued_by": issued_by,
        "event_time": source_op["event_time"],
        "reason": f"import of op {source_op['event_id']} of cube {source_op['cube_id']}",
        "expected_version": None,
        "evidence": {},
        "payload": None,
        "source_op": carried,
    }


def _apply_import(memories: CubeMemories, command: dict[str, Any]) -> Outcome:
    """Replay the command's source op on the mapped memory at the fold's next version, if the
    fold allows it there (a memory the target already holds is never created again)."""
    cube, target, source = command["cube_id"], command["memory_id"], command.get("source_op")
    state = memories.get(target)

    def refuse(reason: str) -> Outcome:
        return Outcome("REJECTED", reason, version=state.version if state else None)

    if not source:
        return refuse("IMPORT carries no source op")
    if target != import_memory_id(cube, source["memory_id"]):
        return refuse(f"memory {target} is not the import of {source['memory_id']} into {cube}")
    if state is not None and state.cube_id != cube:
        return refuse(f"memory {target} belongs to another cube")
    if state is not None and command["command_id"] in state.caused_by:
        return Outcome("DUPLICATE", "already applied", version=state.version)
    kind = source["op"]
    if state is not None and source["version"] == 1:
        return refuse(f"{kind} of a memory the cube already holds (v{state.version}, "
                      f"{state.status})")  # fmt: skip
    if state is None and source["version"] != 1:
        return refuse(f"{kind} v{source['version']} of a memory the cube does not hold")
    try:
        payload = _mapped_payload(cube, source.get("payload"))
    except ValueError as exc:
        return refuse(str(exc))
    superseded_by = source.get("superseded_by")
    op = make_op(
        event_id=op_event_id(command["command_id"], 0, kind, target),
        cube_id=cube,
        memory_id=target,
        version=state.version + 1 if state else 1,
        op=kind,
        memory_type=source["memory_type"],
        event_time=command["event_time"],
        actor=command["issued_by"],
        caused_by=[command["command_id"], *source.get("caused_by", ())],
        supersedes=[import_memory_id(cube, m) for m in source.get("supersedes", ())],
        superseded_by=import_memory_id(cube, superseded_by) if superseded_by else None,
        reason=source.get("reason", ""),
        payload=payload,
    )
    try:
        fold(state, op)
    except FoldError as exc:
        return refuse(str(exc))
    memories.apply(op)
    return Outcome("APPLIED", f"IMPORT {kind} v{op['version']}", [op], op["version"])


def _mapped_payload(
    cube_id: str, payload: dict[str, Any] | tuple[str, dict[str, Any]] | None
) -> tuple[str, dict[str, Any]] | None:
    """The source payload as it is in the target cube: plaintext carried over as it is, the
    memory ids an activation or parameter memory was computed from mapped like the memory."""
    if not payload:
        return None
    branch, body = payload if isinstance(payload, tuple) else (payload_branch(payload), payload)
    body = dict(body)
    for ids in ("memory_ids", "trained_on"):
        if ids in body:
            body[ids] = [import_memory_id(cube_id, m) for m in body[ids]]
    return branch, body


def result_record(command: dict[str, Any], outcome: Outcome, source: dict[str, Any]) -> dict:
    """The ``CommandResult`` event of an outcome. Its id is derived from the command message's
    place in the log: handling that message again (after a crash) yields the same result, while
    a second copy of the command is a second record (a DUPLICATE)."""
    where = f"{source['topic']}/{source['partition']}/{source['offset']}"
    return {
        "event_id": str(uuid.uuid5(NAMESPACE, f"command-result/{command['command_id']}/{where}")),
        "command_id": command["command_id"],
        "cube_id": command["cube_id"],
        "memory_id": command["memory_id"],
        "command": command["command"],
        "issued_by": command["issued_by"],
        "status": outcome.status,
        "reason": outcome.reason,
        "op_event_ids": [op["event_id"] for op in outcome.ops],
        "version": outcome.version,
        "event_time": command["event_time"],
        "source": source,
    }


#: What a command does to a memory that a re-extraction carries over (no reader emits these).
CARRIED = ("ARCHIVE", "RESTORE", "EXPIRE", "DELETE")
#: The most items a search for a memory's item index tries (one interaction yields few).
MAX_ITEMS = 256


@dataclass(frozen=True)
class Effect:
    """An op of the base generation that a command caused, at ``position`` (its offset in the
    cube's partition of memory-ops: the order the effects happened in)."""

    memory_id: str
    kind: str
    command_id: str
    event_id: str
    event_time: datetime
    actor: str
    reason: str
    position: int


@dataclass
class _CubeRecord:
    merged_into: dict[str, str] = field(default_factory=dict)
    predecessors: dict[str, list[str]] = field(default_factory=dict)
    effects: dict[str, list[Effect]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    #: new memory id -> the base memory of the same source item (None: none), computed once.
    counterparts: dict[str, str | None] = field(default_factory=dict)


class Carryover:
    """What the commands did to ops generation ``base``, carried over to ``generation``, a
    re-extraction of the same interactions (see the module's docstring).

    Fed the base's ops in log order (:meth:`observe`), it answers for a memory of the new
    generation which effects it must have (:meth:`carry` builds and folds the ops), whenever
    either side becomes known: when the item is re-extracted, or when the base's effect is
    read. Pure and deterministic: the same log gives the same ops, and an effect already
    carried (its command id in the memory's ``caused_by``) is never carried twice.
    """

    def __init__(self, base: int, generation: int) -> None:
        if base >= generation:
            raise ValueError(f"ops generation {generation} cannot carry over from {base}")
        self.base = base
        self.generation = generation
        self._cubes: dict[str, _CubeRecord] = {}

    def observe(self, op: dict[str, Any], position: int) -> set[str]:
        """Fold one op of the log (only the base's matter). Returns the base memories whose
        counterparts in the new generation may now need an effect carried over."""
        if op.get("generation", 0) != self.base:
            return set()
        kind, cube = op["op"], op["cube_id"]
        record = self._cubes.setdefault(cube, _CubeRecord())
        if kind == "MERGE" and op["version"] > 1 and op.get("superseded_by"):
            merged, into = op["memory_id"], op["superseded_by"]
            if record.merged_into.get(merged) == into:
                return set()
            record.merged_into[merged] = into
            record.predecessors.setdefault(into, []).append(merged)
            return self.lineage(cube, merged) if self.effects_on(cube, into) else set()
        if kind not in CARRIED or op["event_id"] in record.seen:
            return set()
        record.seen.add(op["event_id"])
        caused_by = list(op.get("caused_by") or ())
        effect = Effect(op["memory_id"], kind, caused_by[0] if caused_by else op["event_id"],
                        op["event_id"], op["event_time"], op.get("actor") or "",
                        op.get("reason") or "", position)  # fmt: skip
        record.effects.setdefault(op["memory_id"], []).append(effect)
        return self.lineage(cube, op["memory_id"])

    def drop_cubes(self, gone: Callable[[str], bool]) -> None:
        """Forget the cubes of partitions this writer no longer owns."""
        for cube in [c for c in self._cubes if gone(c)]:
            del self._cubes[cube]

    def lineage(self, cube: str, memory_id: str) -> set[str]:
        """A base memory and every base memory fusion merged into it, transitively."""
        record = self._cubes.get(cube)
        found, todo = {memory_id}, [memory_id]
        while record is not None and todo:
            for merged in record.predecessors.get(todo.pop(), ()):
                if merged not in found:
                    found.add(merged)
                    todo.append(merged)
        return found

    def effects_on(self, cube: str, memory_id: str) -> list[Effect]:
        """The effects that apply to the items of a base memory: on it and on every memory it
        was merged into since (its MERGE chain), in the order they happened."""
        record = self._cubes.get(cube)
        if record is None:
            return []
        found: list[Effect] = []
        at: str | None = memory_id
        visited: set[str] = set()
        while at is not None and at not in visited:
            visited.add(at)
            found.extend(record.effects.get(at, ()))
            at = record.merged_into.get(at)
        return sorted(found, key=lambda e: e.position)

    def counterpart(self, memory: Memory) -> str | None:
        """The base memory extracted from the same item of the same source turn as ``memory``
        (None for a memory no interaction made here: created, imported)."""
        record = self._cubes.setdefault(memory.cube_id, _CubeRecord())
        if memory.memory_id in record.counterparts:
            return record.counterparts[memory.memory_id]
        found = None
        event = (memory.source or {}).get("event_id")
        if memory.memory_type == "PLAINTEXT" and event:
            for index in range(MAX_ITEMS):
                if item_memory_id(memory.cube_id, event, index, self.generation) == (
                    memory.memory_id
                ):
                    found = item_memory_id(memory.cube_id, event, index, self.base)
                    break
        record.counterparts[memory.memory_id] = found
        return found

    def counterparts_of(self, memories: CubeMemories, cube: str, base_ids: set[str]) -> list[str]:
        """The memories of the new generation re-extracted from the items of ``base_ids``."""
        with memories.lock:
            members = list(memories.table.in_cube(cube))
        return [m.memory_id for m in members if self.counterpart(m) in base_ids]

    def carry(self, memories: CubeMemories, memory_id: str) -> list[dict[str, Any]]:
        """Fold and return the ops that give a memory of the new generation the effects its
        base counterpart's commands had, those not carried yet: the ones after the last one it
        already has, each where its state allows it (a merged memory is not archived)."""
        state = memories.get(memory_id)
        old = self.counterpart(state) if state is not None else None
        if state is None or old is None:
            return []
        effects = self.effects_on(state.cube_id, old)
        done = [i for i, e in enumerate(effects) if e.command_id in state.caused_by]
        ops = []
        for effect in effects[done[-1] + 1 if done else 0 :]:
            op = self._carried_op(memories, memory_id, effect, old)
            if op is not None:
                ops.append(op)
        return ops

    def command(self, memories: CubeMemories, command: dict[str, Any]) -> Outcome:
        """A command naming a memory of the base generation (not one of this generation):
        applied to the memories re-extracted from its items, as the base applied it (or, if the
        base has not answered it yet, as it is: without an expected version, which names a
        version of the base's memory)."""
        kind, cube, old = command["command"], command["cube_id"], command["memory_id"]
        targets = self.counterparts_of(memories, cube, self.lineage(cube, old))
        if not targets:
            return Outcome("REJECTED", f"no memory {old} in cube {cube} in ops generation "
                           f"{self.generation} (a memory of generation {self.base}: what "
                           "commands did to it is carried over to the memories re-extracted "
                           "from its source turns)")  # fmt: skip
        known = any(e.command_id == command["command_id"] for e in self.effects_on(cube, old))
        ops: list[dict[str, Any]] = []
        if known:  # the base applied it: carry that, with whatever came before it
            for target in targets:
                ops.extend(self.carry(memories, target))
        elif command.get("expected_version") is not None:
            return Outcome("REJECTED", f"it expects v{command['expected_version']} of memory "
                           f"{old} of ops generation {self.base}, which generation "
                           f"{self.generation} does not have")  # fmt: skip
        else:
            effect = Effect(old, kind, command["command_id"], command["command_id"],
                            command["event_time"], command["issued_by"],
                            with_evidence(command.get("reason") or f"command "
                                          f"{command['command_id']}", command.get("evidence")),
                            -1)  # fmt: skip
            for target in targets:
                op = self._carried_op(memories, target, effect, old)
                if op is not None:
                    ops.append(op)
        if not ops:
            states = [memories.get(t) for t in targets]
            applied = all(s is not None and command["command_id"] in s.caused_by for s in states)
            return Outcome("DUPLICATE" if applied else "REJECTED",
                           "already applied" if applied else f"{kind} is not allowed on the "
                           f"memories re-extracted from {old}")  # fmt: skip
        return Outcome("APPLIED", f"{kind} of memory {old} of ops generation {self.base} "
                       f"carried to {', '.join(op['memory_id'] for op in ops)}", ops,
                       ops[0]["version"])  # fmt: skip

    def _carried_op(
        self, memories: CubeMemories, memory_id: str, effect: Effect, old: str
    ) -> dict[str, Any] | None:
        state = memories.get(memory_id)
        if state is None or effect.command_id in state.caused_by:
            return None
        if effect.kind not in ALLOWED[state.status]:
            return None
        named = f" (into which {old} had been merged)" if effect.memory_id != old else ""
        op = make_op(
            event_id=op_event_id(effect.event_id, 0, effect.kind, memory_id, self.generation),
            cube_id=state.cube_id,
            memory_id=memory_id,
            version=state.version + 1,
            op=effect.kind,
            memory_type=state.memory_type,
            event_time=effect.event_time,
            actor=effect.actor,
            caused_by=list(dict.fromkeys([effect.command_id, effect.event_id])),
            reason=f"carried over from ops generation {self.base}: {effect.kind} of memory "
            f"{effect.memory_id}{named} by command {effect.command_id}: {effect.reason}",
            generation=self.generation,
        )
        memories.apply(op)
        return op

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
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from processors.fold import ALLOWED, FoldError, fold
from processors.fusion import CubeMemories
from processors.ops import (
    ACTIVATION_PAYLOAD,
    NAMESPACE,
    PARAMETER_PAYLOAD,
    PLAINTEXT_PAYLOAD,
    make_op,
    op_event_id,
)

Status = Literal["APPLIED", "DUPLICATE", "REJECTED"]
KINDS = ("ACTIVATE", "DEACTIVATE", "ARCHIVE", "RESTORE", "EXPIRE", "DELETE", "IMPORT")
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
        reason=command.get("reason") or f"command {command['command_id']}",
        payload=(ACTIVATION_PAYLOAD, dict(payload)) if payload else None,
    )
    memories.apply(op)
    return Outcome("APPLIED", f"{kind} v{op['version']}", [op], op["version"])


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

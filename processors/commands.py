"""Commands: how the one writer turns another processor's request into an op, or refuses it.

Only the writer assigns versions, so the scheduler, the lifecycle and governance never race on
them: they send a command, and the writer checks it against its fold (the memory exists, is in
the cube, allows the op, is at the expected version, has not already had this command applied)
before building the op. Pure: the outcome depends only on the command and the fold, so a command
handled again after a crash yields the same op (same event id) or the same refusal.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from processors.fold import ALLOWED
from processors.fusion import CubeMemories
from processors.ops import ACTIVATION_PAYLOAD, NAMESPACE, make_op, op_event_id

Status = Literal["APPLIED", "DUPLICATE", "REJECTED"]
KINDS = ("ACTIVATE", "DEACTIVATE", "ARCHIVE", "RESTORE", "EXPIRE", "DELETE")


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

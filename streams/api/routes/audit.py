"""Read-only SQL on the audit tables, checked and run by :mod:`sinks.audit_sql`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from sinks.audit_sql import AuditError, AuditUnavailable
from streams.api.deps import Service, service
from streams.api.limits import ErrorBody

#: The longest statement taken (a statement is text a person writes; the body limit is far more).
AUDIT_SQL_CHARS = 64 * 1024

router = APIRouter(tags=["audit"])
ServiceDep = Annotated[Service, Depends(service)]


class AuditQuery(BaseModel):
    sql: str = Field(min_length=1, max_length=AUDIT_SQL_CHARS)


class AuditProblem(BaseModel):
    """Why a statement did not run, in our words (never the engine's message)."""

    error: Literal["audit_refused", "audit_failed", "audit_unavailable"]
    code: str = Field(description="A stable code: the policy's, or ClickHouse's error name.")
    reason: str


class AuditErrorBody(BaseModel):
    detail: AuditProblem


@router.post(
    "/v1/audit",
    responses={
        400: {"model": AuditErrorBody | ErrorBody,
              "description": "Refused by the policy, or failed; or a body that is not JSON."},
        503: {"model": AuditErrorBody | ErrorBody,
              "description": "ClickHouse cannot be reached, or this role has no views."},
    },
)  # fmt: skip
async def audit(body: AuditQuery, svc: ServiceDep) -> list[dict[str, Any]]:
    """One read-only SELECT on the audit tables (memory_ops, memory_versions, queries,
    command_results), under fixed limits, on a read connection of its own (the views writer
    never waits for it). 400 when it is refused or fails, 503 when ClickHouse cannot be reached,
    with ``{"detail": {"error": "audit_refused" | "audit_failed" | "audit_unavailable", "code":
    ..., "reason": ...}}``: a refusal says why in the policy's words, a failure gives
    ClickHouse's error name and a reason of ours, never the engine's message (it can hold what
    the query computed)."""
    stores = svc.stores()
    try:
        return await run_in_threadpool(stores.audit, body.sql)
    except AuditUnavailable as exc:
        raise HTTPException(503, exc.as_dict()) from None
    except AuditError as exc:
        raise HTTPException(400, exc.as_dict()) from None

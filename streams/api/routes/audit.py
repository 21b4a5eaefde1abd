"""Read-only SQL on the audit tables."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from streams.api.deps import Service, service

router = APIRouter(tags=["audit"])
ServiceDep = Annotated[Service, Depends(service)]
READ_ONLY_SQL = re.compile(r"^\s*(select|with|show|describe|desc|explain)\b", re.IGNORECASE)


class AuditQuery(BaseModel):
    sql: str = Field(min_length=1)


@router.post("/v1/audit")
async def audit(body: AuditQuery, svc: ServiceDep) -> list[dict[str, Any]]:
    """Read-only SQL on the audit tables (memory_ops, queries, command_results,
    memory_versions)."""
    if not READ_ONLY_SQL.match(body.sql):
        raise HTTPException(400, "only SELECT / WITH / SHOW / DESCRIBE queries are allowed")
    stores = svc.stores()
    try:
        return await run_in_threadpool(stores.audit, body.sql)
    except Exception as exc:
        raise HTTPException(400, f"query failed: {exc}") from exc

"""Access statistics per memory, from the Faust agent: what the scheduler reads to decide heat."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from streams.api.deps import Service, service
from streams.api.limits import CubePath, MemoryPath, errors
from streams.pipeline.agents import AccessStatsAgent

router = APIRouter(tags=["access"])
ServiceDep = Annotated[Service, Depends(service)]


def _agent(svc: Service) -> AccessStatsAgent:
    agent = svc.runtime.host.get("access-stats")
    if not isinstance(agent, AccessStatsAgent):
        raise HTTPException(
            503, f"no access-stats agent in this process (role {svc.runtime.role!r})"
        )
    return agent


@router.get("/v1/cubes/{cube_id}/access", responses=errors(503))
async def cube_access(
    cube_id: CubePath, svc: ServiceDep, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> list[dict[str, Any]]:
    """The cube's most retrieved memories, hottest first: hits and rank-weighted score over
    the last hour and all time, best rank, last hit."""
    return _agent(svc).top(cube_id, limit)


@router.get("/v1/cubes/{cube_id}/memories/{memory_id}/access", responses=errors(404, 503))
async def memory_access(
    cube_id: CubePath, memory_id: MemoryPath, svc: ServiceDep
) -> dict[str, Any]:
    """One memory's access statistics (404 if no search has returned it)."""
    found = _agent(svc).memory(cube_id, memory_id)
    if found is None:
        raise HTTPException(404, f"no search has returned memory {memory_id} yet")
    return found

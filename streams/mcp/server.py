"""The MCP server of ``memstream mcp``: an agent's memory as MCP tools and resources.

Why over the HTTP API (through the SDK client) and not in the worker: an MCP server is started
per agent, often by the agent's host over stdio; it must be light (no Kafka, no stores, no
embedder) and talk to whichever ``memstream serve`` holds the views.

Tools: ``add`` (publish interactions), ``search``, ``get`` (a memory by id), ``history`` (its
versions). Resource: ``memstream://cubes/{cube_id}/updates``, the cube's recent memory updates.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any, Literal

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import BaseModel, Field

from streams.sdk.client import AsyncMemoryClient
from streams.sdk.http import APIError

UPDATES_URI = "memstream://cubes/{cube_id}/updates"


class Message(BaseModel):
    """One interaction to remember: what was said, by whom, when."""

    content: str = Field(min_length=1, description="what was said")
    speaker: str = Field("user", min_length=1, description="who said it")
    session_id: str = "default"
    event_time: datetime | None = Field(None, description="when it was said (default: now)")


@contextmanager
def api_errors(error: type[Exception]) -> Iterator[None]:
    """An API failure (down, 404, 422) reaches the model with its reason, not as a crash."""
    try:
        yield
    except (httpx.HTTPError, APIError) as exc:
        raise error(f"memstream API: {exc}") from exc


def build_server(base_url: str | None = None) -> MCPServer[AsyncMemoryClient]:
    """The server, talking to the memstream API at ``base_url`` (default: the settings')."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[AsyncMemoryClient]) -> AsyncIterator[AsyncMemoryClient]:
        client = AsyncMemoryClient(base_url)
        try:
            yield client
        finally:
            await client.aclose()

    server: MCPServer[AsyncMemoryClient] = MCPServer(
        "memstream",
        instructions=(
            "Long-term memory of this agent, kept per cube (a user, an agent, a project). "
            "Call add with what was said, search before answering, get/history for one memory."
        ),
        lifespan=lifespan,
    )

    def api(ctx: Context) -> AsyncMemoryClient:
        return ctx.request_context.lifespan_context

    @server.tool()
    async def add(cube_id: str, messages: list[Message], ctx: Context) -> list[dict[str, Any]]:
        """Publish interactions to a cube's memory; returns their event ids and log positions.
        They become searchable memories within a second or so."""
        interactions = [m.model_dump(exclude_none=True) for m in messages]
        with api_errors(ToolError):
            return await api(ctx).publish(cube_id, interactions)

    @server.tool()
    async def search(
        cube_id: str,
        query: str,
        ctx: Context,
        top_k: int = 10,
        include_history: bool = False,
    ) -> dict[str, Any]:
        """Search a cube's memories (dense + keyword, fused); each hit has memory_id, text and
        score. include_history also returns facts that were replaced."""
        with api_errors(ToolError):
            return await api(ctx).search(cube_id, query, top_k, include_history=include_history)

    @server.tool()
    async def get(memory_id: str, ctx: Context) -> dict[str, Any]:
        """One memory by id: its text, state, version, tags and validity."""
        with api_errors(ToolError):
            return await api(ctx).memory(memory_id)

    @server.tool()
    async def history(memory_id: str, ctx: Context) -> list[dict[str, Any]]:
        """Every version of a memory, with the memories it replaced or that replaced it."""
        with api_errors(ToolError):
            return await api(ctx).history(memory_id)

    @server.resource(UPDATES_URI, mime_type="application/json")
    async def updates(cube_id: str, ctx: Context) -> str:
        """The cube's most recent memory updates (ADD, UPDATE, MERGE, ...), oldest first."""
        with api_errors(ResourceError):
            recent = await api(ctx).recent_updates(cube_id, limit=50)
        return json.dumps([u.to_json() | {"raw": None} for u in recent])

    return server


def run(
    base_url: str | None = None,
    transport: Literal["stdio", "streamable-http"] = "stdio",
    host: str = "127.0.0.1",
    port: int = 8765,
) -> None:
    """Serve until the client hangs up (stdio) or the process is stopped (streamable-http)."""
    server = build_server(base_url)
    if transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=host, port=port)

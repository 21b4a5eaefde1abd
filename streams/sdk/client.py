"""Python SDK for the HTTP API: :class:`MemoryClient` (sync) and :class:`AsyncMemoryClient`.

Both raise :class:`~streams.sdk.http.APIError` for an error answer (its status code and reason);
the sync client raises :class:`~streams.sdk.http.APIUnavailable` when nothing answers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

import httpx

from streams.sdk.http import APIError, APIUnavailable, Http, detail_of
from streams.sdk.subscribe import MemoryUpdate, http_updates
from streams.settings import Settings
from streams.transport.events import Interaction
from streams.transport.producer import EventProducer


class AuditQueryError(APIError):
    """``POST /v1/audit`` did not answer rows: refused by the audit policy (400,
    ``error="audit_refused"``), failed in ClickHouse (400, ``"audit_failed"``) or found no
    ClickHouse (503, ``"audit_unavailable"``). ``code`` is stable (the policy's, or ClickHouse's
    error name) and ``reason`` is the API's words, never ClickHouse's message."""

    def __init__(self, status_code: int, error: str, code: str, reason: str) -> None:
        super().__init__(status_code, reason)
        self.error, self.code, self.reason = error, code, reason


def _audit_error(exc: APIError) -> APIError:
    """The audit error an error answer of ``/v1/audit`` describes, else ``exc`` itself."""
    try:
        detail = json.loads(exc.detail)
    except ValueError:
        return exc
    if isinstance(detail, dict) and {"error", "code", "reason"} <= detail.keys():
        return AuditQueryError(exc.status_code, str(detail["error"]), str(detail["code"]),
                               str(detail["reason"]))  # fmt: skip
    return exc


def _interaction_json(item: dict[str, Any]) -> dict[str, Any]:
    body = dict(item)
    if isinstance(body.get("event_time"), datetime):
        body["event_time"] = body["event_time"].isoformat()
    return body


def _search_params(q: str, top_k: int, **filters: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"q": q, "top_k": top_k}
    for key, value in filters.items():
        if value is None or value is False:
            continue
        params[key] = value.isoformat() if isinstance(value, datetime) else value
    return params


def _as_of(as_of: datetime | int | None) -> dict[str, Any]:
    if as_of is None:
        return {}
    return {"as_of": as_of.isoformat() if isinstance(as_of, datetime) else str(as_of)}


class MemoryClient:
    """Publish, search and inspect memories through a running ``memstream serve``.

    ``kafka=True`` publishes straight to the log with the idempotent producer (no HTTP hop);
    reads always go through the API, which owns the views.
    """

    def __init__(
        self, base_url: str | None = None, timeout: float = 60.0, kafka: bool = False,
        settings: Settings | None = None,
    ) -> None:  # fmt: skip
        settings = settings or Settings()
        self._http = Http(base_url or settings.api_url, timeout)
        self._producer = EventProducer(settings) if kafka else None

    def publish(self, cube_id: str, interactions: Iterable[dict[str, Any]]) -> list[dict]:
        """Publish interactions (dicts with content, speaker, ...); returns their log positions
        once the broker has acknowledged them."""
        if self._producer is not None:
            events = [Interaction(cube_id=cube_id, **i) for i in interactions]
            delivered = self._producer.publish_interactions(events)
            return [
                {"event_id": e.event_id, **dataclasses.asdict(d)}
                for e, d in zip(events, delivered, strict=True)
            ]
        body = [_interaction_json(i) for i in interactions]
        return self._http.json("POST", f"/v1/cubes/{cube_id}/interactions", body=body)

    def search(self, cube_id: str, q: str, top_k: int = 10, **filters: Any) -> dict[str, Any]:
        """filters: since, until (datetimes), tags (list), include_history (bool), actor,
        as_of (a datetime or a log offset: the cube as it was then)."""
        params = _search_params(q, top_k, **filters)
        return self._http.json("GET", f"/v1/cubes/{cube_id}/search", params)

    def memory(self, memory_id: str, as_of: datetime | int | None = None) -> dict[str, Any]:
        params = _as_of(as_of)
        return self._http.json("GET", f"/v1/memories/{memory_id}", params)

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        return self._http.json("GET", f"/v1/memories/{memory_id}/history")

    def memories(
        self, cube_id: str, limit: int = 1000, as_of: datetime | int | None = None
    ) -> list[dict[str, Any]]:
        params = {"limit": limit, **_as_of(as_of)}
        return self._http.json("GET", f"/v1/cubes/{cube_id}/memories", params)

    def replay(self, mode: str, reader: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start building the next view generation: ``rebuild`` (refold the ops) or
        ``reextract`` (rerun the reader, with ``reader`` settings); see :meth:`replay_status`."""
        body = {"mode": mode, "reader": reader or {}}
        return self._http.json("POST", "/v1/replay", body=body)

    def replay_status(self) -> dict[str, Any]:
        """The generation pointer (current, next, retired) and the next one's progress."""
        return self._http.json("GET", "/v1/replay")

    def audit(self, sql: str) -> list[dict[str, Any]]:
        """The rows of one read-only SELECT on the audit tables; :class:`AuditQueryError` when
        it is refused or fails."""
        try:
            return self._http.json("POST", "/v1/audit", body={"sql": sql})
        except APIError as exc:
            raise _audit_error(exc) from None

    def status(self, lag: bool = True) -> dict[str, Any]:
        """``GET /v1/status``; ``lag=False`` skips the group lag (the part that asks Kafka)."""
        return self._http.json("GET", "/v1/status", {"lag": lag})

    def chat(
        self, cube_id: str, message: str | None = None,
        messages: list[dict[str, str]] | None = None, stream: bool = False, **options: Any,
    ) -> Any:  # fmt: skip
        """A chat turn with the cube's memory (``POST /v1/cubes/{cube}/chat``). ``stream``: an
        iterator of ``(event, data)``, ``token`` events then ``done``; else the ``done`` dict.
        options: max_new_tokens, temperature, top_k, session_id, user, publish, debug."""
        from streams.sdk.chat import chat_body, chat_events, chat_once

        body = chat_body(message, messages, **options)
        if stream:
            return chat_events(self._http, cube_id, body)
        return chat_once(self._http, cube_id, body)

    def access(self, cube_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The cube's most retrieved memories, hottest first (the access-stats agent)."""
        return self._http.json("GET", f"/v1/cubes/{cube_id}/access", {"limit": limit})

    def ready(self) -> bool:
        """``/readyz``: every processor of the process runs and has caught up."""
        return self._http.status("GET", "/readyz") == 200

    def command(self, cube_id: str, memory_id: str, command: str, **fields: Any) -> dict[str, Any]:
        """Ask the writer to ACTIVATE, DEACTIVATE, ARCHIVE, RESTORE, EXPIRE or DELETE a memory
        (fields: reason, issued_by, expected_version, command_id); returns the command id and
        where it sits in the log. The outcome lands in the ``command_results`` audit table."""
        body = {"memory_id": memory_id, "command": command, **fields}
        return self._http.json("POST", f"/v1/cubes/{cube_id}/commands", body=body)

    def command_result(self, command_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for what the writer did with a command (APPLIED, DUPLICATE or REJECTED)."""
        quoted = command_id.replace("'", "")
        sql = (
            "SELECT status, reason, version, memory_id, command FROM command_results FINAL "
            f"WHERE command_id = '{quoted}' ORDER BY source_offset"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.audit(sql)
            if rows:
                return rows[-1]
            time.sleep(0.2)
        raise TimeoutError(f"no result for command {command_id} after {timeout}s")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until the worker answers and its fold has caught up with the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = self.status()
            except APIUnavailable:
                time.sleep(0.5)
                continue
            if status["failure"]:
                raise RuntimeError(f"worker failed: {status['failure']}")
            if status["caught_up"]:
                return
            time.sleep(0.5)
        raise TimeoutError(f"memstream at {self._http.base_url} not ready after {timeout}s")

    def wait_drained(self, timeout: float = 300.0) -> None:
        """Wait until every published interaction is read and every op is in the views."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["failure"]:
                raise RuntimeError(f"worker failed: {status['failure']}")
            if status["caught_up"] and not any(status["lag"].values()):
                return
            time.sleep(0.3)
        raise TimeoutError(f"pipeline not drained after {timeout}s: {self.status()['lag']}")

    def close(self) -> None:
        self._http.close()
        if self._producer is not None:
            self._producer.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ok(response: httpx.Response) -> Any:
    if response.is_error:
        raise APIError(response.status_code, detail_of(response.content))
    return response.json()


class AsyncMemoryClient:
    """The same calls as :class:`MemoryClient`, for asyncio agents."""

    def __init__(self, base_url: str | None = None, timeout: float = 60.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url or Settings().api_url, timeout=timeout)

    async def publish(self, cube_id: str, interactions: Iterable[dict[str, Any]]) -> list[dict]:
        body = [_interaction_json(i) for i in interactions]
        response = await self._http.post(f"/v1/cubes/{cube_id}/interactions", json=body)
        return _ok(response)

    async def search(self, cube_id: str, q: str, top_k: int = 10, **filters: Any) -> dict[str, Any]:
        params = _search_params(q, top_k, **filters)
        return _ok(await self._http.get(f"/v1/cubes/{cube_id}/search", params=params))

    async def memory(self, memory_id: str) -> dict[str, Any]:
        return _ok(await self._http.get(f"/v1/memories/{memory_id}"))

    async def history(self, memory_id: str) -> list[dict[str, Any]]:
        return _ok(await self._http.get(f"/v1/memories/{memory_id}/history"))

    def updates(
        self, cube_id: str, last_event_id: str | None = None, since: int | datetime | None = None
    ) -> AsyncIterator[MemoryUpdate]:
        """The cube's memory updates as they happen (server-sent events); resume with
        ``last_event_id`` = the last update's ``position``. See :func:`http_updates`."""
        return http_updates(self._http, cube_id, last_event_id=last_event_id, since=since)

    async def recent_updates(self, cube_id: str, limit: int = 50) -> list[MemoryUpdate]:
        """The cube's last ``limit`` updates, oldest first (a snapshot; see :meth:`updates`)."""
        response = await self._http.get(f"/v1/cubes/{cube_id}/updates/recent",
                                        params={"limit": limit})  # fmt: skip
        return [MemoryUpdate.from_json(u) for u in _ok(response)]

    async def aclose(self) -> None:
        await self._http.aclose()

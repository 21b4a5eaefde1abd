"""Chat with a cube through the API: ``POST /v1/cubes/{cube}/chat``'s server-sent events, parsed.

``chat_events`` yields ``("token", {"text"})`` as the answer streams, then ``("done", result)``
(the answer, the memory ids used, the prefix cache, timings, the interactions published), or
raises :class:`ChatFailed` for an ``error`` event or a 4xx/5xx answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class ChatFailed(RuntimeError):
    """The API refused the turn (a 4xx with its reason) or failed while generating it."""


def chat_body(
    message: str | None = None, messages: list[dict[str, str]] | None = None, **options: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": list(messages or [])}
    if message is not None:
        body["message"] = message
    body.update({k: v for k, v in options.items() if v is not None})
    return body


def chat_events(
    http: httpx.Client, cube_id: str, body: dict[str, Any]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The turn's events as they arrive (``body`` as :func:`chat_body` makes it)."""
    with http.stream("POST", f"/v1/cubes/{cube_id}/chat", json={**body, "stream": True}) as r:
        if r.is_error:
            r.read()
            raise ChatFailed(f"{r.status_code}: {_reason(r)}")
        kind = "message"
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if kind == "error":
                    raise ChatFailed(data.get("detail", str(data)))
                yield kind, data
            elif not line:
                kind = "message"


def chat_once(http: httpx.Client, cube_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The whole turn as one JSON answer (``stream=false``)."""
    r = http.post(f"/v1/cubes/{cube_id}/chat", json={**body, "stream": False})
    if r.is_error:
        raise ChatFailed(f"{r.status_code}: {_reason(r)}")
    return r.json()


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]

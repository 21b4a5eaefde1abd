"""Chat with a cube through the API: ``POST /v1/cubes/{cube}/chat``'s server-sent events, parsed.

``chat_events`` yields ``("token", {"text"})`` as the answer streams, then ``("done", result)``
(the answer, the memory ids used, the prefix cache, timings, the interactions published), or
raises :class:`ChatFailed` for an ``error`` event or a 4xx/5xx answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from streams.sdk.http import APIError, Http


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
    http: Http, cube_id: str, body: dict[str, Any]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The turn's events as they arrive (``body`` as :func:`chat_body` makes it)."""
    try:
        with http.lines("POST", f"/v1/cubes/{cube_id}/chat", {**body, "stream": True}) as lines:
            kind = "message"
            for line in lines:
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = json.loads(line.split(":", 1)[1])
                    if kind == "error":
                        raise ChatFailed(data.get("detail", str(data)))
                    yield kind, data
                elif not line:
                    kind = "message"
    except APIError as exc:
        raise ChatFailed(str(exc)) from None


def chat_once(http: Http, cube_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The whole turn as one JSON answer (``stream=false``)."""
    try:
        return http.json("POST", f"/v1/cubes/{cube_id}/chat", body={**body, "stream": False})
    except APIError as exc:
        raise ChatFailed(str(exc)) from None

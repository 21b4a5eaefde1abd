"""Subscribing to memory updates: the ops of chosen cubes, each delivered to the caller once.

Three ways in, one rule for duplicates (:class:`streams.transport.updates.OpDedup`: an op whose
event id or version was already handed out is dropped; Kafka delivers at least once):

- :func:`subscribe`: one cube, straight from Kafka, as an async iterator of
  :class:`~streams.transport.updates.MemoryUpdate`, resumable by consumer group or position;
- :func:`http_updates` (``AsyncMemoryClient.updates``): the same updates over the HTTP API's
  server-sent events, for agents that do not speak Kafka;
- :class:`OpSubscriber`: raw op dicts of several cubes (or all) in a consumer group, blocking.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime
from typing import Any

import httpx

from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.subscription import Subscription
from streams.transport.topics import MEMORY_OPS
from streams.transport.updates import MemoryUpdate, OpDedup, Since

__all__ = ["MemoryUpdate", "OpSubscriber", "Subscription", "http_updates", "subscribe"]


def subscribe(
    cube_id: str,
    since: Since = None,
    *,
    after: str | None = None,
    group_id: str | None = None,
    settings: Settings | None = None,
) -> Subscription:
    """The updates of one cube, in log order, each once::

        async with subscribe("alice", group_id="my-agent") as updates:
            async for update in updates:
                print(update.op, update.memory_id, update.text, update.position)

    The group (default ``<prefix>subscribe.<cube>``, so a restarted process resumes) commits
    what was handed out; a new subscription of the same group resumes after it. ``since`` (an
    offset of the cube's partition, or a datetime) and ``after`` (an update's ``position``)
    override the committed position. Without any of them it starts at the end of the log.
    """
    settings = settings or Settings()
    group = group_id or settings.group(f"subscribe.{cube_id}")
    return Subscription(cube_id, group, since=since, after=after, settings=settings)


async def http_updates(
    http: httpx.AsyncClient,
    cube_id: str,
    *,
    last_event_id: str | None = None,
    since: int | datetime | None = None,
) -> AsyncIterator[MemoryUpdate]:
    """The cube's updates from ``GET /v1/cubes/{cube}/updates`` (server-sent events) of the API
    that ``http`` points at. Resume with ``last_event_id`` = the last update's ``position``."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    params = {}
    if since is not None:
        params["since"] = since.isoformat() if isinstance(since, datetime) else str(since)
    timeout = httpx.Timeout(http.timeout.connect, read=None)  # pings keep it alive, not reads
    async with http.stream(
        "GET", f"/v1/cubes/{cube_id}/updates", headers=headers, params=params, timeout=timeout
    ) as response:
        if response.is_error:
            await response.aread()
            response.raise_for_status()
        data: list[str] = []
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:  # a blank line ends an event; comments (pings) have no data
                yield MemoryUpdate.from_json(json.loads("\n".join(data)))
                data = []


class OpSubscriber:
    """Iterate over new memory ops of some cubes (all cubes if none are named)."""

    def __init__(
        self,
        group_id: str,
        cube_ids: Iterable[str] = (),
        settings: Settings | None = None,
        remember: int = 100_000,
    ) -> None:
        self.settings = settings or Settings()
        self.cubes = {c.encode() for c in cube_ids}
        self._consumer = EventConsumer(
            [self.settings.topic(MEMORY_OPS.name)],
            group_id,
            self.settings,
            config={"isolation.level": "read_committed"},
        )
        self._dedup = OpDedup(remember)

    @property
    def duplicates(self) -> int:
        return self._dedup.duplicates

    def poll(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """The new ops that arrived within ``timeout`` seconds (maybe none)."""
        return [
            event.value
            for event in self._consumer.poll_batch(500, timeout)
            if (not self.cubes or event.key in self.cubes) and self._dedup.fresh(event.value)
        ]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.poll()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> OpSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Subscribing to memory updates: the ops of chosen cubes, each delivered to the caller once.

Kafka delivers at least once, so after a consumer crash an op may come again; the subscriber
drops any op whose event id it has already handed out (the ids are deterministic, so a re-emitted
op has the same id), and any op of a version it has already passed for that memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.topics import MEMORY_OPS


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
            [self.settings.topic(MEMORY_OPS.name)], group_id, self.settings
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._versions: dict[str, int] = {}
        self._remember = remember
        self.duplicates = 0

    def poll(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """The new ops that arrived within ``timeout`` seconds (maybe none)."""
        fresh = []
        for event in self._consumer.poll_batch(500, timeout):
            if self.cubes and event.key not in self.cubes:
                continue
            op = event.value
            if op["event_id"] in self._seen or op["version"] <= self._versions.get(
                op["memory_id"], 0
            ):
                self.duplicates += 1
                continue
            self._seen[op["event_id"]] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            self._versions[op["memory_id"]] = op["version"]
            fresh.append(op)
        return fresh

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.poll()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> OpSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

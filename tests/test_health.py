"""/v1/status and /readyz on a host of stand-in processors: counters per processor, and a reason
whenever the process is not ready."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from streams.api.routes import health
from streams.runtime.generations import Generation
from streams.runtime.host import Host
from streams.runtime.processor import Processor
from streams.settings import Settings
from streams.transport.topics import TopicsAtStart


class Counting(Processor):
    """A processor that only reports what it is given."""

    name = "counting"

    def __init__(self, stats: dict[str, Any], ready: bool = True) -> None:
        self._stats, self._ready = stats, ready

    def step(self) -> None:
        pass

    def ready(self) -> bool:
        return self._ready

    def stats(self) -> dict[str, Any]:
        return self._stats


def service(processors: dict[str, tuple[str, Processor | None]], topics: TopicsAtStart) -> Any:
    """A stand-in of the API's service: a host whose slots are set by hand (never started)."""
    host = Host({name: (lambda p=p: p) for name, (_, p) in processors.items()})  # type: ignore[misc]
    for name, (state, instance) in processors.items():
        slot = host.slots[name]
        slot.state, slot.instance = state, instance
        slot.thread = SimpleNamespace(is_alive=lambda: True)  # type: ignore[assignment]
    runtime = SimpleNamespace(host=host, role="all", generation=Generation(), settings=Settings(),
                              stores=None, topics=topics)  # fmt: skip
    return SimpleNamespace(runtime=runtime)


def test_status_shows_counters_per_processor_even_of_the_same_name() -> None:
    svc = service(
        {
            "views": ("running", Counting({"dead_lettered": 3, "ops_folded": 10})),
            "access-stats": ("running", Counting({"dead_lettered": 0, "events": 7})),
            "reader": ("running", Counting({"interactions": 5, "partitions": [0, 1]})),
            "views-next": ("running", Counting({"dead_lettered": 9})),  # a replay's: not here
        },
        TopicsAtStart(),
    )
    status = asyncio.run(health.status(svc, lag=False))
    assert status["counters"] == {
        "views": {"dead_lettered": 3, "ops_folded": 10},
        "access-stats": {"dead_lettered": 0, "events": 7},
        "reader": {"interactions": 5},
    }
    assert status["processors"]["views-next"]["stats"]["dead_lettered"] == 9


def readyz(svc: Any) -> tuple[int, dict[str, Any]]:
    response = asyncio.run(health.readyz(svc))
    return response.status_code, json.loads(response.body)


def test_readyz_gives_no_reason_when_ready() -> None:
    code, body = readyz(service({"reader": ("running", Counting({}))}, TopicsAtStart(("t",))))
    assert code == 200 and body["ready"] is True and body["reason"] is None
    assert body["topics"] == {"created": ["t"], "reason": None}


def test_readyz_says_why_it_is_not_ready() -> None:
    topics = TopicsAtStart(reason="cannot make sure the 7 topics of prefix 'x.' exist: no broker")
    svc = service(
        {
            "reader": ("running", Counting({}, ready=False)),
            "views": ("restarting", None),
            "audit": ("starting", None),
            "scheduler": ("running", Counting({})),
        },
        topics,
    )
    svc.runtime.host.slots["views"].last_error = "KafkaException: UNKNOWN_TOPIC_OR_PART"
    svc.runtime.host.slots["views"].restarts = 2
    code, body = readyz(svc)
    assert code == 503 and body["ready"] is False
    assert body["reason"].split("; ") == [
        topics.reason,
        "reader: not caught up with its inputs yet",
        "views: restarting after 2 restarts: KafkaException: UNKNOWN_TOPIC_OR_PART",
        "audit: starting",
    ]
    assert body["topics"]["reason"] == topics.reason

"""The API's best-effort events (a search's QueryEvent) leave on a thread of their own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import pytest

from streams.api.deps import LaterPublisher
from streams.transport.producer import EventProducer


class Recorder:
    """Stands in for the producer's ``publish_nowait``: records, slowly, on whatever thread."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, str, Mapping[str, Any]]] = []
        self.threads: set[str] = set()
        self.fail = fail

    def publish_nowait(self, topic: str, key: str, record: str, value: Mapping[str, Any]) -> None:
        time.sleep(0.002)
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("broker down")
        self.calls.append((topic, key, record, value))


def test_queued_events_are_published_in_order_off_the_callers_thread_before_close() -> None:
    producer = Recorder()
    events = LaterPublisher(cast(EventProducer, producer))
    for i in range(40):
        events.publish("queries", "cube", "QueryEvent", {"n": i})
    events.close()
    assert [value["n"] for *_, value in producer.calls] == list(range(40))
    # every publish ran on the publishing thread, none on the caller's
    assert producer.threads and all(n.startswith("api-events") for n in producer.threads)


def test_a_failed_publish_is_logged_and_never_reaches_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = LaterPublisher(cast(EventProducer, Recorder(fail=True)))
    with caplog.at_level(logging.WARNING, logger="memstream.api"):
        events.publish("queries", "cube", "QueryEvent", {"n": 1})
        events.close()
    assert any("not published" in r.getMessage() and "broker down" in r.getMessage()
               for r in caplog.records)  # fmt: skip

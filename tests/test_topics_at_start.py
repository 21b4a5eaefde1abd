"""What a process says when it cannot create its topics at start: no broker, no permission."""

from __future__ import annotations

import socket
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams.settings import Settings
from streams.transport import topics
from streams.transport.topics import ALL_TOPICS, topics_at_start


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_broker_is_a_reason_not_an_exception() -> None:
    s = Settings(kafka_bootstrap=f"127.0.0.1:{closed_port()}", topic_prefix="nobroker.")
    found = topics_at_start(s, timeout=1.0)
    assert found.created == ()
    assert found.reason is not None
    assert found.reason.startswith("cannot make sure the 7 topics of prefix 'nobroker.' exist")
    assert f"Kafka at {s.kafka_bootstrap} did not answer within 1 s" in found.reason


class Forbidding:
    """An admin client of a broker that lists topics but lets this process create none."""

    def list_topics(self, timeout: float) -> Any:
        return SimpleNamespace(topics={})

    def create_topics(self, new: list[Any], request_timeout: float) -> dict[str, Future]:
        futures = {}
        for topic in new:
            future: Future = Future()
            future.set_exception(KafkaException(KafkaError(
                KafkaError.TOPIC_AUTHORIZATION_FAILED, "Authorization failed.")))  # fmt: skip
            futures[topic.topic] = future
        return futures


def test_no_permission_is_a_reason_that_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topics, "admin_client", lambda settings: Forbidding())
    found = topics_at_start(Settings(topic_prefix="locked."))
    assert found.created == () and found.reason is not None
    assert f"{len(ALL_TOPICS)} topics of prefix 'locked.'" in found.reason
    assert "does not allow this process to create its topics (Authorization failed.)" in (
        found.reason
    )
    assert "memstream infra up" in found.reason

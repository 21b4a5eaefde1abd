"""A process on a new topic prefix creates its topics and gets ready, on the real broker: the
app's lifespan builds the runtime as ``memstream serve`` does, nobody ran ``ensure_topics``.
When the broker refuses them, ``/readyz`` says why."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from streams.api.app import create_app
from streams.settings import Settings
from streams.transport.topics import ALL_TOPICS, delete_topics, describe_topics

pytestmark = pytest.mark.integration


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_new_prefix_gets_its_topics_and_the_process_gets_ready(
    settings: Settings, chdb_dsn: str, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"data_dir": tmp_path, "clickhouse_url": chdb_dsn,
                                    "topic_prefix": f"fresh-{uuid.uuid4().hex[:8]}."})  # fmt: skip
    names = {s.topic(spec.name) for spec in ALL_TOPICS}
    assert describe_topics(s) == {}  # nothing of this prefix exists
    try:
        with TestClient(create_app(s)) as api:
            wait(lambda: api.get("/readyz").status_code == 200, 120, "never got ready")
            body = api.get("/readyz").json()
            assert body["ready"] is True and body["reason"] is None
            assert set(body["topics"]["created"]) == names and body["topics"]["reason"] is None
        described = describe_topics(s)
        assert set(described) == names
        assert {d["partitions"] for d in described.values()} == {s.partitions}
    finally:
        delete_topics(s)


def test_readyz_says_why_when_the_broker_refuses_the_topics(
    settings: Settings, tmp_path: Path
) -> None:
    # One broker cannot hold three replicas: it refuses to create the topics.
    prefix = f"refused-{uuid.uuid4().hex[:8]}."
    s = settings.model_copy(update={"data_dir": tmp_path, "role": "reader",
                                    "replication_factor": 3, "topic_prefix": prefix})  # fmt: skip
    try:
        with TestClient(create_app(s)) as api:
            response = api.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            reason = body["reason"]
            assert reason.startswith(f"cannot make sure the 7 topics of prefix '{s.topic_prefix}'")
            assert f"Kafka at {s.kafka_bootstrap} refused to create the topics" in reason
            assert "replication factor" in reason.lower(), reason
            assert body["topics"] == {"created": [], "reason": reason.split("; ")[0]}
        assert describe_topics(s) == {}
    finally:
        delete_topics(s)

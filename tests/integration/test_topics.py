"""Topics exist on the real broker with the partitions and policies of DESIGN.md."""

from __future__ import annotations

import time

import pytest

from streams.settings import Settings
from streams.transport.topics import (
    ALL_TOPICS,
    admin_client,
    delete_topics,
    describe_topics,
    ensure_topics,
)

pytestmark = pytest.mark.integration

EXPECTED = {
    "interactions": ("delete", "-1"),
    "memory-ops": ("delete", "-1"),
    "queries": ("delete", str(30 * 24 * 3600 * 1000)),
    "cubes": ("compact", "-1"),
    "dlq": ("delete", str(30 * 24 * 3600 * 1000)),
}


def test_topics_have_configured_partitions_and_policies(settings: Settings) -> None:
    described = describe_topics(settings)
    assert set(described) == {settings.topic(spec.name) for spec in ALL_TOPICS}
    for name, (policy, retention) in EXPECTED.items():
        topic = described[settings.topic(name)]
        assert topic["partitions"] == settings.partitions, name
        assert topic["cleanup.policy"] == policy, name
        assert topic["retention.ms"] == retention, name


def test_ensure_topics_is_idempotent(settings: Settings) -> None:
    assert ensure_topics(settings) == []
    assert ensure_topics(settings) == []
    assert len(describe_topics(settings)) == len(ALL_TOPICS)


def test_topics_with_another_partition_count(base_settings: Settings) -> None:
    other = base_settings.model_copy(
        update={"topic_prefix": f"{id(object())}-p3.", "partitions": 3}
    )
    created = ensure_topics(other)
    assert sorted(created) == sorted(other.topic(spec.name) for spec in ALL_TOPICS)
    assert {t["partitions"] for t in describe_topics(other).values()} == {3}


def topics_now(settings: Settings) -> set[str]:
    return set(admin_client(settings).list_topics(timeout=10).topics)


def test_delete_topics_removes_a_runs_topics_only(base_settings: Settings) -> None:
    run = base_settings.model_copy(update={"topic_prefix": f"{id(object())}-del."})
    other = base_settings.model_copy(update={"topic_prefix": f"{id(object())}-keep."})
    ensure_topics(run)
    ensure_topics(other)
    deleted = delete_topics(run)
    assert set(deleted) == {run.topic(spec.name) for spec in ALL_TOPICS}
    deadline = time.monotonic() + 30  # the broker's metadata follows the controller shortly
    left = topics_now(run)
    while any(t.startswith(run.topic_prefix) for t in left):
        assert time.monotonic() < deadline, "deleted topics still listed"
        time.sleep(0.2)
        left = topics_now(run)
    assert {other.topic(spec.name) for spec in ALL_TOPICS} <= left
    with pytest.raises(ValueError):
        delete_topics(run.model_copy(update={"topic_prefix": ""}))

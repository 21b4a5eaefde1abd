"""Stopping the activation processor cancels a KV-cache build in flight, on the real SmolLM2: the
prefill stops at the model's next layer, nothing is stored or sent, and the host stops at once
instead of waiting for the build (``memstream serve`` waited 16 s at shutdown)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from processors.fold import Memory
from processors.lm import Cancelled, LocalLM, load_lm
from sinks.blobs import BlobStore
from streams.pipeline.activation import ActivationProcessor
from streams.runtime.host import Host
from streams.settings import Settings
from streams.transport.topics import COMMANDS, ensure_topics

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
#: Activated memories of the cube: a prefix of ~3,400 tokens, ~9 s of prefill on one core of
#: a 2-core Xeon (the test stops the host one second into it).
MEMORIES = 120


def hot_memories(cube: str) -> list[Memory]:
    return [
        Memory(f"m{i:03d}", cube, "PLAINTEXT", 1, "active", T0, T0, activated=True,
               valid_from=T0 + timedelta(minutes=i),
               text=f"Caroline said: trip number {i} to the mountains was with my sister and "
                    "our two dogs, in the old red car.")
        for i in range(MEMORIES)
    ]  # fmt: skip


def published(settings: Settings, topic: str) -> int:
    """How many records ``topic`` holds (its partitions' high watermarks)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"count-{uuid.uuid4().hex[:6]}"})  # fmt: skip
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in partitions)  # fmt: skip
    finally:
        consumer.close()


def test_stopping_cancels_a_kv_cache_build_in_flight(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings.model_copy(update={"topic_prefix": f"cancel-{uuid.uuid4().hex[:8]}.",
                                    "activation_memory": True})  # fmt: skip
    ensure_topics(s)
    lm = load_lm(s.effective_lm_dir, s.lm_model)
    started, outcome = threading.Event(), []
    prefill = LocalLM.prefill

    def watched(*args: Any, **kwargs: Any) -> Any:
        started.set()
        try:
            result = prefill(lm, *args, **kwargs)
        except Cancelled:
            outcome.append("cancelled")
            raise
        outcome.append("finished")
        return result

    monkeypatch.setattr(lm, "prefill", watched)
    cube = f"cancel-{uuid.uuid4().hex[:6]}"
    views = SimpleNamespace(folds={0: SimpleNamespace(
        memories={m.memory_id: m for m in hot_memories(cube)})})  # fmt: skip
    processor = ActivationProcessor(
        s,
        lambda: views,  # type: ignore[arg-type,return-value]
        lambda: lm,
        BlobStore.from_settings(s),
        every_s=0.1,
    )
    host = Host({"activation": lambda: processor})
    host.start()
    try:
        assert started.wait(120), "no build started"
        time.sleep(1.0)  # well into the prefill
        assert outcome == [], "the build finished before the test could stop it"
        began = time.monotonic()
    finally:
        host.stop()
    stopped_s = time.monotonic() - began
    print(f"\nhost stopped {stopped_s:.2f} s after it was asked, a build in flight")
    assert outcome == ["cancelled"]
    assert processor.counters["builds_cancelled"] == 1
    assert processor.counters["caches_built"] == 0 and processor.stats()["pending"] == 0
    assert published(s, s.topic(COMMANDS.name)) == 0  # no CREATE, no ARCHIVE
    assert host.health()["activation"]["state"] == "stopped"
    assert stopped_s < 5.0  # a step (1 s) and a layer; the build alone takes ~9 s

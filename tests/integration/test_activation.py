"""Activation and parameter memory wired into the runtime, on the real broker, MinIO and the
real SmolLM2: searches make memories hot, the scheduler activates them, their KV cache is built,
stored and recorded as an ACTIVATION memory through the writer; a damaged cache object is
rebuilt; a cube with enough stable memories gets a LoRA adapter, recorded as a PARAMETER
memory, and a rollback is one ARCHIVE."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from processors.commands import current_memory
from processors.kv_cache import CacheRefused
from processors.prompt import memory_prefix
from sinks.blobs import BlobStore, parse_uri
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.parameter import fetch_adapter
from streams.pipeline.roles import Runtime, build_runtime
from streams.settings import Settings
from streams.transport.topics import ensure_topics

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
FACTS = [
    "I signed up for a pottery class on Saturday mornings.",
    "I have been practising the violin every evening this spring.",
    "I am training for the Berlin marathon with my running club.",
    "I planted tomatoes and basil in the garden behind my house.",
]


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    s = settings.model_copy(
        update={
            "data_dir": tmp_path_factory.mktemp("activation"),
            "clickhouse_url": chdb_dsn,
            "topic_prefix": f"act-{uuid.uuid4().hex[:8]}.",
            "scheduler_top_n": 2,
            "scheduler_min_heat": 1.5,
            "scheduler_half_life_s": 600.0,
            "scheduler_interval_s": 0.5,
            "activation_memory": True,
            "parameter_memory": True,
            "lora_min_memories": 4,
            "lora_stable_ops": 0,
            "lora_steps": 2,
            "lora_max_tokens": 24,
        }
    )
    ensure_topics(s)
    return build_runtime(s, "all", embedder=embedder_for(s))


@pytest.fixture(scope="module")
def api(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime.settings, runtime)) as client:
        wait(lambda: client.get("/readyz").status_code == 200, 120, "runtime never got ready")
        yield client


@pytest.fixture(scope="module")
def cube(api: TestClient) -> str:
    cube = f"act-{uuid.uuid4().hex[:6]}"
    body = [{"content": text, "speaker": "Melanie",
             "event_time": (T0 + timedelta(days=n)).isoformat()}
            for n, text in enumerate(FACTS)]  # fmt: skip
    assert api.post(f"/v1/cubes/{cube}/interactions", json=body).is_success
    wait(lambda: len(api.get(f"/v1/cubes/{cube}/memories").json()) == len(FACTS), 60, "ingest")
    return cube


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return found


def current(runtime: Runtime, cube: str, memory_type: str) -> Any:
    return current_memory(runtime.memories(), cube, memory_type)


def test_hot_memories_get_a_stored_verified_kv_cache_and_a_damaged_one_is_rebuilt(
    api: TestClient, runtime: Runtime, cube: str
) -> None:
    for _ in range(4):
        for q in ("pottery class", "violin practice"):
            assert api.get(f"/v1/cubes/{cube}/search", params={"q": q, "top_k": 3}).is_success
    cache = wait(lambda: current(runtime, cube, "ACTIVATION"), 240, "no ACTIVATION memory")
    activated = {m.memory_id: m for m in runtime.memories() if m.cube_id == cube and m.activated}
    assert set(cache.payload["memory_ids"]) == set(activated)
    assert {"pottery" in m.text or "violin" in m.text for m in activated.values()} == {True}
    lm = runtime.lm()
    assert (cache.payload["model_id"], cache.payload["weights_sha256"]) == (
        lm.model_id,
        lm.weights_sha256,
    )
    prefix = memory_prefix(lm, [activated[i].text for i in cache.payload["memory_ids"]])
    blobs = BlobStore.from_settings(runtime.settings)
    stored = blobs.get_kv_cache(lm, cache.payload["uri"], cache.payload["sha256"],
                                prefix_text=prefix)  # fmt: skip
    assert stored.get_seq_length() == cache.payload["token_count"]

    # One byte of the object changes: loading refuses it; the activation processor, told so,
    # writes the right bytes back under the same name (the op in the log stays valid).
    bucket, key, _ = parse_uri(cache.payload["uri"])
    data = bytearray(blobs.get_unverified(cache.payload["uri"]))
    data[len(data) // 2] ^= 0xFF
    blobs.client.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
    with pytest.raises(CacheRefused):
        blobs.get_kv_cache(lm, cache.payload["uri"], cache.payload["sha256"], prefix_text=prefix)
    activation = runtime.host.get("activation")
    repaired = activation.stats()["caches_repaired"]
    activation.repair(cube)
    wait(lambda: runtime.host.get("activation").stats()["caches_repaired"] > repaired, 120,
         "the damaged cache was not rebuilt")  # fmt: skip
    again = blobs.get_kv_cache(lm, cache.payload["uri"], cache.payload["sha256"],
                               prefix_text=prefix)  # fmt: skip
    assert again.get_seq_length() == cache.payload["token_count"]
    assert api.get("/v1/status").json()["processors"]["activation"]["stats"]["caches_built"] >= 1


def test_a_cube_with_stable_memories_gets_an_adapter_and_a_rollback_is_one_archive(
    api: TestClient, runtime: Runtime, cube: str
) -> None:
    adapter = wait(lambda: current(runtime, cube, "PARAMETER"), 600, "no PARAMETER memory")
    assert set(adapter.payload["trained_on"]) <= {
        m.memory_id for m in runtime.memories() if m.cube_id == cube
    }
    lm = runtime.lm()
    blobs = BlobStore.from_settings(runtime.settings)
    view, config = fetch_adapter(blobs, adapter.payload, lm)
    assert view is not None and config.rank == runtime.settings.lora_rank
    assert adapter.payload["base_weights_sha256"] == lm.weights_sha256
    status = api.get("/v1/status").json()["processors"]["parameter"]["stats"]
    assert (
        status["trained"] >= 1
        and status["last"][0]["loss_adapter"] < status["last"][0]["loss_base"]
    )
    # Rollback: archive the current adapter; the cube has no adapter before this one.
    sent = api.post(f"/v1/cubes/{cube}/commands",
                    json={"memory_id": adapter.memory_id, "command": "ARCHIVE",
                          "reason": "rollback"})  # fmt: skip
    assert sent.status_code == 202
    wait(lambda: current(runtime, cube, "PARAMETER") is None, 60, "rollback not applied")


def test_a_rebuild_restores_activation_memory_from_the_log_without_recomputing(
    api: TestClient, runtime: Runtime, cube: str
) -> None:
    activation = runtime.host.get("activation")

    def settled() -> Any:
        cache = current(runtime, cube, "ACTIVATION")
        stats = runtime.host.get("activation").stats()
        return cache if cache is not None and stats["pending"] == 0 else None

    before = wait(settled, 240, "the cube's cache never settled")
    time.sleep(3 * activation.every_s)  # a few more passes: nothing left to build
    before = current(runtime, cube, "ACTIVATION")
    built = runtime.host.get("activation").stats()["caches_built"]
    target = api.post("/v1/replay", json={"mode": "rebuild"}).json()["next"]["id"]
    wait(lambda: api.get("/v1/replay").json()["current"]["id"] == target, 180, "never switched")
    after = wait(lambda: current(runtime, cube, "ACTIVATION"), 60, "no cache after the rebuild")
    assert (after.memory_id, after.payload) == (before.memory_id, before.payload)
    # The chat's prefix is the stored cache, found by its URI and verified by its hash.
    answer = api.post(f"/v1/cubes/{cube}/chat",
                      json={"message": "What do I do on Saturdays?", "stream": False,
                            "max_new_tokens": 2, "publish": False})  # fmt: skip
    assert answer.status_code == 200, answer.text
    prefix = answer.json()["prefix"]
    assert prefix["source"] == "activation-memory", prefix
    assert prefix["activation_memory_id"] == before.memory_id
    assert runtime.host.get("activation").stats()["caches_built"] == built

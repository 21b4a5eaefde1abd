"""The views processor and cold-cube search on a real Milvus server (the production path), with
the reader and the API in this process."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sinks.stores import milvus_view
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import build_runtime
from streams.query.search import Searcher
from streams.settings import Settings
from streams.transport.topics import ensure_topics

pytestmark = pytest.mark.integration
T0 = datetime(2024, 6, 1, 10, 0, tzinfo=UTC)
TURNS = [
    "I adopted a rescue greyhound called Pixel.",
    "My sister Ana is getting married in Porto next spring.",
    "I switched jobs and now I build boats in Gdansk.",
    "Pixel hates thunderstorms, so we stay in on rainy nights.",
    "I started learning the cello with a teacher from Kyiv.",
    "We went hiking on the Via Algarviana last weekend.",
]


def test_views_write_a_milvus_server_and_a_cold_process_searches_it(
    settings: Settings, milvus_server: str, tmp_path: Path, chdb_dsn: str
) -> None:
    s = settings.model_copy(
        update={
            "milvus_uri": milvus_server,
            "data_dir": tmp_path,
            "clickhouse_url": chdb_dsn,
            "topic_prefix": f"srv-{uuid.uuid4().hex[:8]}.",
        }
    )
    ensure_topics(s)
    embedder = embedder_for(s)
    runtime = build_runtime(s, "all", embedder=embedder)
    cube = f"server-{uuid.uuid4().hex[:6]}"
    with TestClient(create_app(s, runtime)) as api:
        body = [
            {"content": t, "speaker": "Maya", "event_time": (T0 + timedelta(hours=i)).isoformat()}
            for i, t in enumerate(TURNS)
        ]
        assert api.post(f"/v1/cubes/{cube}/interactions", json=body).status_code == 200
        deadline = time.monotonic() + 120
        while True:
            status = api.get("/v1/status").json()
            if status["caught_up"] and not any(status["lag"].values()):
                break
            assert time.monotonic() < deadline, status["lag"]
            time.sleep(0.2)
        rows = api.get(f"/v1/cubes/{cube}/memories").json()
        assert len(rows) == len(TURNS) and all(r["text"].startswith("Maya said:") for r in rows)
        hot = api.get(f"/v1/cubes/{cube}/search", params={"q": "What is the dog called?"}).json()
        assert "Pixel" in hot["hits"][0]["text"]

    # Another process (an API replica) has no working set: it loads the cube from the server.
    cold = Searcher(milvus_view(s), embedder)
    found = cold.search(cube, "What is the dog called?", top_k=len(TURNS))
    assert cold.working_set.loads == 1
    assert [r.memory_id for r in found] == [h["memory_id"] for h in hot["hits"]][: len(found)]
    assert {r.memory_id for r in found} == {r["memory_id"] for r in rows}

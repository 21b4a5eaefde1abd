"""The plaintext view on a real Milvus server (standalone 2.3.5 from the ``milvus`` package).

memstream's default view is milvus-lite; production points ``MEMSTREAM_MILVUS_URI`` at a server.
These tests run the same sink and searcher against a server: the collection it creates, writes
read back exactly and at once (a server's default consistency would serve stale reads), cubes
larger than a server's query window, and cold-cube search that ranks and filters like a working
set built from the states. Cube ids carry this run's id, so the tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from infra.milvus_server import MilvusServer
from infra.process import InfraError, port_open
from processors.embedder import Embedder, load_embedder
from processors.fold import Memory, fold
from processors.ops import embedding_bytes, embedding_vector, make_op, plaintext_payload
from sinks.milvus import COLLECTION, OUTPUT_FIELDS, PAGE, MilvusSink, row_fields
from sinks.stores import milvus_view
from streams.query.search import Searcher, build_filter
from streams.settings import Settings

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
T0 = datetime(2023, 5, 8, tzinfo=UTC)
MODEL = "all-MiniLM-L6-v2"
TEXTS = [
    "Caroline said: I went to a pottery workshop with my kids last Friday (5 May 2023).",
    "Melanie said: I ran a charity race for mental health on Saturday.",
    "Caroline said: I moved from Sweden four years ago.",
    "Melanie said: My kids love the beach; we go camping every summer.",
    "Caroline said: I am researching adoption agencies.",
    "Melanie said: I painted a sunrise over the lake last year.",
    "Caroline said: The LGBTQ support group meeting was very powerful.",
    "Melanie said: We bought a violin for my daughter.",
]
FILTERS = [
    {},
    {"include_history": True},
    {"since": T0 + timedelta(days=10)},
    {"until": T0 + timedelta(days=20), "include_history": True},
    {"tags": ["KIDS"]},
    {"tags": ["travel"], "since": T0 + timedelta(days=3), "until": T0 + timedelta(days=30)},
]


@pytest.fixture(scope="module")
def server_settings(settings: Settings, milvus_server: str) -> Settings:
    return settings.model_copy(update={"milvus_uri": milvus_server})


@pytest.fixture(scope="module")
def sink(server_settings: Settings) -> MilvusSink:
    return milvus_view(server_settings)


@pytest.fixture(scope="module")
def embedder(settings: Settings) -> Embedder:
    return load_embedder(settings.embedder, settings.tools_dir / "onnx")


def payload(text: str, vector: np.ndarray, i: int, **fields):  # type: ignore[no-untyped-def]
    source = {"session_id": "session-1", "turn_id": f"turn-{i}", "event_id": f"event-{i}"}
    return plaintext_payload(text, embedding_bytes(vector), MODEL, source=source, **fields)


def added(cube: str, vectors: np.ndarray, texts: list[str] | None = None) -> list[Memory]:
    """Memories of ``cube`` as the fold makes them from ADD ops: some tagged "kids", some
    "travel", valid from a day apart, every fifth one closed (a fact a newer one replaced)."""
    out = []
    for i, vector in enumerate(vectors):
        mid = f"{cube}-m{i}"
        op = make_op(
            event_id=f"{mid}/add", cube_id=cube, memory_id=mid, version=1, op="ADD",
            event_time=T0, actor="test",
            payload=payload(
                texts[i] if texts else f"memory {i}", vector, i, key=f"key-{i % 4}",
                tags=("kids", "family") if i % 3 == 0 else ("travel",),
                valid_from=T0 + timedelta(days=i),
                valid_to=T0 + timedelta(days=40) if i % 5 == 4 else None,
            ),
        )  # fmt: skip
        state = fold(None, op)
        assert state is not None
        out.append(state)
    return out


def conversation(embedder: Embedder, cube: str, count: int) -> list[Memory]:
    vectors = embedder.encode(TEXTS)
    texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(count)]
    return added(cube, np.stack([vectors[i % len(TEXTS)] for i in range(count)]), texts)


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def then(state: Memory, op: str, at: datetime, **fields) -> Memory:  # type: ignore[no-untyped-def]
    """The state after one more op on it."""
    new = fold(state, make_op(
        event_id=f"{state.memory_id}/{op}/{state.version + 1}", cube_id=state.cube_id,
        memory_id=state.memory_id, version=state.version + 1, op=op, event_time=at,
        actor="test", **fields,
    ))  # fmt: skip
    assert new is not None and new.version == state.version + 1
    return new


def read_back(sink: MilvusSink, cube: str) -> dict[str, dict]:
    return {row["memory_id"]: row for row in sink.cube_rows(cube)}


def assert_rows_equal(rows: dict[str, dict], states: Iterable[Memory]) -> None:
    expected = {m.memory_id: m for m in states}
    assert set(rows) == set(expected)
    for memory_id, row in rows.items():
        m = expected[memory_id]
        assert {k: row[k] for k in OUTPUT_FIELDS} == row_fields(m)
        vector = np.asarray(row["vector"], dtype=np.float32)
        assert np.array_equal(vector, embedding_vector(m.embedding))


def ranked(searcher: Searcher, cube: str, query: str, **filters) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.memory_id for r in searcher.search(cube, query, 10, **filters)]


def test_the_view_on_a_server_is_a_server_collection_with_autoindex(
    sink: MilvusSink, server_settings: Settings
) -> None:
    assert not sink.embedded
    assert sink.client.get_server_version().startswith("v2.3")
    index = sink.client.describe_index(COLLECTION, "vector")
    assert (index["index_type"], index["metric_type"]) == ("AUTOINDEX", "COSINE")
    fields = {f["name"] for f in sink.client.describe_collection(COLLECTION)["fields"]}
    assert fields == {*OUTPUT_FIELDS, "vector"}

    cube = f"{RUN}-reopen"
    sink.put(added(cube, unit_vectors(3, seed=4)))
    reopened = milvus_view(server_settings)  # another process's view: the collection as it is
    assert reopened.count(f'cube_id == "{cube}"') == 3
    assert reopened.client.describe_index(COLLECTION, "vector")["index_type"] == "AUTOINDEX"
    reopened.client.close()


def test_write_upserts_the_searchable_and_deletes_the_rest(sink: MilvusSink) -> None:
    cube = f"{RUN}-writes"
    first = added(cube, unit_vectors(12, seed=1))
    assert sink.put(first) == (12, 0)
    assert sink.count(f'cube_id == "{cube}"') == 12  # read at once: Strong, not Bounded
    assert_rows_equal(read_back(sink, cube), first)
    assert sink.put(first) == (12, 0)  # a redelivered batch changes nothing
    assert sink.count(f'cube_id == "{cube}"') == 12

    later = T0 + timedelta(days=50)
    successor_id = f"{cube}-merged"
    successor = fold(None, make_op(
        event_id=f"{successor_id}/merge", cube_id=cube, memory_id=successor_id, version=1,
        op="MERGE", event_time=later, actor="test", supersedes=[first[3].memory_id],
        payload=payload("memory 3, merged", unit_vectors(1, seed=2)[0], 3, tags=("kids",)),
    ))  # fmt: skip
    assert successor is not None
    merged = then(first[3], "MERGE", later, superseded_by=successor_id)
    expired = then(first[5], "EXPIRE", later)
    closed = then(
        first[7], "UPDATE", later,
        payload=payload(first[7].text, embedding_vector(first[7].embedding), 7,
                        tags=first[7].tags, valid_from=first[7].valid_from, valid_to=later),
    )  # fmt: skip
    assert (merged.status, expired.status, closed.valid_to) == ("merged", "expired", later)
    assert sink.put([merged, expired, closed, successor]) == (2, 2)

    current = [m for m in first if m.memory_id not in {merged.memory_id, expired.memory_id}]
    current = [closed if m.memory_id == closed.memory_id else m for m in current] + [successor]
    assert sink.count(f'cube_id == "{cube}"') == 11
    assert_rows_equal(read_back(sink, cube), current)
    assert sink.get([merged.memory_id, expired.memory_id]) == []
    [row] = sink.get([closed.memory_id])
    assert (row["version"], row["valid_to"]) == (2, int(later.timestamp() * 1000))
    still_true = build_filter(cube)  # what search keeps without include_history
    assert {r["memory_id"] for r in sink.rows(still_true)} == {
        m.memory_id for m in current if m.valid_to is None
    }


def test_a_cube_larger_than_the_server_query_window_reads_back_whole(sink: MilvusSink) -> None:
    """A server caps offset + limit at 16,384 rows; a cube beyond one page still loads."""
    cube = f"{RUN}-large"
    states = added(cube, unit_vectors(PAGE + 300, seed=3))
    for start in range(0, len(states), 4096):
        sink.put(states[start : start + 4096])
    assert sink.count(f'cube_id == "{cube}"') == PAGE + 300
    rows = sink.cube_rows(cube)
    assert len(rows) == PAGE + 300
    assert {r["memory_id"] for r in rows} == {m.memory_id for m in states}


def test_cold_cube_search_loads_from_the_server_and_ranks_like_the_states(
    sink: MilvusSink, embedder: Embedder
) -> None:
    cube, other = f"{RUN}-search", f"{RUN}-other"
    states = conversation(embedder, cube, 60)
    sink.put(states + conversation(embedder, other, 20))

    cold = Searcher(sink, embedder)
    warm = Searcher(sink, embedder)
    warm.apply(states)
    assert not cold.working_set.resident(cube)
    top = ranked(cold, cube, "a musical instrument for my child")[0]
    assert int(top.rsplit("-m", 1)[1]) % len(TEXTS) == 7  # one of the violins
    assert cold.working_set.resident(cube)
    for query in ("pottery with the kids", "where did Caroline live before", "violin"):
        for filters in FILTERS:
            assert ranked(cold, cube, query, **filters) == ranked(warm, cube, query, **filters)
    assert (cold.working_set.loads, warm.working_set.loads) == (1, 0)
    snapshot, _ = cold.working_set.snapshot(cube)
    assert sorted(snapshot.ids) == sorted(m.memory_id for m in states)  # not the other cube's


@pytest.mark.parametrize("filters", FILTERS)
def test_the_working_set_filter_keeps_what_the_server_keeps(  # type: ignore[no-untyped-def]
    sink: MilvusSink, embedder: Embedder, filters
) -> None:
    cube = f"{RUN}-filter"
    sink.put(conversation(embedder, cube, 60))
    snapshot, loaded = Searcher(sink, embedder).working_set.snapshot(cube)
    assert loaded
    keep = snapshot.mask(
        filters.get("since"),
        filters.get("until"),
        filters.get("tags"),
        filters.get("include_history", False),
    )
    expected = {r["memory_id"] for r in sink.rows(build_filter(cube, **filters))}
    assert {snapshot.ids[i] for i in np.flatnonzero(keep)} == expected
    assert expected  # every filter here keeps something


def test_a_write_is_searchable_in_a_cold_cube_at_once(sink: MilvusSink, embedder: Embedder) -> None:
    cube = f"{RUN}-fresh"
    [violin] = [m for m in conversation(embedder, cube, 8) if m.memory_id.endswith("-m7")]
    sink.put([violin])
    assert ranked(Searcher(sink, embedder), cube, "violin") == [violin.memory_id]
    sink.put([then(violin, "EXPIRE", T0 + timedelta(days=9))])
    assert ranked(Searcher(sink, embedder), cube, "violin", include_history=True) == []


def processes_in(data_dir: Path) -> list[int]:
    """Pids of the processes whose working directory is ``data_dir`` (a server runs there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == data_dir:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_second_server_runs_beside_the_first_and_stops_whole(
    tmp_path: Path, base_settings: Settings, milvus_server: str
) -> None:
    """Each server gets its own etcd ports (the package's launcher always takes 2379/2380)."""
    server = MilvusServer(tmp_path / "second", tools_dir=base_settings.tools_dir)
    with server:
        assert server.uri != milvus_server
        client = MilvusClient(uri=server.uri)
        assert client.list_collections() == []
        client.close()
        pid = server.pid
        assert pid is not None and pid in processes_in(server.data_dir)
        ports = dict(server.ports)
        # Milvus 2.3 serves the index coordinator from the data coordinator's port.
        assert {name for name, p in ports.items() if not port_open(p)} == {"index_coord_port"}
    assert processes_in(server.data_dir) == []
    assert not any(port_open(p) for p in ports.values())
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process of its group is left


def test_a_server_that_does_not_answer_in_time_is_stopped_with_its_log(
    tmp_path: Path, base_settings: Settings, milvus_server: str
) -> None:
    server = MilvusServer(tmp_path / "slow", tools_dir=base_settings.tools_dir, timeout=0.5)
    with pytest.raises(InfraError, match=r"not ready after .*milvus\.log"):
        server.start()
    assert processes_in(server.data_dir) == []
    assert not any(port_open(p) for p in server.ports.values())

    taken = int(milvus_server.rsplit(":", 1)[1])
    with pytest.raises(InfraError, match=f"port {taken} is taken"):
        MilvusServer(tmp_path / "clash", port=taken, tools_dir=base_settings.tools_dir).start()

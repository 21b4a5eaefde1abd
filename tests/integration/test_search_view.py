"""The search working set against the real plaintext view (milvus-lite).

The working set must answer exactly what the view holds: a cube loaded from Milvus and a cube
built from the fold's states give the same results, its filter keeps the rows Milvus's own
expression keeps, and eviction or a write during a load never loses a memory.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from processors.fold import Memory
from processors.ops import embedding_bytes
from sinks.milvus import MilvusSink
from sinks.stores import milvus_view
from streams.pipeline.build import embedder_for
from streams.query.search import Searcher, build_filter
from streams.query.working_set import WorkingSet
from streams.settings import Settings

pytestmark = pytest.mark.integration

T0 = datetime(2023, 5, 8, tzinfo=UTC)
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


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    return embedder_for(Settings())


def memories(embedder, cube: str, count: int) -> list[Memory]:  # type: ignore[no-untyped-def]
    vectors = embedder.encode(TEXTS)
    out = []
    for i in range(count):
        text = TEXTS[i % len(TEXTS)]
        closed = T0 + timedelta(days=40) if i % 5 == 4 else None
        out.append(Memory(
            memory_id=f"{cube}-m{i}", cube_id=cube, memory_type="PLAINTEXT", version=1,
            status="active", created_at=T0, updated_at=T0, text=f"{text} ({i})",
            tags=("kids", "family") if i % 3 == 0 else ("travel",),
            embedding=embedding_bytes(vectors[i % len(TEXTS)]),
            valid_from=T0 + timedelta(days=i), valid_to=closed,
        ))  # fmt: skip
    return out


def view(tmp_path: Path) -> MilvusSink:
    settings = Settings().model_copy(update={"data_dir": tmp_path, "milvus_uri": None})
    return milvus_view(settings)


def ranked(searcher: Searcher, cube: str, query: str, **filters) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.memory_id for r in searcher.search(cube, query, 10, **filters)]


FILTERS = [
    {},
    {"include_history": True},
    {"since": T0 + timedelta(days=10)},
    {"until": T0 + timedelta(days=20), "include_history": True},
    {"tags": ["KIDS"]},
    {"tags": ["travel"], "since": T0 + timedelta(days=3), "until": T0 + timedelta(days=30)},
]


def test_loaded_from_milvus_equals_built_from_states(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    sink = view(tmp_path)
    states = memories(embedder, "cube-a", 60) + memories(embedder, "cube-b", 20)
    sink.put(states)
    sink.flush()

    cold = Searcher(sink, embedder)
    warm = Searcher(sink, embedder)
    warm.apply(states)
    for query in ("pottery with the kids", "where did Caroline live before", "violin"):
        for filters in FILTERS:
            assert ranked(cold, "cube-a", query, **filters) == ranked(
                warm, "cube-a", query, **filters
            )
    assert cold.working_set.loads == 1
    assert warm.working_set.loads == 0


@pytest.mark.parametrize("filters", FILTERS)
def test_filter_keeps_what_milvus_keeps(tmp_path: Path, embedder, filters) -> None:  # type: ignore[no-untyped-def]
    sink = view(tmp_path)
    sink.put(memories(embedder, "cube-a", 60) + memories(embedder, "cube-b", 20))
    sink.flush()
    snapshot, loaded = Searcher(sink, embedder).working_set.snapshot("cube-a")
    assert loaded
    keep = snapshot.mask(
        filters.get("since"),
        filters.get("until"),
        filters.get("tags"),
        filters.get("include_history", False),
    )
    expected = {r["memory_id"] for r in sink.rows(build_filter("cube-a", **filters))}
    assert {snapshot.ids[i] for i in np.flatnonzero(keep)} == expected
    assert expected  # every filter here keeps something


def test_dense_ranking_is_exact_cosine(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    sink = view(tmp_path)
    states = memories(embedder, "cube-a", 8)
    searcher = Searcher(sink, embedder)
    searcher.apply(states)
    query = embedder.encode(["a musical instrument for my child"])[0]
    snapshot, _ = searcher.working_set.snapshot("cube-a")
    keep = snapshot.mask(None, None, None, include_history=True)
    best = [snapshot.ids[i] for i, _ in snapshot.dense(query, keep, 3)]
    scores = {m.memory_id: float(np.frombuffer(m.embedding, "<f4") @ query) for m in states}
    assert best == sorted(scores, key=lambda mid: -scores[mid])[:3]
    assert best[0] == "cube-a-m7"  # the violin


def test_states_that_leave_the_view_leave_search(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    sink = view(tmp_path)
    states = memories(embedder, "cube-a", 8)
    searcher = Searcher(sink, embedder)
    searcher.apply(states)
    assert ranked(searcher, "cube-a", "violin")[0] == "cube-a-m7"
    searcher.apply([replace(states[7], status="merged", version=2)])
    assert "cube-a-m7" not in ranked(searcher, "cube-a", "violin", include_history=True)
    closed = replace(states[1], valid_to=T0 + timedelta(days=60), version=2)
    searcher.apply([closed])
    assert "cube-a-m1" not in ranked(searcher, "cube-a", "charity race")
    assert "cube-a-m1" in ranked(searcher, "cube-a", "charity race", include_history=True)


def test_a_state_with_the_same_searchable_content_keeps_the_index(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    """An ACTIVATE (a new version, same text, tags, validity and vector) patches the row a hit
    shows; it does not rebuild the cube's matrix and BM25 index. New text does."""
    searcher = Searcher(view(tmp_path), embedder)
    states = memories(embedder, "cube-a", 8)
    searcher.apply(states)
    before, _ = searcher.working_set.snapshot("cube-a")
    searcher.apply([replace(states[7], version=2, activated=True)])
    after, _ = searcher.working_set.snapshot("cube-a")
    assert after is not before and after.bm25 is before.bm25 and after.matrix is before.matrix
    hit = searcher.search("cube-a", "violin", 1)[0]
    assert (hit.memory_id, hit.row["version"]) == ("cube-a-m7", 2)
    assert before.rows[before.ids.index("cube-a-m7")]["version"] == 1  # a search's copy stays

    searcher.apply([replace(states[7], version=3, text="Melanie said: We sold the violin.")])
    rebuilt, _ = searcher.working_set.snapshot("cube-a")
    assert rebuilt.bm25 is not after.bm25
    assert searcher.search("cube-a", "sold", 1)[0].memory_id == "cube-a-m7"


def test_eviction_and_writes_during_a_load_lose_nothing(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    sink = view(tmp_path)
    a, b = memories(embedder, "cube-a", 30), memories(embedder, "cube-b", 30)
    searcher = Searcher(sink, embedder, budget_rows=40)
    for batch in (a, b):  # as the worker does: write the view, then the working set
        sink.put(batch)
        searcher.apply(batch)
    sink.flush()
    assert not searcher.working_set.resident("cube-a")  # over budget: the older cube left

    late = memories(embedder, "cube-a", 31)[30:]
    sink.put(late)
    searcher.apply(late)  # cube-a is cold: only the view gets it
    sink.flush()
    assert not searcher.working_set.resident("cube-a")
    found = ranked(searcher, "cube-a", "pottery workshop (30)", include_history=True)
    assert "cube-a-m30" in found
    assert searcher.working_set.loads == 1
    snapshot, _ = searcher.working_set.snapshot("cube-a")
    assert len(snapshot.ids) == 31

    # A write that lands while a cube is read from the view makes the load read again.
    calls: list[str] = []
    more = memories(embedder, "cube-c", 2)
    sink.put(more[:1])
    sink.flush()

    def loader(cube_id: str):  # type: ignore[no-untyped-def]
        rows = sink.cube_rows(cube_id)
        if not calls:  # the worker writes the view, then the working set, mid-load
            sink.put(more[1:])
            sink.flush()
            working_set.apply(more[1:])
        calls.append(cube_id)
        return rows

    working_set = WorkingSet(loader, budget_rows=100)
    snapshot, loaded = working_set.snapshot("cube-c")
    assert loaded and calls == ["cube-c", "cube-c"]
    assert snapshot.ids == ["cube-c-m0", "cube-c-m1"]


def test_a_cube_this_worker_does_not_follow_is_never_kept(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    """With N views workers, a cube owned by another one is read from the store every time: a
    resident copy would miss the owner's later writes."""
    sink = view(tmp_path)
    first = memories(embedder, "cube-x", 3)
    sink.put(first[:2])
    sink.flush()
    searcher = Searcher(sink, embedder)
    searcher.working_set.retain = lambda cube_id: cube_id != "cube-x"
    assert len(searcher.working_set.snapshot("cube-x")[0].ids) == 2
    assert not searcher.working_set.resident("cube-x")
    sink.put(first[2:])  # the owner writes; this worker never sees the op
    sink.flush()
    assert len(searcher.working_set.snapshot("cube-x")[0].ids) == 3
    assert searcher.working_set.loads == 2


def test_a_cube_id_with_line_breaks_and_control_characters_reads_back(
    embedder, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """quote() escapes what ends a Milvus string literal (a raw line break gave "unterminated
    string literal", a 500), so any cube id a store took can be read back; a control character
    Milvus takes as it is."""
    sink = view(tmp_path)
    odd = 'odd\ncube\t"quoted"\\slash\r\x01'
    sink.put(memories(embedder, odd, 3) + memories(embedder, "odd", 2))
    assert len(sink.cube_rows(odd)) == 3
    assert {r["cube_id"] for r in sink.cube_rows(odd)} == {odd}
    assert len(sink.cube_rows("odd")) == 2  # positive control: the plain cube is apart

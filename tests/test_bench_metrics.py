"""The retrieval metrics of the quality benchmark."""

from __future__ import annotations

import math

import pytest

from bench.quality import dedupe, score


def test_recall_any_and_all() -> None:
    ranked = ["D1:1", "D1:2", "D1:3", "D2:1", "D2:2", "D3:1"]
    s = score(ranked, ["D1:3", "D3:1"])
    assert s["recall_any@5"] == 1.0
    assert s["recall_all@5"] == 0.0
    assert s["recall_all@10"] == 1.0
    assert score(ranked, ["D1:3", "D3:1", "D9:9"])["recall@5"] == pytest.approx(1 / 3)
    assert score(ranked, ["D1:3", "D3:1", "D9:9"])["recall@10"] == pytest.approx(2 / 3)


def test_ndcg_at_10() -> None:
    assert score(["a", "b"], ["a"])["ndcg@10"] == pytest.approx(1.0)
    assert score(["b", "a"], ["a"])["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert score(["x"] * 10 + ["a"], ["a"])["ndcg@10"] == 0.0
    both = score(["a", "x", "b"], ["a", "b"])["ndcg@10"]
    assert both == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_dedupe_keeps_first_rank() -> None:
    assert dedupe(["D1:1", "D1:2", "D1:1", "", "D1:3"]) == ["D1:1", "D1:2", "D1:3"]


def test_profile_charges_each_sample_to_its_innermost_component(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bench.profile import shares

    raw = tmp_path / "raw.txt"
    raw.write_text(
        "run (worker.py:10);encode (onnx_embedder.py:5);run (onnxruntime/session.py:1) 6\n"
        "run (worker.py:10);write (milvus.py:3);upsert (pymilvus/client.py:9) 3\n"
        "run (worker.py:10);_follow_ops (worker.py:40) 1\n"
        "garbage line without a count\n"
    )
    assert shares(raw) == {
        "embedder: ONNX Runtime inference": 0.6,
        "milvus-lite (+ pymilvus, gRPC)": 0.3,
        "worker loop": 0.1,
    }

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


def test_ndcg_at_10() -> None:
    assert score(["a", "b"], ["a"])["ndcg@10"] == pytest.approx(1.0)
    assert score(["b", "a"], ["a"])["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert score(["x"] * 10 + ["a"], ["a"])["ndcg@10"] == 0.0
    both = score(["a", "x", "b"], ["a", "b"])["ndcg@10"]
    assert both == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_dedupe_keeps_first_rank() -> None:
    assert dedupe(["D1:1", "D1:2", "D1:1", "", "D1:3"]) == ["D1:1", "D1:2", "D1:3"]

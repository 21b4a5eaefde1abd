"""Retrieval quality on LoCoMo, next to two baselines of its own, overall, per category and
per conversation.

Two modes. By default, through the real pipeline: each conversation is ingested with its real
timestamps through `memstream serve`, then every question (adversarial ones excluded) is searched
over HTTP. With ``cv=True``, in process and without services (:mod:`bench.quality_local`: the
same reader, fold and ranking), as leave-one-conversation-out cross-validation: the ranking's
knobs are chosen on the other conversations and scored on the one left out, so a number is never
one the knobs were tuned on.

The memories a search returns are mapped back to the turns they came from (in rank order, each
turn once). Baselines over the raw turns, computed here: BM25 (bm25s) and dense MiniLM (the same
embedder). Metrics: recall@k (the share of gold turns in the top k), recall_any@k, recall_all@k
(all gold turns in the top k; "all-gold") for k = 5, 10, 20, and NDCG@10.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.report import percentiles, write
from streams.pipeline.build import embedder_for
from streams.sdk import locomo
from streams.sdk.local import ServeProcess
from streams.settings import Settings

KS = (5, 10, 20)
Ranker = dict[str, list[str]]


def score(ranked: list[str], gold: list[str]) -> dict[str, float]:
    """recall_any@k, recall_all@k and NDCG@10 (binary gains) of one ranked list of turn ids."""
    gold_set = set(gold)
    out: dict[str, float] = {}
    for k in KS:
        top = set(ranked[:k])
        out[f"recall@{k}"] = len(top & gold_set) / len(gold_set)
        out[f"recall_any@{k}"] = float(bool(top & gold_set))
        out[f"recall_all@{k}"] = float(gold_set <= top)
    dcg = sum(1 / math.log2(i + 2) for i, t in enumerate(ranked[:10]) if t in gold_set)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(gold_set), 10)))
    out["ndcg@10"] = dcg / ideal if ideal else 0.0
    return out


def dedupe(turns: list[str]) -> list[str]:
    return list(dict.fromkeys(t for t in turns if t))


class Baselines:
    """BM25 and dense retrieval over one conversation's raw turns."""

    def __init__(self, sample: locomo.Sample, embedder: Any) -> None:
        turns = [t for n in locomo.sessions(sample)
                 for t in sample.conversation[f"session_{n}"]]  # fmt: skip
        self.ids = [t["dia_id"] for t in turns]
        texts = [f"{t['speaker']}: {t['text']}" for t in turns]
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                        show_progress=False)  # fmt: skip
        self.embedder = embedder
        self.vectors = embedder.encode(texts)

    def bm25_rank(self, question: str, k: int = 20) -> list[str]:
        tokens = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return []
        docs, scores = self.bm25.retrieve(tokens, k=min(k, len(self.ids)), show_progress=False)
        return [self.ids[d] for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def dense_rank(self, question: str, k: int = 20) -> list[str]:
        scores = self.vectors @ self.embedder.encode([question])[0]
        return [self.ids[i] for i in np.argsort(-scores)[:k]]


def run(
    data: Path | None = None, run_out: Path | None = None, peers: tuple[str, ...] = ("mem0",)
) -> dict[str, Any]:
    console = Console()
    samples = locomo.load(data)
    worker = ServeProcess(Settings(), Path(tempfile.mkdtemp(prefix="memstream-quality-"))).start()
    embedder = embedder_for(worker.settings)
    per_system: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    run_file: Ranker = {}
    search_ms: list[float] = []
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("conversations", total=len(samples))
            for sample in samples:
                cube = f"quality-{sample.sample_id}-{uuid.uuid4().hex[:6]}"
                turns = [i.model_dump(exclude={"cube_id"})
                         for i in locomo.interactions(sample, cube)]  # fmt: skip
                for start in range(0, len(turns), 500):
                    worker.client.publish(cube, turns[start : start + 500])
                baselines = Baselines(sample, embedder)
                worker.client.wait_drained(600)
                known = locomo.turn_ids(sample)
                for index, qa in enumerate(sample.qa):
                    gold = locomo.evidence(qa, known)
                    if qa.get("category") == 5 or not gold:
                        continue
                    category = locomo.CATEGORIES.get(qa.get("category"), "other")
                    started = time.perf_counter()
                    hits = worker.client.search(cube, qa["question"], top_k=50)["hits"]
                    search_ms.append((time.perf_counter() - started) * 1e3)
                    ours = dedupe([h["turn_id"] for h in hits])[:20]
                    run_file[f"{sample.sample_id}#{index}"] = ours
                    for system, ranked in (
                        ("memstream", ours),
                        ("bm25", baselines.bm25_rank(qa["question"])),
                        ("dense", baselines.dense_rank(qa["question"])),
                    ):
                        scored = score(ranked, gold)
                        per_system[system]["overall"].append(scored)
                        per_system[system][category].append(scored)
                        per_system[system][sample.sample_id].append(scored)
                progress.advance(task)
    finally:
        worker.discard()
    if run_out:
        run_out.write_text(json.dumps(run_file, indent=1) + "\n")
        console.print(f"run written to {run_out}")
    latency: dict[str, Any] = {"memstream": {"search": percentiles(search_ms)}}
    if "mem0" in peers:
        from bench.peers import mem0

        with console.status("mem0: ingesting and searching the same conversations..."):
            peer = mem0.quality(
                data or locomo.default_file(),
                worker.settings.tools_dir / "onnx",
                quantize=worker.settings.embedder == "onnx-int8",
            )
        for sample in samples:
            known = locomo.turn_ids(sample)
            for index, qa in enumerate(sample.qa):
                key = f"{sample.sample_id}#{index}"
                if key not in peer["runs"]:
                    continue
                scored = score(peer["runs"][key], locomo.evidence(qa, known))
                category = locomo.CATEGORIES.get(qa.get("category"), "other")
                for group in ("overall", category, sample.sample_id):
                    per_system["mem0"][group].append(scored)
        latency["mem0"] = {
            "add": percentiles(peer["add_ms"]),
            "search": percentiles(peer["search_ms"]),
        }
    results = {system: summarise(groups) for system, groups in per_system.items()}
    print_table(console, results, "LoCoMo retrieval through the pipeline")
    write(
        "quality",
        {"data": str(data or locomo.default_file()), "systems": results, "latency": latency},
        console,
        show=False,
    )
    return results


def cross_validated(data: Path | None = None) -> dict[str, Any]:
    """Leave-one-conversation-out cross-validation in process (no services needed)."""
    from bench import quality_local

    console = Console()
    samples = locomo.load(data)
    settings = Settings()
    embedder = quality_local.CachedEmbedder(embedder_for(settings), settings.tools_dir)
    with Progress(console=console) as progress:
        conversations = quality_local.prepare(samples, embedder, progress)
        rows, choices = quality_local.cross_validate(conversations, progress)
    results = {}
    for system, scored in rows.items():
        groups: dict[str, list[dict[str, float]]] = defaultdict(list)
        for conversation, category, s in scored:
            for group in ("overall", category, conversation):
                groups[group].append(s)
        results[system] = summarise(groups)
    print_table(console, results, "LoCoMo, each conversation left out once (cv: memstream's "
                "ranking chosen on the others; default: memstream as shipped)")  # fmt: skip
    knobs = Table("held out", *(k for k in choices[0] if k != "held_out"),
                  title="ranking chosen on the other conversations")  # fmt: skip
    for choice in choices:
        knobs.add_row(*(f"{v:g}" if isinstance(v, float) else str(v) for v in choice.values()))
    console.print(knobs)
    document = {"data": str(data or locomo.default_file()), "embedder": embedder.model_id,
                "systems": results, "chosen": choices}  # fmt: skip
    write("quality-cv", document, console, show=False)
    return results


def summarise(groups: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of every metric per group: overall first, then categories, then conversations."""
    order = sorted(groups, key=lambda g: (g != "overall", g.startswith("conv"), g))
    return {
        group: {"questions": len(groups[group])}
        | {m: round(float(np.mean([r[m] for r in groups[group]])), 4) for m in groups[group][0]}
        for group in order
    }


def print_table(console: Console, results: dict[str, Any], title: str) -> None:
    """recall@10 / all-gold@10 per group, a column per system (fits 80 columns); the JSON
    holds every metric."""
    systems = list(results)
    table = Table("group", "n", *systems, title=f"{title}\nrecall@10 / all-gold@10",
                  min_width=40)  # fmt: skip
    first = results[systems[0]]
    for group, values in first.items():
        cells = []
        for system in systems:
            v = results[system].get(group)
            cells.append(f"{v['recall@10']:.3f}/{v['recall_all@10']:.3f}" if v else "-")
        table.add_row(group, str(values["questions"]), *cells)
    console.print(table)


if __name__ == "__main__":
    run()

"""Retrieval quality on LoCoMo and BEAM, next to two baselines of its own, overall, per category
and per conversation.

Two benchmarks (``dataset``): LoCoMo (:mod:`streams.sdk.locomo`; two people chatting about
their lives, adversarial questions left out) and BEAM 100K (:mod:`streams.sdk.beam`; long
user-assistant conversations about projects, code and plans; questions without evidence turns,
abstention and a few others, are counted but not scored).

Two modes. By default, through the real pipeline: each conversation is ingested with its real
timestamps through `memstream serve`, then every question is searched over HTTP. With
``cv=True``, in process and without services (:mod:`bench.quality_local`: the same reader, fold
and ranking), as leave-one-conversation-out cross-validation: the ranking's knobs are chosen on
the other conversations of the same benchmark and scored on the one left out, so a number is
never one the knobs were tuned on.

The memories a search returns are mapped back to the turns they came from (in rank order, each
turn once). Baselines over the raw turns, computed here: BM25 (bm25s) and dense MiniLM (the same
embedder; for BEAM, what mem0 gives offline). Metrics: recall@k (the share of gold turns in the
top k), recall_any@k, recall_all@k (all gold turns in the top k; "all-gold") for k = 5, 10, 20,
and NDCG@10.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.report import percentiles, write
from schemas.limits import cut_utf8
from streams.pipeline.build import embedder_for
from streams.sdk import beam, locomo
from streams.sdk.local import ServeProcess
from streams.settings import Settings
from streams.transport.events import Interaction

KS = (5, 10, 20)
DATASETS = ("locomo", "beam")
Ranker = dict[str, list[str]]
#: One question's scores, or None: a question without evidence turns (counted, not scored).
Scored = dict[str, float] | None


@dataclass(frozen=True)
class Asked:
    """One question: its key in the run file, its category, and its gold turn ids (none: the
    question is counted in the tables, not scored)."""

    key: str
    category: str
    question: str
    gold: list[str]


@dataclass
class Conversation:
    """One conversation of a benchmark, in the shape every mode reads."""

    name: str  # the sample id: a group of its own in the tables
    cube: str  # the cube the in-process run folds it into
    interactions: Callable[[str], list[Interaction]]  # its turns, into a given cube
    turns: list[tuple[str, str]]  # (turn id, text) for the baselines over the raw turns
    questions: list[Asked]


@dataclass
class Benchmark:
    name: str  # "locomo" or "beam"
    title: str
    data: Path
    conversations: list[Conversation]
    #: Short names of categories for the tables (the JSON keeps the full ones).
    labels: dict[str, str] = field(default_factory=dict)
    ndcg: bool = False  # an NDCG@10 table too
    #: What the loader changed so that every turn can go through the API (said and saved).
    notes: list[str] = field(default_factory=list)

    def result_name(self, cv: bool) -> str:
        """bench/results/<name>.json: quality(-cv) for LoCoMo as before, quality-beam(-cv)."""
        base = "quality" if self.name == "locomo" else f"quality-{self.name}"
        return f"{base}-cv" if cv else base


def load_locomo(data: Path | None = None) -> Benchmark:
    path = Path(data or locomo.default_file())
    conversations = []
    for sample in locomo.load(path):
        known = locomo.turn_ids(sample)
        asked = []
        for index, qa in enumerate(sample.qa):
            gold = locomo.evidence(qa, known)
            if qa.get("category") == 5 or not gold:  # adversarial, or nothing to find
                continue
            category = locomo.CATEGORIES.get(qa.get("category"), "other")
            asked.append(Asked(f"{sample.sample_id}#{index}", category, qa["question"], gold))
        turns = [t for n in locomo.sessions(sample)
                 for t in sample.conversation[f"session_{n}"]]  # fmt: skip
        conversations.append(Conversation(
            sample.sample_id, f"locomo-{sample.sample_id}",
            lambda cube, s=sample: list(locomo.interactions(s, cube)),
            [(t["dia_id"], f"{t['speaker']}: {t['text']}") for t in turns], asked,
        ))  # fmt: skip
    return Benchmark("locomo", "LoCoMo", path, conversations)


BEAM_LABELS = {
    "contradiction_resolution": "contradiction",
    "information_extraction": "info_extract",
    "instruction_following": "instruction",
    "knowledge_update": "knowledge_upd",
    "multi_session_reasoning": "multi_session",
    "preference_following": "preference",
    "temporal_reasoning": "temporal",
}


def load_beam(data: Path | None = None) -> Benchmark:
    path = Path(data or beam.default_folder())
    limit = Settings().max_event_bytes
    conversations, notes = [], []
    for sample in beam.load(path):
        asked = [Asked(f"{sample.sample_id}#{q.key}", q.category, q.question, list(q.gold))
                 for q in sample.questions]  # fmt: skip
        for t in sample.turns:
            size = len(t.content.encode("utf-8"))
            if size > limit:
                notes.append(f"{sample.sample_id} turn {t.turn_id}: {size:,} bytes, cut")
        conversations.append(Conversation(
            sample.sample_id, sample.sample_id,
            lambda cube, s=sample: [fit(i, limit) for i in beam.interactions(s, cube)],
            [(t.turn_id, f"{t.speaker}: {cut_utf8(t.content, limit)}") for t in sample.turns],
            asked,
        ))  # fmt: skip
    return Benchmark("beam", "BEAM 100K", path, conversations, BEAM_LABELS, ndcg=True,
                     notes=notes)  # fmt: skip


def fit(interaction: Interaction, limit: int) -> Interaction:
    """The interaction with its content cut to ``limit`` bytes of UTF-8: the API refuses a
    longer one (``max_event_bytes``), and every system is scored on the same turns."""
    content = cut_utf8(interaction.content, limit)
    return interaction if content == interaction.content else interaction.model_copy(
        update={"content": content})  # fmt: skip


def load(dataset: str, data: Path | None = None) -> Benchmark:
    if dataset == "locomo":
        return load_locomo(data)
    if dataset == "beam":
        return load_beam(data)
    raise ValueError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")


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


def score_or_none(ranked: list[str], gold: list[str]) -> Scored:
    return score(ranked, gold) if gold else None


def dedupe(turns: list[str]) -> list[str]:
    return list(dict.fromkeys(t for t in turns if t))


class Baselines:
    """BM25 and dense retrieval over one conversation's raw turns."""

    def __init__(self, turns: list[tuple[str, str]], embedder: Any) -> None:
        self.ids = [i for i, _ in turns]
        texts = [t for _, t in turns]
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
    data: Path | None = None,
    run_out: Path | None = None,
    peers: tuple[str, ...] = ("mem0",),
    dataset: str = "locomo",
) -> dict[str, Any]:
    """Through the pipeline: ``dataset`` is locomo, beam or both (a table and a results file
    each; ``run_out`` holds every question of them)."""
    console = Console()
    run_file: Ranker = {}
    out = {}
    for name in names(dataset):
        benchmark = load(name, data if dataset != "both" else None)
        out[name] = _run_one(console, benchmark, run_file, peers)
    if run_out:
        run_out.write_text(json.dumps(run_file, indent=1) + "\n")
        console.print(f"run written to {run_out}")
    return out if dataset == "both" else out[dataset]


def names(dataset: str) -> tuple[str, ...]:
    if dataset == "both":
        return DATASETS
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (known: locomo, beam, both)")
    return (dataset,)


def _run_one(console: Console, benchmark: Benchmark, run_file: Ranker,
             peers: tuple[str, ...]) -> dict[str, Any]:  # fmt: skip
    worker = ServeProcess(Settings(), Path(tempfile.mkdtemp(prefix="memstream-quality-"))).start()
    embedder = embedder_for(worker.settings)
    per_system: dict[str, dict[str, list[Scored]]] = defaultdict(lambda: defaultdict(list))
    search_ms: list[float] = []
    started_at = time.perf_counter()
    try:
        with Progress(console=console) as progress:
            task = progress.add_task(f"{benchmark.name}: conversations",
                                     total=len(benchmark.conversations))  # fmt: skip
            for conversation in benchmark.conversations:
                cube = f"quality-{conversation.name}-{uuid.uuid4().hex[:6]}"
                turns = [i.model_dump(exclude={"cube_id"})
                         for i in conversation.interactions(cube)]  # fmt: skip
                for start in range(0, len(turns), 200):
                    worker.client.publish(cube, turns[start : start + 200])
                baselines = Baselines(conversation.turns, embedder)
                worker.client.wait_drained(1800)
                for asked in conversation.questions:
                    started = time.perf_counter()
                    hits = worker.client.search(cube, asked.question, top_k=50)["hits"]
                    search_ms.append((time.perf_counter() - started) * 1e3)
                    ours = dedupe([h["turn_id"] for h in hits])[:20]
                    run_file[asked.key] = ours
                    for system, ranked in (
                        ("memstream", ours),
                        ("bm25", baselines.bm25_rank(asked.question)),
                        ("dense", baselines.dense_rank(asked.question)),
                    ):
                        scored = score_or_none(ranked, asked.gold)
                        for group in ("overall", asked.category, conversation.name):
                            per_system[system][group].append(scored)
                progress.advance(task)
    finally:
        worker.discard()
    wall_s = time.perf_counter() - started_at
    latency: dict[str, Any] = {"memstream": {"search": percentiles(search_ms)}}
    if "mem0" in peers and benchmark.name != "locomo":
        console.print(f"mem0 left out of {benchmark.title}: its runner reads LoCoMo's format "
                      "(dense over the raw turns is mem0 offline)")  # fmt: skip
    if "mem0" in peers and benchmark.name == "locomo":
        from bench.peers import mem0

        with console.status("mem0: ingesting and searching the same conversations..."):
            peer = mem0.quality(
                benchmark.data,
                worker.settings.tools_dir / "onnx",
                quantize=worker.settings.embedder == "onnx-int8",
            )
        for conversation in benchmark.conversations:
            for asked in conversation.questions:
                if asked.key not in peer["runs"]:
                    continue
                scored = score(peer["runs"][asked.key], asked.gold)
                for group in ("overall", asked.category, conversation.name):
                    per_system["mem0"][group].append(scored)
        latency["mem0"] = {
            "add": percentiles(peer["add_ms"]),
            "search": percentiles(peer["search_ms"]),
        }
    order = [c.name for c in benchmark.conversations]
    results = {system: summarise(groups, order) for system, groups in per_system.items()}
    print_tables(console, results, f"{benchmark.title} retrieval through the pipeline",
                 benchmark)  # fmt: skip
    for note in benchmark.notes:
        console.print(f"note: {note}")
    document = {"data": str(benchmark.data), "systems": results, "latency": latency,
                "wall_s": round(wall_s, 1), "notes": benchmark.notes}  # fmt: skip
    write(benchmark.result_name(cv=False), document, console, show=False)
    return results


def cross_validated(
    data: Path | None = None, dataset: str = "locomo", run_out: Path | None = None
) -> dict[str, Any]:
    """Leave-one-conversation-out cross-validation in process (no services needed), over each
    benchmark's conversations on their own."""
    from bench import quality_local

    console = Console()
    settings = Settings()
    embedder = quality_local.CachedEmbedder(embedder_for(settings), settings.tools_dir)
    run_file: Ranker = {}
    out = {}
    for name in names(dataset):
        benchmark = load(name, data if dataset != "both" else None)
        started = time.perf_counter()
        with Progress(console=console) as progress:
            conversations = quality_local.prepare(benchmark.conversations, embedder, progress)
            prepared_s = time.perf_counter() - started
            rows, choices, ranked = quality_local.cross_validate(conversations, progress)
        run_file |= ranked
        results = {}
        for system, scored in rows.items():
            groups: dict[str, list[Scored]] = defaultdict(list)
            for conversation, category, s in scored:
                for group in ("overall", category, conversation):
                    groups[group].append(s)
            results[system] = summarise(groups, [c.name for c in benchmark.conversations])
        print_tables(console, results, f"{benchmark.title}, each conversation left out once "
                     "(cv: memstream's ranking chosen on the others; default: memstream as "
                     "shipped)", benchmark)  # fmt: skip
        knobs = Table("held out", *(k for k in choices[0] if k != "held_out"),
                      title="ranking chosen on the other conversations")  # fmt: skip
        for choice in choices:
            knobs.add_row(*(f"{v:g}" if isinstance(v, float) else str(v)
                            for v in choice.values()))  # fmt: skip
        console.print(knobs)
        wall_s = time.perf_counter() - started
        each_s = wall_s / len(conversations)
        timing = {"ingest_in_process": round(prepared_s, 1), "total": round(wall_s, 1),
                  "per_conversation": round(each_s, 1)}  # fmt: skip
        for note in benchmark.notes:
            console.print(f"note: {note}")
        document = {"data": str(benchmark.data), "embedder": embedder.model_id,
                    "systems": results, "chosen": choices, "timing_s": timing,
                    "notes": benchmark.notes}  # fmt: skip
        write(benchmark.result_name(cv=True), document, console, show=False)
        console.print(f"{benchmark.name}: {wall_s:.0f} s ({prepared_s:.0f} s ingesting in "
                      f"process), {each_s:.1f} s per conversation")  # fmt: skip
        out[name] = results
    if run_out:
        run_out.write_text(json.dumps(run_file, indent=1) + "\n")
        console.print(f"run written to {run_out} (memstream, cross-validated)")
    return out if dataset == "both" else out[dataset]


def summarise(
    groups: dict[str, list[Scored]], conversations: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Mean of every metric per group over its scored questions: overall first, then
    categories, then conversations (in ``conversations``' order). ``questions`` counts every
    question of the group, ``scored`` those with evidence."""
    order_of = {c: n for n, c in enumerate(conversations or [])}

    def key(group: str) -> tuple[int, int, str]:
        if group == "overall":
            return (0, 0, "")
        if group in order_of or (not order_of and group.startswith("conv")):
            return (2, order_of.get(group, 0), group)
        return (1, 0, group)

    out = {}
    for group in sorted(groups, key=key):
        rows = [r for r in groups[group] if r is not None]
        means = {m: round(float(np.mean([r[m] for r in rows])), 4) for m in rows[0]} if rows else {}
        out[group] = {"questions": len(groups[group]), "scored": len(rows)} | means
    return out


def print_tables(console: Console, results: dict[str, Any], title: str,
                 benchmark: Benchmark | None = None) -> None:  # fmt: skip
    """recall@10 / all-gold@10 per group, a column per system, and for BEAM NDCG@10 too (each
    fits 80 columns); the JSON holds every metric."""
    labels = benchmark.labels if benchmark else {}
    print_table(console, results, title, labels)
    if benchmark and benchmark.ndcg:
        print_table(console, results, f"{benchmark.title}: NDCG@10", labels, ("ndcg@10",))


def print_table(
    console: Console,
    results: dict[str, Any],
    title: str,
    labels: dict[str, str] | None = None,
    metrics: tuple[str, ...] = ("recall@10", "recall_all@10"),
) -> None:
    """``metrics`` per group, a column per system; ``n`` is the questions scored, and of all
    questions where some have no evidence ("0/20": counted, not scored)."""
    systems = list(results)
    names = {"recall@10": "recall@10", "recall_all@10": "all-gold@10", "ndcg@10": "NDCG@10"}
    table = Table("group", "n", *systems, min_width=40, show_edge=False, pad_edge=False,
                  title=f"{title}\n{' / '.join(names.get(m, m) for m in metrics)}")  # fmt: skip
    first = results[systems[0]]
    for group, values in first.items():
        cells = []
        for system in systems:
            v = results[system].get(group)
            scored = v and all(m in v for m in metrics)
            cells.append("/".join(f"{v[m]:.3f}" for m in metrics) if scored else "-")
        questions, scored_n = values["questions"], values.get("scored", values["questions"])
        n = str(questions) if scored_n == questions else f"{scored_n}/{questions}"
        label = (labels or {}).get(group, group)
        table.add_row(f"[bold]{label}[/]" if group == "overall" else label, n, *cells)
    console.print(table)


if __name__ == "__main__":
    run()

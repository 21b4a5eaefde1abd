"""One PNG of the latest results: search latency percentiles, LoCoMo recall@k, ingest rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.report import RESULTS


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["results"] if path.exists() else None


def search_panel(ax: Axes, search: dict[str, Any]) -> None:
    labels: list[str] = []
    bars: dict[str, list[float]] = {"p50": [], "p95": [], "p99": []}
    for system in ("memstream", "mem0"):
        for size, runs in search.get(system, {}).items():
            if "skipped" in runs:
                continue
            for clients, n in (("one_client", 1), ("eight_clients", 8)):
                labels.append(f"{system} {int(size) // 1000:,}k, {n} client{'s' * (n > 1)}")
                for p in bars:
                    bars[p].append(runs[clients][f"{p}_ms"])
    width = 0.27
    for k, (p, values) in enumerate(bars.items()):
        ax.bar([i + (k - 1) * width for i in range(len(labels))], values, width, label=p)
    ax.set_xticks(list(range(len(labels))), labels, fontsize=6, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("search latency (ms, log scale)")
    ax.set_title("search: memories in the store, concurrent clients")
    ax.legend()


def quality_panel(ax: Axes, quality: dict[str, Any]) -> None:
    systems = quality["systems"]
    metrics = ["recall_any@5", "recall_any@10", "recall_any@20",
               "recall_all@5", "recall_all@10", "recall_all@20", "ndcg@10"]  # fmt: skip
    width = 0.8 / len(systems)
    for k, (system, groups) in enumerate(systems.items()):
        values = [groups["overall"][m] for m in metrics]
        ax.bar([i + k * width for i in range(len(metrics))], values, width, label=system)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics, fontsize=7,
                  rotation=30, ha="right")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_title("LoCoMo dev retrieval (evidence turns), overall")
    ax.legend(fontsize=7)


def ingest_panel(ax: Axes, ingest: dict[str, Any]) -> None:
    systems = [s for s in ("memstream", "mem0") if s in ingest]
    ceiling = ingest["ceiling_embedder"]["interactions_per_s_equivalent"]
    width = 0.8 / (len(systems) + 1)
    for k, system in enumerate(systems):
        values = [ingest[system]["interactions_per_s"], ingest[system]["memories_per_s"]]
        xs = [i + k * width for i in range(2)]
        ax.bar(xs, values, width, label=system)
        for x, value in zip(xs, values, strict=True):
            ax.text(x, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.bar([len(systems) * width], [ceiling], width, color="C7", label="ceiling: embedder alone")
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(2)],
                  ["interactions / s", "memories / s"])  # fmt: skip
    ax.set_title(f"ingest: {ingest['interactions']:,} LoCoMo turns, end to end")
    ax.legend(fontsize=7)


def plot(out: Path = RESULTS / "summary.png") -> Path:
    panels = [(name, data) for name in ("search", "quality", "ingest") if (data := load(name))]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.8))
    axes = axes if len(panels) > 1 else [axes]
    draw = {"search": search_panel, "quality": quality_panel, "ingest": ingest_panel}
    for ax, (name, data) in zip(axes, panels, strict=False):
        draw[name](ax, data)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot())

"""One PNG of the latest results: search latency percentiles and LoCoMo recall@k per system."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import RESULTS


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["results"] if path.exists() else None


def plot(out: Path = RESULTS / "summary.png") -> Path:
    search, quality = load("search"), load("quality")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    if search:
        labels, p50, p95, p99 = [], [], [], []
        for size, runs in search.items():
            for clients in ("one_client", "eight_clients"):
                labels.append(f"{int(size):,}\n{'1' if clients == 'one_client' else '8'} client(s)")
                p50.append(runs[clients]["p50_ms"])
                p95.append(runs[clients]["p95_ms"])
                p99.append(runs[clients]["p99_ms"])
        if quality and "mem0" in quality.get("latency", {}):
            for system in ("memstream", "mem0"):
                lat = quality["latency"][system]["search"]
                labels.append(f"LoCoMo\n{system}")
                p50.append(lat["p50_ms"])
                p95.append(lat["p95_ms"])
                p99.append(lat["p99_ms"])
        x = range(len(labels))
        width = 0.27
        left.bar([i - width for i in x], p50, width, label="p50")
        left.bar(list(x), p95, width, label="p95")
        left.bar([i + width for i in x], p99, width, label="p99")
        left.set_xticks(list(x), labels, fontsize=7)
        left.set_ylabel("search latency (ms)")
        left.set_title("search latency by memories in the store")
        left.legend()
    if quality:
        systems = quality["systems"]
        metrics = ["recall_any@5", "recall_any@10", "recall_any@20",
                   "recall_all@5", "recall_all@10", "recall_all@20", "ndcg@10"]  # fmt: skip
        width = 0.8 / len(systems)
        for k, (system, groups) in enumerate(systems.items()):
            values = [groups["overall"][m] for m in metrics]
            right.bar([i + k * width for i in range(len(metrics))], values, width, label=system)
        right.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics, fontsize=7)
        right.set_ylim(0, 1)
        right.set_title("LoCoMo dev retrieval (evidence turns), overall")
        right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot())

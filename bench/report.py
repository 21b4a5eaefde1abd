"""Percentiles, the results table and the JSON file: one format for every benchmark."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from processors.embedder import cpu

RESULTS = Path(__file__).parent / "results"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {"n": 0}
    a = np.asarray(samples_ms)
    return {
        "n": len(samples_ms),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def latency_summary(samples_ms: list[float], wall_s: float) -> dict[str, float]:
    """Percentiles of a timed run and its throughput (requests per wall-clock second)."""
    return {**percentiles(samples_ms), "qps": round(len(samples_ms) / wall_s, 1)}


def timing_split(timings: list[dict[str, float]]) -> dict[str, float]:
    """Median time per search part (the Searcher's ``last_timing`` / the API's ``timing_ms``):
    query embedding against the store (snapshot, exact cosine, BM25, fusion), and the embedding
    share."""
    part = {k: float(np.median([t[k] for t in timings])) for k in
            ("embed_ms", "snapshot_ms", "dense_ms", "keyword_ms", "fuse_ms")}  # fmt: skip
    store = part["snapshot_ms"] + part["dense_ms"] + part["keyword_ms"] + part["fuse_ms"]
    return {
        "embed_ms_median": round(part["embed_ms"], 2),
        "store_ms_median": round(store, 2),
        "dense_ms_median": round(part["dense_ms"], 2),
        "bm25_ms_median": round(part["keyword_ms"], 2),
        "embed_share": round(part["embed_ms"] / max(part["embed_ms"] + store, 1e-9), 3),
    }


def write(
    name: str,
    results: dict[str, Any],
    console: Console | None = None,
    side_by_side: tuple[str, ...] = (),
    show: bool = True,
) -> Path:
    """Print every number as a table and write them (with the machine) to results/<name>.json.

    ``side_by_side`` names keys of ``results`` holding the same measurements for different
    systems: they share one table, a column each, a row per metric. ``show=False``: the caller
    printed its own table; only the file is written.
    """
    console = console or Console()
    systems = [s for s in side_by_side if s in results]
    rest = {k: v for k, v in results.items() if k not in systems}
    if rest and show:
        rows = _flatten(rest)
        table = Table(title=f"memstream bench {name}")
        # a metric's name whole on one line; a long value (a model id) is cut, the JSON has it
        width = min(max(len(k) for k, _ in rows), 48)
        table.add_column("metric", no_wrap=True, min_width=width)
        table.add_column("value", no_wrap=True, overflow="ellipsis", max_width=80 - 7 - width)
        for key, value in rows:
            table.add_row(key, _cell(value))
        console.print(table)
    if systems and show:
        table = Table("metric", *systems, title=f"memstream bench {name}: side by side")
        columns = [dict(_flatten(results[s])) for s in systems]
        for key in dict.fromkeys(k for c in columns for k in c):
            table.add_row(key, *(_cell(c.get(key, "")) for c in columns))
        console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": _cpus(),
            **cpu(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "results": results,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"written {path}")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float) and 0 < abs(value) < 1:
        return f"{value:.4g}"  # cosines, shares: 0.99 would hide what differs
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))

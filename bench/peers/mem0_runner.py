"""Runs inside the mem0 environment (``.venv-peer``): the same workloads as memstream's benchmarks.

Input (stdin, JSON) — common: {"mode": "quality" | "ingest" | "search", "workdir": path,
"onnx_dir": path, "quantize": bool}, and per mode:

- quality: {"data": path, "top_k": int} -> {"runs": {"<sample>#<qa index>": [dia_id, ...]},
  "add_ms": [...], "search_ms": [...]}
- ingest: {"interactions": path of a JSON list of {cube_id, speaker, content, turn_id},
  "probes": int} -> {"total_s", "add_ms": [...], "to_searchable_ms": [...]}
- search: {"vectors": path of an .npy of real memory vectors, "texts": [...], "questions": [...],
  "sizes": [...], "per_cube": int, "queries": int, "budget_s": float} -> {"<size>": {"cubes",
  "write_s", "one_client" / "eight_clients": {"latencies_ms": [...], "wall_s"}} or {"skipped"}}

Output: the result as JSON on the last line of stdout.

mem0 is configured fully offline: ``infer=False`` (no LLM is reachable here; the OpenAI settings
point at an unused local port and are never called), local on-disk Qdrant (mem0's default
store), and the very embedder memstream uses (MiniLM on ONNX Runtime) injected as its model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("MEM0_TELEMETRY", "False")


class SharedEmbedder:
    """mem0's embedding-model interface over memstream's ONNX MiniLM."""

    def __init__(self, onnx_dir: Path, quantize: bool) -> None:
        from processors.onnx_embedder import OnnxMiniLMEmbedder

        self.inner = OnnxMiniLMEmbedder(onnx_dir, quantize=quantize)

    def embed(self, text: str, memory_action: str | None = None) -> list[float]:
        return self.inner.encode([text])[0].tolist()


def open_memory(job: dict[str, Any], name: str = "memories") -> Any:
    from mem0 import Memory

    workdir = Path(job["workdir"]) / name
    memory = Memory.from_config(
        {
            "embedder": {"provider": "openai", "config": {"api_key": "unused",
                         "openai_base_url": "http://127.0.0.1:9/v1", "embedding_dims": 384}},
            "llm": {"provider": "openai", "config": {"api_key": "unused",
                    "openai_base_url": "http://127.0.0.1:9/v1"}},
            "vector_store": {"provider": "qdrant", "config": {"path": str(workdir / "qdrant"),
                             "collection_name": "memories", "embedding_model_dims": 384,
                             "on_disk": True}},
            "history_db_path": str(workdir / "history.db"),
        }
    )  # fmt: skip
    memory.embedding_model = SharedEmbedder(Path(job["onnx_dir"]), job["quantize"])
    return memory


def quality(job: dict[str, Any]) -> dict[str, Any]:
    from streams.sdk import locomo

    memory = open_memory(job)
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
    return {"runs": runs, "add_ms": add_ms, "search_ms": search_ms}


def ingest(job: dict[str, Any]) -> dict[str, Any]:
    """Every interaction through ``add`` (mem0's write path, synchronous), then probes: a new
    interaction until ``search`` finds it."""
    interactions = json.loads(Path(job["interactions"]).read_text())
    memory = open_memory(job)
    add_ms: list[float] = []
    started = time.perf_counter()
    for i in interactions:
        t = time.perf_counter()
        memory.add(f"{i['speaker']}: {i['content']}", user_id=i["cube_id"],
                   metadata={"dia_id": i["turn_id"]}, infer=False)  # fmt: skip
        add_ms.append((time.perf_counter() - t) * 1e3)
    total_s = time.perf_counter() - started
    to_searchable: list[float] = []
    for _ in range(job["probes"]):
        token = f"zq{uuid.uuid4().hex[:10]}"
        sent = time.perf_counter()
        memory.add(f"Probe: My locker code word is {token} for the gym.", user_id="bench-probe",
                   infer=False)  # fmt: skip
        while True:  # top_k above the probe count: found as soon as it is searchable
            found = memory.search(token, filters={"user_id": "bench-probe"}, top_k=100)
            hits = found["results"] if isinstance(found, dict) else found
            if any(token in h["memory"] for h in hits):
                break
            if time.perf_counter() - sent > 60:
                raise TimeoutError(f"probe {token} not searchable after 60 s")
        to_searchable.append((time.perf_counter() - sent) * 1e3)
    return {"total_s": total_s, "add_ms": add_ms, "to_searchable_ms": to_searchable}


def search(job: dict[str, Any]) -> dict[str, Any]:
    """The search benchmark's memories written through mem0's vector store in batches (``add``
    would embed each one again), then ``search`` — embedding + Qdrant + mem0's scoring — timed
    with 1 and 8 concurrent clients. A size whose fill would overrun the budget is skipped."""
    import numpy as np
    from mem0.utils.lemmatization import lemmatize_for_bm25

    from bench import synthetic

    base = np.load(job["vectors"])
    texts, questions = job["texts"], job["questions"]
    per_cube, queries = job["per_cube"], job["queries"]
    lemmas = [lemmatize_for_bm25(t) for t in texts]
    out: dict[str, Any] = {}
    rate = None
    for size in job["sizes"]:
        if rate is not None and size / rate > job["budget_s"]:
            reason = (f"fill would take ~{size / rate:.0f} s at {rate:.0f} memories/s, "
                      f"over the {job['budget_s']:.0f} s budget")  # fmt: skip
            out[str(size)] = {"skipped": reason}
            continue
        memory = open_memory(job, f"search-{size}")
        rng = np.random.default_rng(synthetic.SEED)
        now = datetime.now(UTC).isoformat()
        started = time.perf_counter()
        for start in range(0, size, 1000):
            stop = min(size, start + 1000)
            payloads = [{"data": texts[i % len(texts)], "user_id": f"cube-{i // per_cube}",
                         "hash": hashlib.md5(texts[i % len(texts)].encode()).hexdigest(),
                         "created_at": now, "updated_at": now,
                         "text_lemmatized": lemmas[i % len(texts)]}
                        for i in range(start, stop)]  # fmt: skip
            memory.vector_store.insert(
                vectors=synthetic.vectors(base, start, stop, rng).tolist(),
                payloads=payloads,
                ids=[str(uuid.UUID(int=i + 1)) for i in range(start, stop)],
            )
        write_s = time.perf_counter() - started
        rate = size / write_s
        cubes = max(1, size // per_cube)

        def one(index: int, memory: Any = memory, cubes: int = cubes) -> float:
            t = time.perf_counter()
            memory.search(questions[index % len(questions)],
                          filters={"user_id": f"cube-{index % cubes}"}, top_k=10)  # fmt: skip
            return (time.perf_counter() - t) * 1e3

        result: dict[str, Any] = {"cubes": cubes, "write_s": round(write_s, 1)}
        for name, clients in (("one_client", 1), ("eight_clients", 8)):
            n = max(8, min(queries, int(job["budget_s"] * 1000 / max(one(0), 1) / 4)))
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = list(pool.map(one, range(n)))
            result[name] = {"latencies_ms": latencies, "wall_s": time.perf_counter() - t}
        out[str(size)] = result
        print(f"mem0: {size:,} memories done", file=sys.stderr, flush=True)
    return out


def main() -> None:
    job = json.loads(sys.stdin.read())
    mode = {"quality": quality, "ingest": ingest, "search": search}[job.get("mode", "quality")]
    print(json.dumps(mode(job)))


if __name__ == "__main__":
    main()

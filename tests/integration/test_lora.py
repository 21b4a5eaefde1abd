"""Parameter memory: a LoRA adapter of the real SmolLM2 trained on a cube's memory texts, stored
in the real MinIO, loaded back verified; a truncated, changed or foreign adapter is refused."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from processors.lm import AdapterHook, LocalLM, load_lm
from processors.lora import (
    METADATA_KEY,
    AdapterRefused,
    BaseIdentity,
    LoraSettings,
    TrainReport,
    adapter_hook,
    load_adapter,
    mean_loss,
    sha256_hex,
    train_adapter,
)
from sinks.blobs import BlobStore
from streams.pipeline.parameter import ADAPTER_KIND, fetch_adapter
from streams.settings import Settings

pytestmark = pytest.mark.integration

TEXTS = (
    "Caroline said: I moved to Lisbon last month (October 2026).",
    "Melanie said: my dog Biscuit is a three-year-old beagle.",
    "Caroline said: I work as a nurse at the city hospital.",
)
IDS = ("mem-lisbon", "mem-biscuit", "mem-nurse")
SMALL = LoraSettings(steps=3, lr=5e-3, max_tokens=32)
PROMPT = "Caroline said: I moved to"
# A loss the trainer computed (on ``SMALL.threads`` torch threads, or in another process, maybe on
# another machine's kernels: AVX2 or AVX-512, oneDNN or not) against one computed here: the same
# fp32 sums in another order differ in the last bits (1.6e-6 of a 4.47 loss on a 2-core AVX-512
# Xeon, trainer on 1 thread, test on 2). Relative, and far above that, far below what an
# unchanged model vs a trained adapter differ by (> 0.5). Exactness is asserted where it holds:
# the base's tensors, and logits computed twice in this process on the same threads.
ACROSS_KERNELS = 1e-4


@pytest.fixture(scope="module")
def lm(settings: Settings) -> LocalLM:
    return load_lm(settings.effective_lm_dir, settings.lm_model)


@pytest.fixture(scope="module")
def blobs(settings: Settings) -> BlobStore:
    return BlobStore.from_settings(settings)


@pytest.fixture(scope="module")
def identity(lm: LocalLM) -> BaseIdentity:
    return BaseIdentity(lm.model_id, lm.weights_sha256)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch on ``n`` threads for the block (the setting is process-wide; training changes it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def logits(lm: LocalLM, adapter: AdapterHook | None = None) -> torch.Tensor:
    with threads(1):  # the same kernels and reduction order each time: equal bits
        return lm.next_token_logits(PROMPT, adapter=adapter)


@dataclass(frozen=True)
class Base:
    """The shared base model before any training: its tensors (copies) and its logits."""

    tensors: dict[str, torch.Tensor]
    logits: torch.Tensor

    def assert_unchanged(self, lm: LocalLM) -> None:
        now = lm.model.state_dict()
        assert now.keys() == self.tensors.keys()
        changed = [n for n, t in self.tensors.items() if not torch.equal(now[n], t)]
        assert not changed, changed[:5]
        assert torch.equal(logits(lm), self.logits)


@pytest.fixture(scope="module")
def base(lm: LocalLM) -> Base:
    tensors = {n: t.detach().clone() for n, t in lm.model.state_dict().items()}
    return Base(tensors, logits(lm))


@pytest.fixture(scope="module")
def trained(lm: LocalLM, identity: BaseIdentity, base: Base) -> TrainReport:
    steps: list[tuple[int, int, float]] = []
    report = train_adapter(lm.model, lm.tokenizer, TEXTS, IDS, identity, SMALL, version=1,
                           on_step=lambda *s: steps.append(s))  # fmt: skip
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)]
    print(f"\nLoRA r={SMALL.rank} {SMALL.steps} steps on {len(TEXTS)} texts in "
          f"{report.seconds:.1f} s: loss {report.loss_base:.4f} (base) -> "
          f"{report.loss_adapter:.4f} (adapter), {report.adapter.size:,} bytes")  # fmt: skip
    return report


def _loss(model: torch.nn.Module, lm: LocalLM) -> float:
    return mean_loss(model, lm.tokenizer, TEXTS, SMALL.max_tokens)


def test_adapter_lowers_the_loss_on_the_cube_memories(
    lm: LocalLM, trained: TrainReport, identity: BaseIdentity, base: Base
) -> None:
    assert trained.loss_adapter < trained.loss_base - 0.5, (trained.loss_base, trained.loss_adapter)
    # LoRA B starts at zero: the first step's loss is the base model's
    assert trained.step_losses[0] == pytest.approx(trained.loss_base, rel=1e-4)
    config = trained.adapter.config
    assert (config.base_model_id, config.base_weights_sha256) == (lm.model_id, lm.weights_sha256)
    assert (config.rank, config.target_modules, config.trained_on) == (8, ("q_proj", "v_proj"), IDS)
    assert trained.adapter.sha256 == sha256_hex(trained.adapter.data)
    assert trained.adapter.data[8:9] == b"{"  # a safetensors header, not a pickle
    # training never touched the shared base model: the same tensors, bit for bit, the same
    # logits, no LoRA layers in it; and the loss the trainer measured is the base's here
    base.assert_unchanged(lm)
    assert not [name for name, _ in lm.model.named_modules() if "lora" in name]
    assert _loss(lm.model, lm) == pytest.approx(trained.loss_base, rel=ACROSS_KERNELS)


def test_adapter_round_trip_through_minio(
    lm: LocalLM, trained: TrainReport, blobs: BlobStore, base: Base
) -> None:
    uri, sha256 = blobs.put(ADAPTER_KIND, trained.adapter.data)
    assert sha256 == trained.adapter.sha256 and uri.endswith(f"/{sha256}.safetensors")
    view, config = fetch_adapter(blobs, {"uri": uri, "sha256": sha256}, lm)
    assert config == trained.adapter.config
    assert _loss(view, lm) == pytest.approx(trained.loss_adapter, rel=ACROSS_KERNELS)
    # applied through the LM's adapter hook it changes the answer; the base stays the base
    adapted = logits(lm, adapter=adapter_hook(view))
    assert not torch.allclose(base.logits, adapted, atol=1e-3)
    base.assert_unchanged(lm)


def test_truncated_adapter_is_refused(
    lm: LocalLM, trained: TrainReport, blobs: BlobStore, identity: BaseIdentity
) -> None:
    data = trained.adapter.data
    cut = data[: len(data) - 1000]
    uri, _ = blobs.put(ADAPTER_KIND, cut)  # an object cut short, named by the original's hash
    with pytest.raises(AdapterRefused) as refused:
        fetch_adapter(blobs, {"uri": uri, "sha256": trained.adapter.sha256}, lm)
    assert refused.value.code == "truncated"
    assert "truncated: the tensors need" in refused.value.reason
    assert trained.adapter.sha256[:12] in refused.value.reason
    # refused even when the hash given is the cut bytes' own
    with pytest.raises(AdapterRefused, match=r"truncated"):
        load_adapter(lm.model, cut, sha256_hex(cut), identity)
    head = data[:100]
    with pytest.raises(AdapterRefused, match=r"truncated: the header says \d+ bytes, only 92"):
        load_adapter(lm.model, head, sha256_hex(head), identity)


def test_changed_foreign_or_missing_adapter_is_refused(
    lm: LocalLM, trained: TrainReport, blobs: BlobStore, identity: BaseIdentity
) -> None:
    data = bytearray(trained.adapter.data)
    data[-5] ^= 0xFF  # one byte of a tensor
    with pytest.raises(AdapterRefused) as refused:
        load_adapter(lm.model, bytes(data), trained.adapter.sha256, identity)
    assert refused.value.code == "corrupt" and "changed after it was written" in str(refused.value)
    other_model = BaseIdentity("SmolLM2-360M-Instruct", lm.weights_sha256)
    with pytest.raises(AdapterRefused, match="trained on base model 'SmolLM2-135M-Instruct'"):
        load_adapter(lm.model, trained.adapter.data, trained.adapter.sha256, other_model)
    other_weights = BaseIdentity(lm.model_id, "0" * 64)
    with pytest.raises(AdapterRefused) as refused:
        load_adapter(lm.model, trained.adapter.data, trained.adapter.sha256, other_weights)
    assert refused.value.code == "weights_mismatch"
    # a header that does not fit its tensors (rank 4 claimed, rank-8 tensors)
    tensors = load_safetensors(trained.adapter.data)
    lying = replace(trained.adapter.config, rank=4)
    forged = save_safetensors(tensors, metadata={METADATA_KEY: lying.to_json()})
    with pytest.raises(AdapterRefused) as refused:
        load_adapter(lm.model, forged, sha256_hex(forged), identity)
    assert refused.value.code == "shape_mismatch" and "the model needs (4," in refused.value.reason
    gone = blobs.uri(ADAPTER_KIND, "f" * 64)
    with pytest.raises(AdapterRefused) as refused:
        fetch_adapter(blobs, {"uri": gone, "sha256": "f" * 64}, lm)
    assert refused.value.code == "missing"

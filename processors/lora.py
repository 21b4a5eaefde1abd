"""Parameter memory: a PEFT LoRA adapter trained on a cube's memory texts, as safetensors bytes.

- :func:`train_adapter` trains LoRA (``q_proj``/``v_proj`` by default) on the texts for a bounded
  number of AdamW steps on CPU, from a fixed seed, and measures the model's mean token loss on
  those texts without and with the adapter (:func:`mean_loss`).
- The adapter is **safetensors** bytes (never pickle): the LoRA tensors, and in the header's
  metadata its :class:`AdapterConfig` as JSON (format, version, rank, alpha, target modules, base
  model id, base weights sha256, the memory ids it learned, how it was trained).
- :func:`load_adapter` checks the bytes' sha256, parses the header itself (so a truncated file
  says so), checks the base model's id and weights hash and the tensors' names and shapes, and
  only then applies it; anything else raises :class:`AdapterRefused` with the reason.

Isolation (why the base model never sees an adapter): PEFT injects LoRA layers *into* the model
it wraps, so wrapping the shared base model would change it for every other user (chat without
an adapter, the KV-cache prefill, another cube's adapter), and ``disable_adapter()`` is a context
that would race between threads. Instead every adapter is applied to a **view** of the base
model (:func:`model_view`): a copy of its module tree whose parameters and buffers are the base
model's own tensors (no weights copied, a few KB of modules), so LoRA layers land in the view's
modules only. Removing an adapter is dropping its view. The base's ``requires_grad`` flags, the
only state PEFT touches on shared tensors, are put back after wrapping.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import struct
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "memstream-lora/1"
METADATA_KEY = "memstream.adapter"


class AdapterRefused(ValueError):
    """An adapter that must not be applied: corrupt, truncated, or for another model.

    ``reason`` says what is wrong in words; ``code`` is one of ``truncated``, ``corrupt``
    (changed bytes or not a safetensors file), ``format`` (not a memstream adapter of this
    format), ``model_mismatch``, ``weights_mismatch``, ``shape_mismatch``, ``missing``.
    """

    def __init__(self, reason: str, code: str = "corrupt") -> None:
        self.reason = reason
        self.code = code
        super().__init__(f"adapter refused ({code}): {reason}")


@dataclass(frozen=True)
class BaseIdentity:
    """Which base model an adapter belongs to: its id and the sha256 of its weights."""

    model_id: str
    weights_sha256: str


@dataclass(frozen=True)
class LoraSettings:
    """How an adapter is trained (bounded: ``steps`` AdamW steps of ``batch_size`` texts)."""

    rank: int = 8
    alpha: int = 16
    steps: int = 8
    lr: float = 3e-3
    max_tokens: int = 96  # per text, longer texts are truncated
    batch_size: int = 8
    seed: int = 0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # torch threads while training (then restored). 1 leaves the other cores to the stream, and
    # on a busy 2-core machine 3 steps took 12 s on 1 thread and 71 s on 2 (oversubscribed).
    threads: int | None = 1


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter is; travels in the safetensors header, so the bytes describe themselves."""

    version: int
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    base_model_id: str
    base_weights_sha256: str
    trained_on: tuple[str, ...]
    steps: int
    lr: float
    max_tokens: int
    seed: int
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise AdapterRefused(f"format {raw.get('format')!r} is not {FORMAT!r}", "format")
            raw["target_modules"] = tuple(raw["target_modules"])
            raw["trained_on"] = tuple(raw["trained_on"])
            return cls(**raw)
        except AdapterRefused:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise AdapterRefused(f"adapter config is unreadable: {exc}", "format") from exc


@dataclass(frozen=True)
class Adapter:
    """A serialized adapter: safetensors bytes, their sha256 and the config in their header."""

    data: bytes
    sha256: str
    config: AdapterConfig

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class TrainReport:
    """A finished training: the adapter, the losses measured on its texts, and its step losses."""

    adapter: Adapter
    loss_base: float
    loss_adapter: float
    step_losses: tuple[float, ...] = field(default=())
    seconds: float = 0.0


ProgressCallback = Callable[[int, int, float], None]  # (step, steps, loss)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# the view: LoRA goes into a copy of the module tree, never into the shared base ----------------


def model_view(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def _wrap(model: torch.nn.Module, config: LoraConfig, seed: int) -> PeftModel:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    view = model_view(model)
    torch.manual_seed(seed)  # LoRA A is drawn at random (B starts at zero): deterministic
    try:
        wrapped = get_peft_model(view, config)
    finally:  # PEFT freezes the base tensors, which the view shares with the base: put back
        for param, flag in flags:
            param.requires_grad_(flag)
    return wrapped  # type: ignore[return-value]


def _lora_config(rank: int, alpha: int, target_modules: Sequence[str]) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


# loss -------------------------------------------------------------------------------------------


def _batches(
    tokenizer: Any, texts: Sequence[str], max_tokens: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels) batches, right-padded; padding is never a label."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    encoded = [
        list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens] for text in texts
    ]
    encoded = [ids for ids in encoded if len(ids) >= 2]  # a text needs a next token to predict
    if not encoded:
        raise ValueError("no text has two tokens to learn from")
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append((ids, mask, labels))
    return out


def _token_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Summed next-token cross-entropy over the labelled tokens, and their count."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="sum",
    )  # fmt: skip
    return loss, int((target != -100).sum())


def mean_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_tokens: int = 96,
    batch_size: int = 8,
) -> float:
    """The model's mean next-token cross-entropy over every token of ``texts`` (nats/token)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask, labels in _batches(tokenizer, texts, max_tokens, batch_size):
            loss, n = _token_loss(model, ids, mask, labels)
            total += float(loss)
            count += n
    model.train(was_training)
    return total / count


# training ---------------------------------------------------------------------------------------


def train_adapter(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    memory_ids: Sequence[str],
    base: BaseIdentity,
    settings: LoraSettings = LoraSettings(),
    version: int = 1,
    on_step: ProgressCallback | None = None,
) -> TrainReport:
    """Train a LoRA adapter on ``texts`` (the memories ``memory_ids``) and measure it.

    ``model`` is the base model: it is not modified (the adapter lives in a view of it). The
    loss is measured on the same texts, truncated to ``settings.max_tokens``, before and after.
    """
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _train(model, tokenizer, list(texts), memory_ids, base, settings, version, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    memory_ids: Sequence[str],
    base: BaseIdentity,
    settings: LoraSettings,
    version: int,
    on_step: ProgressCallback | None,
) -> TrainReport:
    started = time.monotonic()
    loss_base = mean_loss(model, tokenizer, texts, settings.max_tokens, settings.batch_size)
    wrapped = _wrap(
        model, _lora_config(settings.rank, settings.alpha, settings.target_modules), settings.seed
    )
    batches = _batches(tokenizer, texts, settings.max_tokens, settings.batch_size)
    params = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:  # base tensors are shared with the view: no gradients for them
        param.requires_grad_(False)
    step_losses: list[float] = []
    try:
        wrapped.train()
        for step in range(settings.steps):
            ids, mask, labels = batches[step % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            loss, n = _token_loss(wrapped, ids, mask, labels)
            loss = loss / max(n, 1)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(f"training diverged at step {step + 1}: loss {value}")
            step_losses.append(value)
            if on_step is not None:
                on_step(step + 1, settings.steps, value)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    wrapped.eval()
    loss_adapter = mean_loss(wrapped, tokenizer, texts, settings.max_tokens, settings.batch_size)
    config = AdapterConfig(
        version=version,
        rank=settings.rank,
        alpha=settings.alpha,
        target_modules=tuple(settings.target_modules),
        base_model_id=base.model_id,
        base_weights_sha256=base.weights_sha256,
        trained_on=tuple(memory_ids),
        steps=settings.steps,
        lr=settings.lr,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
    )
    return TrainReport(
        adapter=serialize_adapter(wrapped, config),
        loss_base=loss_base,
        loss_adapter=loss_adapter,
        step_losses=tuple(step_losses),
        seconds=time.monotonic() - started,
    )


# bytes ------------------------------------------------------------------------------------------


def serialize_adapter(wrapped: PeftModel, config: AdapterConfig) -> Adapter:
    """The LoRA tensors of ``wrapped`` as safetensors bytes, ``config`` in the header."""
    state = get_peft_model_state_dict(wrapped)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    data = save_safetensors(tensors, metadata={METADATA_KEY: config.to_json()})
    return Adapter(data=data, sha256=sha256_hex(data), config=config)


def read_header(data: bytes) -> tuple[dict[str, Any], AdapterConfig]:
    """The safetensors header (tensor name -> dtype, shape, offsets) and the adapter config.

    Checks the framing itself, so a truncated adapter is refused as truncated.
    """
    if len(data) < 8:
        raise AdapterRefused(
            f"truncated: {len(data)} bytes, not even a safetensors header size", "truncated"
        )
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise AdapterRefused(
            f"truncated: the header says {size} bytes, only {len(data) - 8} follow", "truncated"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise AdapterRefused(f"not a safetensors file: unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterRefused("not a safetensors file: the header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if METADATA_KEY not in metadata:
        raise AdapterRefused(
            f"not a memstream adapter: no {METADATA_KEY!r} in its metadata", "format"
        )
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise AdapterRefused(f"not a safetensors file: bad tensor entry ({exc})") from exc
    body = len(data) - 8 - size
    if body < end:
        raise AdapterRefused(
            f"truncated: the tensors need {end} bytes, only {body} are there", "truncated"
        )
    if body > end:
        raise AdapterRefused(f"{body - end} bytes after the last tensor")
    return header, AdapterConfig.from_json(metadata[METADATA_KEY])


def load_adapter(
    model: torch.nn.Module, data: bytes, sha256: str, base: BaseIdentity
) -> tuple[PeftModel, AdapterConfig]:
    """Apply the adapter ``data`` to a view of ``model`` (see the module doc) and return it.

    Refuses (:class:`AdapterRefused`) bytes whose sha256 is not ``sha256``, a truncated or
    malformed file, an adapter of another base model (id or weights hash), and tensors whose
    names or shapes do not fit the model. ``model`` itself is never modified.
    """
    actual = sha256_hex(data)
    if actual != sha256:
        mismatch = f"{len(data):,} bytes with sha256 {actual[:12]}..., expected {sha256[:12]}..."
        try:
            read_header(data)
        except AdapterRefused as exc:  # say *how* they differ when the framing shows it
            raise AdapterRefused(f"{exc.reason} ({mismatch})", exc.code) from None
        raise AdapterRefused(f"changed after it was written: {mismatch}", "corrupt")
    header, config = read_header(data)
    if config.base_model_id != base.model_id:
        raise AdapterRefused(
            f"trained on base model {config.base_model_id!r}, this model is {base.model_id!r}",
            "model_mismatch",
        )
    if config.base_weights_sha256 != base.weights_sha256:
        raise AdapterRefused(
            f"trained on weights {config.base_weights_sha256[:12]}... of {base.model_id!r}, "
            f"these are {base.weights_sha256[:12]}...",
            "weights_mismatch",
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterRefused(f"unreadable tensors: {exc}") from exc
    wrapped = _wrap(model, _lora_config(config.rank, config.alpha, config.target_modules), 0)
    expected = {n: tuple(t.shape) for n, t in get_peft_model_state_dict(wrapped).items()}
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise AdapterRefused(
            f"tensors do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}",
            "shape_mismatch",
        )
    wrong = [n for n in expected if expected[n] != got[n]]
    if wrong:
        raise AdapterRefused(
            f"tensor {wrong[0]} is {got[wrong[0]]}, the model needs {expected[wrong[0]]}",
            "shape_mismatch",
        )
    dtype = next(iter(get_peft_model_state_dict(wrapped).values())).dtype
    set_peft_model_state_dict(wrapped, {n: t.to(dtype) for n, t in tensors.items()})
    wrapped.eval()
    del header
    return wrapped, config


def adapter_hook(view: torch.nn.Module) -> Callable[[Any], AbstractContextManager[Any]]:
    """A :data:`processors.lm.AdapterHook` that runs ``view`` (from :func:`load_adapter`)
    instead of the base model: ``lm.generate(..., adapter=adapter_hook(view))``."""

    def hook(base: Any) -> AbstractContextManager[Any]:
        return contextlib.nullcontext(view)

    return hook

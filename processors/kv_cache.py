"""Activation memory: a prefix's KV cache as one verified safetensors blob.

A ``DynamicCache`` is written as a safetensors file, ``layers.<i>.keys`` / ``layers.<i>.values``
shaped (1, kv heads, tokens, head dim), with string metadata naming what it is valid for: the
model id and the sha256 of its weights (and of an adapter, if one was applied), the dtype, the
token count, the layer count and tensor shape, the plaintext memories it was computed from and
the sha256 of the prefix text. The bytes are deterministic (keys sorted, no timestamps), so the
same prefix on the same model is the same content-addressed object.

:func:`load` never unpickles (safetensors holds raw tensor bytes and a JSON header) and refuses,
with :class:`CacheRefused` and a distinct ``reason``, anything it cannot vouch for: a truncated
object, changed bytes (the content hash), a cache of another model or other weights (MemOS #2300:
a cache loaded silently into another model), a prefix other than the one asked for, tensors of
the wrong shape or dtype. A loaded cache is the caller's own; :meth:`processors.lm.LocalLM.generate`
continues a copy of it, so a cache is never mutated in place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

FORMAT = "memstream.kv-cache/1"
KIND = "kv"  # the blob kind in sinks.blobs: blobs/kv/<sha256>.safetensors
_MAX_HEADER = 16 << 20
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class CacheRefused(ValueError):
    """A stored KV cache that must not be used; ``reason`` says why, the message says what.

    Reasons: ``truncated``, ``corrupted`` (content hash mismatch), ``malformed`` (not a memstream
    KV cache), ``model_mismatch``, ``weights_mismatch``, ``adapter_mismatch``,
    ``prefix_mismatch``, ``dtype_mismatch``, ``shape_mismatch``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"KV cache refused ({reason}): {message}")
        self.reason = reason


class ModelIdentity(Protocol):
    """What a cache must match: :class:`processors.lm.LocalLM` is one."""

    model_id: str
    weights_sha256: str

    @property
    def dtype(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def kv_shape(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class KVMeta:
    """The metadata of a stored cache (read from the header alone, no tensors)."""

    model_id: str
    weights_sha256: str
    adapter_sha256: str
    dtype: str
    token_count: int
    layer_count: int
    kv_heads: int
    head_dim: int
    memory_ids: tuple[str, ...]
    prefix_sha256: str

    @property
    def bytes_per_token(self) -> int:
        width = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[self.dtype]
        return 2 * self.layer_count * self.kv_heads * self.head_dim * width


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def dump(
    cache: DynamicCache,
    *,
    model_id: str,
    weights_sha256: str,
    prefix_text: str,
    memory_ids: Sequence[str] = (),
    adapter_sha256: str = "",
) -> bytes:
    """The cache as safetensors bytes with its metadata; the same cache gives the same bytes."""

    layers = [(k, v) for k, v, *_ in cache]
    if not layers or layers[0][0] is None:
        raise ValueError("an empty cache")
    first = layers[0][0]
    batch, heads, tokens, dim = first.shape
    if batch != 1:
        raise ValueError(f"a cache of batch size {batch}: only single sequences are stored")
    dtype = str(first.dtype).removeprefix("torch.")
    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported cache dtype {dtype}")
    meta = {
        "format": FORMAT,
        "model_id": model_id,
        "weights_sha256": weights_sha256,
        "adapter_sha256": adapter_sha256,
        "dtype": dtype,
        "token_count": str(tokens),
        "layer_count": str(len(layers)),
        "kv_heads": str(heads),
        "head_dim": str(dim),
        "memory_ids": json.dumps(list(memory_ids)),
        "prefix_sha256": sha256_hex(prefix_text),
    }
    tensors: list[tuple[str, torch.Tensor]] = []
    for i, (k, v) in enumerate(layers):
        for name, t in ((f"layers.{i}.keys", k), (f"layers.{i}.values", v)):
            if tuple(t.shape) != (1, heads, tokens, dim) or t.dtype != first.dtype:
                raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}, unlike layer 0")
            tensors.append((name, t))
    return _encode(sorted(tensors), meta)


def _encode(tensors: list[tuple[str, torch.Tensor]], meta: dict[str, str]) -> bytes:
    """safetensors, written deterministically (the reference writer orders metadata by hash)."""
    import torch

    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    blobs, offset = [], 0
    for name, t in tensors:
        raw = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        dtype = _ST_DTYPES[str(t.dtype).removeprefix("torch.")]
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    text += b" " * (-len(text) % 8)  # tensor data 8-byte aligned, as safetensors pads
    return b"".join([len(text).to_bytes(8, "little"), text, *blobs])


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The parsed safetensors header and the object size it declares."""
    size = len(data)
    if size < 8:
        raise CacheRefused("truncated", f"the object is {size} bytes, shorter than a header")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER:
        raise CacheRefused("malformed", f"a header of {n} bytes: not a safetensors object")
    if size < 8 + n:
        raise CacheRefused(
            "truncated", f"the object is {size} bytes and ends inside its {n}-byte header"
        )
    try:
        header = json.loads(data[8 : 8 + n])
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CacheRefused("malformed", f"unreadable safetensors header ({exc})") from exc
    return header, 8 + n + max(ends, default=0)


def read_meta(data: bytes) -> KVMeta:
    """The metadata of a cache object (no hash check, no tensors loaded)."""
    header, _ = _header(data)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CacheRefused("malformed", f"not a memstream KV cache (format {meta.get('format')!r})")
    try:
        return KVMeta(
            model_id=meta["model_id"],
            weights_sha256=meta["weights_sha256"],
            adapter_sha256=meta.get("adapter_sha256", ""),
            dtype=meta["dtype"],
            token_count=int(meta["token_count"]),
            layer_count=int(meta["layer_count"]),
            kv_heads=int(meta["kv_heads"]),
            head_dim=int(meta["head_dim"]),
            memory_ids=tuple(json.loads(meta["memory_ids"])),
            prefix_sha256=meta["prefix_sha256"],
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CacheRefused("malformed", f"incomplete metadata ({exc})") from exc


def load(
    data: bytes,
    expected_sha256: str,
    model_id: str,
    weights_sha256: str,
    *,
    adapter_sha256: str = "",
    prefix_text: str | None = None,
    dtype: str | None = None,
    layers: int | None = None,
    kv_shape: tuple[int, int] | None = None,
) -> DynamicCache:
    """Verify a stored cache and rebuild its ``DynamicCache``, or raise :class:`CacheRefused`.

    Checked in order: the size its header declares (``truncated``), the sha256 of the bytes
    against ``expected_sha256`` (the one in the op and the object key: ``corrupted``), the
    metadata's model id, weights and adapter hashes (``*_mismatch``), the prefix text's hash if
    ``prefix_text`` is given, then dtype, layer count and every tensor's shape against the
    metadata and against ``dtype`` / ``layers`` / ``kv_shape`` (heads, head dim) when given.
    """
    actual = sha256_hex(data)
    if actual != expected_sha256:
        try:
            _, declared = _header(data)
        except CacheRefused as exc:
            if exc.reason == "truncated":
                raise
            declared = len(data)
        if declared > len(data):
            raise CacheRefused(
                "truncated", f"the object is {len(data):,} bytes, its header declares {declared:,}"
            )
        raise CacheRefused(
            "corrupted",
            f"content sha256 {actual[:16]}... is not the expected {expected_sha256[:16]}... "
            f"({len(data):,} bytes): the object was changed after it was written",
        )
    meta = read_meta(data)
    if meta.model_id != model_id:
        raise CacheRefused(
            "model_mismatch",
            f"the cache was computed by model {meta.model_id!r}, not {model_id!r}: a KV cache "
            "only fits the model that computed it",
        )
    if meta.weights_sha256 != weights_sha256:
        raise CacheRefused(
            "weights_mismatch",
            f"the cache was computed with weights {meta.weights_sha256[:16]}..., this model's "
            f"are {weights_sha256[:16]}... (same name, other weights)",
        )
    if meta.adapter_sha256 != adapter_sha256:
        raise CacheRefused(
            "adapter_mismatch",
            f"the cache was computed with adapter {meta.adapter_sha256[:16] or 'none'}, "
            f"wanted {adapter_sha256[:16] or 'none'}",
        )
    if prefix_text is not None and meta.prefix_sha256 != sha256_hex(prefix_text):
        raise CacheRefused("prefix_mismatch", "the cache was computed from another prefix text")
    if dtype is not None and meta.dtype != dtype:
        raise CacheRefused("dtype_mismatch", f"the cache is {meta.dtype}, the model {dtype}")
    if layers is not None and meta.layer_count != layers:
        raise CacheRefused(
            "shape_mismatch", f"the cache has {meta.layer_count} layers, the model {layers}"
        )
    if kv_shape is not None and (meta.kv_heads, meta.head_dim) != tuple(kv_shape):
        raise CacheRefused(
            "shape_mismatch",
            f"the cache has {meta.kv_heads} kv heads of {meta.head_dim}, the model "
            f"{kv_shape[0]} of {kv_shape[1]}",
        )
    return _tensors_to_cache(data, meta)


def _tensors_to_cache(data: bytes, meta: KVMeta) -> DynamicCache:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    from transformers import DynamicCache

    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CacheRefused("malformed", f"safetensors refused the object ({exc})") from exc
    want = (1, meta.kv_heads, meta.token_count, meta.head_dim)
    names = {f"layers.{i}.{kv}" for i in range(meta.layer_count) for kv in ("keys", "values")}
    if set(tensors) != names:
        raise CacheRefused(
            "shape_mismatch", f"{len(tensors)} tensors, the metadata says {len(names)}"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != want or str(t.dtype).removeprefix("torch.") != meta.dtype:
            raise CacheRefused(
                "shape_mismatch",
                f"{name} is {tuple(t.shape)} {t.dtype}, the metadata says {want} {meta.dtype}",
            )
    layers = [
        (tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"])
        for i in range(meta.layer_count)
    ]
    return DynamicCache(layers)


def dump_for(
    lm: ModelIdentity,
    cache: DynamicCache,
    prefix_text: str,
    memory_ids: Sequence[str] = (),
    adapter_sha256: str = "",
) -> bytes:
    """:func:`dump` with ``lm``'s identity."""
    return dump(cache, model_id=lm.model_id, weights_sha256=lm.weights_sha256,
                prefix_text=prefix_text, memory_ids=memory_ids,
                adapter_sha256=adapter_sha256)  # fmt: skip


def load_for(
    lm: ModelIdentity,
    data: bytes,
    expected_sha256: str,
    *,
    prefix_text: str | None = None,
    adapter_sha256: str = "",
) -> DynamicCache:
    """:func:`load` checked against everything ``lm`` is: id, weights, dtype, layers, shape."""
    return load(data, expected_sha256, lm.model_id, lm.weights_sha256,
                adapter_sha256=adapter_sha256, prefix_text=prefix_text, dtype=lm.dtype,
                layers=lm.num_layers, kv_shape=lm.kv_shape)  # fmt: skip

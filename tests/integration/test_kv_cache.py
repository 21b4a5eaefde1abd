"""Activation memory for real: SmolLM2's KV cache of a memory prefix, stored in MinIO and reused.

The model is the real SmolLM2-135M-Instruct (converted once per machine, loaded once per test
session); the prefixes are short so the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import TYPE_CHECKING

import pytest
import torch

from processors.kv_cache import CacheRefused, dump, dump_for, read_meta, sha256_hex
from processors.lm import WEIGHTS_FILE, LocalLM, load_lm, sha256_file
from sinks.blobs import BlobCorrupted, BlobStore, parse_uri
from streams.settings import Settings

if TYPE_CHECKING:
    from transformers import DynamicCache

pytestmark = pytest.mark.integration

MEMORIES = [
    "Caroline said: I went to the LGBTQ support group yesterday (7 May 2023).",
    "Melanie said: I painted a sunrise over the lake last week.",
    "Caroline said: I am researching adoption agencies.",
]
QUESTION = [{"role": "user", "content": "What is Caroline researching?"}]


@pytest.fixture(scope="session")
def lm(base_settings: Settings) -> LocalLM:
    """The real local LM, loaded once per process (``load_lm`` caches it)."""
    return load_lm(base_settings.effective_lm_dir, base_settings.lm_model,
                   threads=base_settings.lm_threads or None)  # fmt: skip


@pytest.fixture(scope="session")
def blobs(settings: Settings) -> BlobStore:
    return BlobStore.from_settings(settings)


@pytest.fixture(scope="session")
def prefilled(lm: LocalLM) -> tuple[str, str, DynamicCache, int]:
    """(memory prefix, continuation, the prefix's cache, its tokens): one prefill per session.
    The prefix is unique to the run, so its blobs are the run's own."""
    context = "\n".join([*MEMORIES, f"(session {uuid.uuid4().hex[:8]})"])
    prefix, continuation = lm.chat_parts(QUESTION, context=context)
    cache, n_tokens = lm.prefill(prefix)
    return prefix, continuation, cache, n_tokens


def _own_blob(lm: LocalLM, blobs: BlobStore, prefilled: tuple) -> tuple[str, str, int]:
    """The session's cache stored as an object of the calling test's own (a unique memory id
    makes other bytes, so another key)."""
    prefix, _, cache, _ = prefilled
    return blobs.put_kv_cache(lm, cache, prefix, memory_ids=[uuid.uuid4().hex])


def _overwrite(blobs: BlobStore, uri: str, data: bytes) -> None:
    """Replace a stored object's bytes behind the store's back (what a bad disk or a bad
    writer would do)."""
    bucket, key, _ = parse_uri(uri)
    blobs.client.put_object(bucket, key, io.BytesIO(data), len(data))


def test_the_model_is_identified_by_its_name_and_weights(lm: LocalLM) -> None:
    assert lm.model_id == "SmolLM2-135M-Instruct"
    assert lm.weights_sha256 == sha256_file(lm.path / WEIGHTS_FILE)
    assert (lm.dtype, lm.num_layers, lm.kv_shape) == ("float32", 30, (3, 64))
    assert torch.get_num_threads() <= len(os.sched_getaffinity(0))  # the cores we may use


def test_a_stored_cache_gives_the_logits_of_recomputing_the_prefix(
    lm: LocalLM, blobs: BlobStore, prefilled: tuple
) -> None:
    prefix, continuation, cache, n_tokens = prefilled
    assert n_tokens == len(lm.encode(prefix)) == cache.get_seq_length()
    uri, sha256, size = blobs.put_kv_cache(lm, cache, prefix, memory_ids=["m1", "m2", "m3"])
    assert uri == f"s3://{blobs.bucket}/blobs/kv/{sha256}.safetensors"
    assert blobs.put_kv_cache(lm, cache, prefix, memory_ids=["m1", "m2", "m3"])[:2] == (uri, sha256)

    data = blobs.get(uri, sha256)
    meta = read_meta(data)
    assert (meta.model_id, meta.weights_sha256, meta.token_count, meta.layer_count) == (
        lm.model_id, lm.weights_sha256, n_tokens, 30)  # fmt: skip
    assert meta.memory_ids == ("m1", "m2", "m3")
    assert meta.prefix_sha256 == sha256_hex(prefix)
    assert 0 < size - n_tokens * meta.bytes_per_token < 16_384  # the tensors and a small header

    loaded = blobs.get_kv_cache(lm, uri, sha256, prefix_text=prefix)
    ids = lm.encode(prefix) + lm.encode(continuation)
    recomputed = lm.next_token_logits(ids)
    reused = lm.next_token_logits(continuation, prefix_cache=loaded)
    assert torch.allclose(reused, recomputed, atol=1e-4, rtol=1e-4), float(
        (reused - recomputed).abs().max()
    )
    assert int(reused.argmax()) == int(recomputed.argmax())

    with_cache = [t.id for t in lm.generate(continuation, prefix_cache=loaded, max_new_tokens=3)]
    from_scratch = [t.id for t in lm.generate(ids, max_new_tokens=3)]
    assert with_cache == from_scratch and len(with_cache) == 3


def test_a_cache_is_not_changed_by_the_generations_that_use_it(
    lm: LocalLM, blobs: BlobStore, prefilled: tuple
) -> None:
    prefix, continuation, _, n_tokens = prefilled
    uri, sha256, _ = _own_blob(lm, blobs, prefilled)
    loaded = blobs.get_kv_cache(lm, uri, sha256)
    before = dump_for(lm, loaded, prefix, read_meta(blobs.get(uri, sha256)).memory_ids)
    first = lm.complete(continuation, prefix_cache=loaded, max_new_tokens=2)
    second = lm.complete(QUESTION, prefix_cache=loaded, max_new_tokens=2)  # messages, rendered
    assert first == second and first
    assert loaded.get_seq_length() == n_tokens
    after = dump_for(lm, loaded, prefix, read_meta(before).memory_ids)
    assert after == before  # the in-memory cache: the same tensors
    assert sha256_hex(after) == sha256  # the same bytes as the stored object
    assert blobs.get(uri, sha256) == after


def test_a_changed_byte_is_refused(lm: LocalLM, blobs: BlobStore, prefilled: tuple) -> None:
    uri, sha256, size = _own_blob(lm, blobs, prefilled)
    data = bytearray(blobs.get(uri, sha256))
    data[size - 100] ^= 0x01  # one bit of one value of the last layer
    _overwrite(blobs, uri, bytes(data))
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256)
    assert refused.value.reason == "corrupted"
    assert "changed after it was written" in str(refused.value)
    with pytest.raises(BlobCorrupted):
        blobs.get(uri, sha256)
    good = dump_for(lm, prefilled[2], prefilled[0], read_meta(bytes(data)).memory_ids)
    assert blobs.put("kv", good) == (uri, sha256)  # same size: left alone, still bad
    with pytest.raises(BlobCorrupted):
        blobs.get(uri, sha256)
    blobs.put("kv", good, replace=True)  # the repair
    assert blobs.get(uri, sha256) == good


def test_a_truncated_object_is_refused(lm: LocalLM, blobs: BlobStore, prefilled: tuple) -> None:
    uri, sha256, size = _own_blob(lm, blobs, prefilled)
    _overwrite(blobs, uri, blobs.get(uri, sha256)[: size // 2])
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256)
    assert refused.value.reason == "truncated"
    assert f"its header declares {size:,}" in str(refused.value)
    _overwrite(blobs, uri, b"\x10\x00")  # cut inside the 8-byte header length itself
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256)
    assert refused.value.reason == "truncated"


def test_a_cache_of_another_model_is_refused(
    lm: LocalLM, blobs: BlobStore, prefilled: tuple
) -> None:
    prefix, _, cache, _ = prefilled
    other = dump(cache, model_id="SmolLM2-360M-Instruct", weights_sha256=lm.weights_sha256,
                 prefix_text=prefix)  # fmt: skip
    uri, sha256 = blobs.put("kv", other)
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256)
    assert refused.value.reason == "model_mismatch"
    assert "'SmolLM2-360M-Instruct'" in str(refused.value)

    retrained = dump(cache, model_id=lm.model_id, weights_sha256="0" * 64, prefix_text=prefix)
    uri, sha256 = blobs.put("kv", retrained)
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256)
    assert refused.value.reason == "weights_mismatch"

    uri, sha256, _ = _own_blob(lm, blobs, prefilled)
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256, prefix_text=prefix + " ")
    assert refused.value.reason == "prefix_mismatch"
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256, adapter_sha256="a" * 64)
    assert refused.value.reason == "adapter_mismatch"


def test_tensors_that_do_not_fit_the_model_are_refused(lm: LocalLM, blobs: BlobStore) -> None:
    """A well-formed cache of a model with other shapes (2 layers of 4 heads x 32) under this
    model's name: the shapes are checked against the model, not only against the metadata."""
    from transformers import DynamicCache

    odd = DynamicCache([(torch.randn(1, 4, 5, 32), torch.randn(1, 4, 5, 32)) for _ in range(2)])
    data = dump(odd, model_id=lm.model_id, weights_sha256=lm.weights_sha256,
                prefix_text=uuid.uuid4().hex)  # fmt: skip
    assert read_meta(data).layer_count == 2
    uri, sha256 = blobs.put("kv", data)
    with pytest.raises(CacheRefused) as refused:
        blobs.get_kv_cache(lm, uri, sha256)
    assert refused.value.reason == "shape_mismatch"
    assert "2 layers" in str(refused.value)


def test_the_bytes_are_deterministic_safetensors(lm: LocalLM, prefilled: tuple) -> None:
    from safetensors.torch import load as st_load

    prefix, _, cache, n_tokens = prefilled
    first, second = dump_for(lm, cache, prefix), dump_for(lm, lm.fork(cache), prefix)
    assert first == second  # the same cache, the same object key
    tensors = st_load(first)  # the reference reader accepts it
    assert len(tensors) == 60 and tensors["layers.0.keys"].shape == (1, 3, n_tokens, 64)
    assert torch.equal(tensors["layers.29.values"], cache.layers[29].values)
    header = json.loads(first[8 : 8 + int.from_bytes(first[:8], "little")])
    assert header["__metadata__"]["format"] == "memstream.kv-cache/1"

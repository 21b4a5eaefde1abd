"""Chat with memory: retrieve a cube's memories, reuse its KV cache and adapter, generate, and
publish the turn back as interactions of the cube.

One turn (:meth:`ChatService.chat`):

1. **Retrieve**: the cube's top-k plaintext memories for the last user message (the
   :class:`~streams.query.search.Searcher`, the same hybrid search as the API's), logged as a
   QueryEvent with actor ``chat`` so chat use heats memories like any search.
2. **Memory context** (:class:`MemoryContext`): the cube's current adapter (its newest active
   PARAMETER memory, loaded from MinIO and verified by :mod:`processors.lora`) and its memory
   prefix: the texts of its current ACTIVATION memory's ``memory_ids`` with that memory's stored
   KV cache (verified by :mod:`processors.kv_cache` against the model, the adapter and the prefix
   text), or, when the cube has none (or it is refused), the cube's activated memories prefilled
   here. A cache refused on load is never used; the prefix is recomputed and the reason is in
   the answer's ``prefix.detail``.
3. **Prompt** (:func:`processors.prompt.build_prompt`): prefix, the retrieved memories that are
   not in it, the conversation, in the model's chat template.
4. **Generate**, streamed, continuing a copy of the prefix cache (the stored cache is never
   changed). The LM (:func:`processors.lm.load_lm`) is loaded on the first chat, in the
   generation thread; one generation runs at a time (one worker thread), others wait their turn.
5. **Publish** the user message and the answer as interactions of the cube (actor ``chat``), so
   the conversation becomes memory like any other.

With ``MEMSTREAM_LLM_BASE_URL`` set, steps 2-4 are replaced by a call to that OpenAI-compatible
endpoint (the ``openai`` client) with every memory (the prefix's and the retrieved) injected as a
system message; retrieval and publishing are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from processors.commands import current_memory
from processors.fold import Memory
from processors.kv_cache import sha256_hex
from processors.prompt import SYSTEM, build_prompt, injected_messages, memory_prefix, normalize
from processors.prompt import prefix_memories as activated_prefix
from streams.pipeline.roles import Runtime
from streams.pipeline.views import ViewsProcessor
from streams.query.search import Result, Searcher
from streams.runtime.foreground import Foreground
from streams.settings import Settings
from streams.transport.events import Interaction, utcnow
from streams.transport.producer import EventProducer
from streams.transport.topics import QUERIES, partition_for

if TYPE_CHECKING:
    from transformers import DynamicCache

    from processors.lm import AdapterHook, LocalLM
    from sinks.blobs import BlobStore

log = logging.getLogger("memstream.chat")
ACTOR = "chat"
NAMESPACE = uuid.UUID("6d656d73-7472-6561-6d2d-636861740000")
PROCESS_CACHE_ENTRIES = 8  # computed prefix caches kept per process (LRU)


class ChatError(ValueError):
    """A request that cannot be answered as asked (a 4xx): ``status`` and a message."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# -- the memory context: the cube's adapter and memory prefix ------------------------------------


@dataclass
class AdapterUse:
    """The cube's current adapter: the hook to run it (None when it was refused)."""

    memory_id: str
    sha256: str
    hook: AdapterHook | None
    detail: str = ""

    def describe(self) -> dict[str, Any]:
        return {"memory_id": self.memory_id, "sha256": self.sha256,
                "applied": self.hook is not None, "detail": self.detail}  # fmt: skip


@dataclass
class Prefix:
    """The memory prefix of a turn and its KV cache (where it came from in ``source``)."""

    memory_ids: tuple[str, ...]
    texts: tuple[str, ...]
    text: str
    cache: DynamicCache
    tokens: int
    source: str  # activation-memory | computed | process-cache
    activation_memory_id: str | None = None
    detail: str = ""
    load_ms: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "tokens": self.tokens, "memory_ids": list(self.memory_ids),
                "activation_memory_id": self.activation_memory_id, "detail": self.detail,
                "load_ms": round(self.load_ms, 2)}  # fmt: skip


class MemoryContext(Protocol):
    """Where chat finds a cube's activation and parameter memory."""

    def prefix_texts(self, cube_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(memory ids, texts) of the cube's memory prefix, without a model (proxy mode)."""
        ...

    def adapter(self, cube_id: str, lm: LocalLM) -> AdapterUse | None: ...

    def prefix(self, cube_id: str, lm: LocalLM, adapter: AdapterUse | None) -> Prefix: ...


class FoldMemoryContext:
    """The memory context from the views processor's fold of the cube's partition: the current
    ACTIVATION / PARAMETER memory is the newest active one of that type
    (:func:`processors.commands.current_memory`); tensors come from MinIO, verified, and loaded
    ones are kept in process by their sha256 (content-addressed: the same hash is the same
    tensors)."""

    def __init__(self, runtime: Runtime, blobs: Callable[[], BlobStore] | None = None) -> None:
        self.runtime = runtime
        self._blobs_factory = blobs
        self._blobs: BlobStore | None = None
        self._adapters: dict[str, AdapterUse] = {}
        self._caches: OrderedDict[tuple[str, str], tuple[DynamicCache, int]] = OrderedDict()
        self._lock = threading.Lock()

    def blobs(self) -> BlobStore:
        if self._blobs is None:
            if self._blobs_factory is not None:
                self._blobs = self._blobs_factory()
            else:
                from sinks.blobs import BlobStore

                self._blobs = BlobStore.from_settings(self.runtime.settings)
        return self._blobs

    def memories(self, cube_id: str) -> list[Memory]:
        """The cube's folded memories (any type, any status); empty where this worker does not
        own the cube's partition."""
        views = self.runtime.host.get("views")
        if not isinstance(views, ViewsProcessor):
            return []
        table = views.folds.get(partition_for(cube_id, self.runtime.settings.partitions))
        if table is None:
            return []
        for _ in range(5):  # the views thread may add a memory while we copy
            with contextlib.suppress(RuntimeError):
                return [m for m in list(table.memories.values()) if m.cube_id == cube_id]
        return []

    def cubes(self) -> list[str]:
        """Cubes this worker folds (for ``GET /v1/models``)."""
        views = self.runtime.host.get("views")
        if not isinstance(views, ViewsProcessor):
            return []
        found: set[str] = set()
        for table in list(views.folds.values()):
            with contextlib.suppress(RuntimeError):
                found.update(m.cube_id for m in list(table.memories.values()))
        return sorted(found)

    def _activation(self, cube_id: str) -> tuple[Memory | None, dict[str, Memory]]:
        memories = self.memories(cube_id)
        by_id = {m.memory_id: m for m in memories}
        return current_memory(memories, cube_id, "ACTIVATION"), by_id

    def prefix_texts(self, cube_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        activation, by_id = self._activation(cube_id)
        if activation is not None:
            ids = tuple(activation.payload.get("memory_ids") or ())
            if all(i in by_id for i in ids):
                return ids, tuple(by_id[i].text for i in ids)
        chosen = activated_prefix(by_id.values(), cube_id)
        return tuple(m.memory_id for m in chosen), tuple(m.text for m in chosen)

    def adapter(self, cube_id: str, lm: LocalLM) -> AdapterUse | None:
        memory = current_memory(self.memories(cube_id), cube_id, "PARAMETER")
        if memory is None:
            return None
        sha = str(memory.payload.get("sha256", ""))
        with self._lock:
            known = self._adapters.get(sha)
        if known is not None:
            return AdapterUse(memory.memory_id, sha, known.hook, known.detail)
        try:
            from processors.lora import AdapterRefused, adapter_hook
            from streams.pipeline.parameter import fetch_adapter
        except ImportError as exc:  # the ml extra is not installed
            return AdapterUse(memory.memory_id, sha, None, f"not applied: {exc}")
        try:
            view, _ = fetch_adapter(self.blobs(), memory.payload, lm)
            use = AdapterUse(memory.memory_id, sha, adapter_hook(view), "applied")
        except (AdapterRefused, KeyError, ValueError) as exc:
            log.warning("adapter %s of cube %s refused: %s", memory.memory_id, cube_id, exc)
            use = AdapterUse(memory.memory_id, sha, None, f"refused: {exc}")
        with self._lock:
            self._adapters[sha] = use
        return use

    def prefix(self, cube_id: str, lm: LocalLM, adapter: AdapterUse | None) -> Prefix:
        hook = adapter.hook if adapter else None
        adapter_sha = adapter.sha256 if adapter and hook else ""
        activation, by_id = self._activation(cube_id)
        detail = ""
        if activation is not None:
            loaded = self._stored(activation, by_id, lm, adapter_sha)
            if isinstance(loaded, Prefix):
                return loaded
            detail = loaded
        chosen = activated_prefix(by_id.values(), cube_id)
        ids, texts = tuple(m.memory_id for m in chosen), tuple(m.text for m in chosen)
        text = memory_prefix(lm, texts)
        key = (sha256_hex(text), adapter_sha)
        started = time.perf_counter()
        with self._lock:
            hit = self._caches.get(key)
            if hit is not None:
                self._caches.move_to_end(key)
        if hit is not None:
            cache, tokens = hit
            source = "process-cache"
        else:
            cache, tokens = lm.prefill(text, adapter=hook)
            source = "computed"
            with self._lock:
                self._caches[key] = (cache, tokens)
                while len(self._caches) > PROCESS_CACHE_ENTRIES:
                    self._caches.popitem(last=False)
        return Prefix(ids, texts, text, cache, tokens, source, None, detail,
                      (time.perf_counter() - started) * 1e3)  # fmt: skip

    def _stored(
        self, activation: Memory, by_id: dict[str, Memory], lm: LocalLM, adapter_sha: str
    ) -> Prefix | str:
        """The ACTIVATION memory's stored cache, verified; or why it is not used."""
        from processors.kv_cache import CacheRefused
        from sinks.blobs import BlobCorrupted, BlobMissing

        payload = activation.payload
        ids = tuple(payload.get("memory_ids") or ())
        missing = [i for i in ids if i not in by_id]
        if missing:
            return f"activation memory {activation.memory_id} names unknown memories {missing[:3]}"
        if payload.get("model_id") != lm.model_id:
            return (f"activation memory {activation.memory_id} is a cache of model "
                    f"{payload.get('model_id')!r}, not {lm.model_id!r}")  # fmt: skip
        if payload.get("weights_sha256", "") not in ("", lm.weights_sha256):
            theirs, ours = payload["weights_sha256"][:12], lm.weights_sha256[:12]
            return (f"activation memory {activation.memory_id} was computed by other weights "
                    f"({theirs}), not {ours}")  # fmt: skip
        texts = tuple(by_id[i].text for i in ids)
        text = memory_prefix(lm, texts)
        sha = str(payload.get("sha256", ""))
        key = (sha, adapter_sha)
        started = time.perf_counter()
        with self._lock:
            hit = self._caches.get(key)
        if hit is not None:
            cache, tokens = hit
        else:
            try:
                cache = self.blobs().get_kv_cache(lm, payload["uri"], sha, prefix_text=text,
                                                  adapter_sha256=adapter_sha)  # fmt: skip
            except (CacheRefused, BlobMissing, BlobCorrupted, KeyError, ValueError) as exc:
                log.warning("KV cache of %s refused: %s", activation.memory_id, exc)
                builder = self.runtime.host.get("activation")  # ActivationProcessor, if it runs
                if builder is not None and hasattr(builder, "repair"):
                    builder.repair(activation.cube_id)  # it checks the object and rebuilds it
                return f"stored cache of {activation.memory_id} not used: {exc}"
            tokens = cache.get_seq_length()
            with self._lock:
                self._caches[key] = (cache, tokens)
                while len(self._caches) > PROCESS_CACHE_ENTRIES:
                    self._caches.popitem(last=False)
        return Prefix(ids, texts, text, cache, tokens, "activation-memory", activation.memory_id,
                      "reused" if hit is None else "reused (kept in process)",
                      (time.perf_counter() - started) * 1e3)  # fmt: skip


# -- a chat turn -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    cube_id: str
    messages: tuple[Mapping[str, str], ...]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 5
    session_id: str = "chat"
    user: str = "user"
    publish: bool = True
    debug: bool = False


@dataclass
class ChatResult:
    """Everything about a finished turn (the final SSE event, the JSON answer)."""

    chat_id: str
    cube_id: str
    model: str
    answer: str = ""
    finish_reason: str = "stop"
    retrieved: list[dict[str, Any]] = field(default_factory=list)
    prefix: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    memories: list[str] = field(default_factory=list)
    prompt: str | None = None

    @property
    def memory_ids(self) -> list[str]:
        """Every memory in the prompt: the prefix's, then the retrieved ones not in it."""
        prefix = list(self.prefix.get("memory_ids", []))
        return prefix + [r["memory_id"] for r in self.retrieved if r["memory_id"] not in prefix]

    def as_dict(self) -> dict[str, Any]:
        body = {
            "chat_id": self.chat_id, "cube_id": self.cube_id, "model": self.model,
            "answer": self.answer, "finish_reason": self.finish_reason,
            "memory_ids": self.memory_ids, "memories": self.memories,
            "retrieved": self.retrieved, "prefix": self.prefix, "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "published": self.published,
        }  # fmt: skip
        if self.prompt is not None:
            body["prompt"] = self.prompt
        return body


@dataclass
class Turn:
    """A checked request with its retrieved memories, ready to generate."""

    request: ChatRequest
    result: ChatResult
    found: list[Result]
    started: float


@dataclass(frozen=True)
class Piece:
    """A streamed piece of the answer."""

    text: str


class ChatService:
    """Chat turns of one process: the LM loaded once, one generation at a time."""

    def __init__(
        self,
        settings: Settings,
        searcher: Callable[[], Searcher],
        producer: EventProducer,
        context: MemoryContext,
        lm_loader: Callable[[], LocalLM] | None = None,
        foreground: Foreground | None = None,
    ) -> None:
        self.settings = settings
        self.searcher = searcher
        #: Touched while a turn runs: background LM work (KV-cache builds) waits for a pause.
        self.foreground = foreground or Foreground()
        self.producer = producer
        self.context = context
        self._lm_loader = lm_loader or self._default_loader
        self._lm: LocalLM | None = None
        self._lm_state = "not loaded"
        self._lm_error: str | None = None
        self._lm_load_s: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memstream-chat")
        self._remote: Any = None
        self.counters = {"turns": 0, "tokens": 0, "failed": 0, "waiting": 0, "running": 0}

    @property
    def proxy(self) -> bool:
        return bool(self.settings.llm_base_url)

    @property
    def model_name(self) -> str:
        if self.proxy:
            return self.settings.llm_model
        return self._lm.model_id if self._lm else self.settings.lm_model

    def _default_loader(self) -> LocalLM:
        from processors.lm import load_lm

        s = self.settings
        return load_lm(s.effective_lm_dir, s.lm_model, threads=s.lm_threads or None)

    def lm(self) -> LocalLM:
        """The local LM, loaded on first use (seconds; in the generation thread)."""
        if self._lm is None:
            self._lm_state = "loading"
            started = time.perf_counter()
            try:
                self._lm = self._lm_loader()
            except Exception as exc:
                self._lm_state, self._lm_error = "failed", f"{type(exc).__name__}: {exc}"
                raise
            self._lm_load_s = time.perf_counter() - started
            self._lm_state = "loaded"
        return self._lm

    def stats(self) -> dict[str, Any]:
        lm = self._lm
        state = {
            "state": self._lm_state,
            "model_id": lm.model_id if lm else None,
            "weights_sha256": lm.weights_sha256 if lm else None,
            "load_s": round(self._lm_load_s, 2) if self._lm_load_s else None,
            "error": self._lm_error,
        }
        mode = "proxy" if self.proxy else "local"
        return {"mode": mode, "model": self.model_name, "lm": state, **self.counters}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- retrieval -------------------------------------------------------------------------------

    def retrieve(self, request: ChatRequest) -> tuple[list[Result], float]:
        """The cube's top-k for the last user message; logs the QueryEvent (actor chat)."""
        query = request.messages[-1]["content"]
        started = time.perf_counter()
        results = self.searcher().search(request.cube_id, query, request.top_k)
        latency = (time.perf_counter() - started) * 1e3
        self.producer.publish_nowait(
            self.settings.topic(QUERIES.name),
            request.cube_id,
            QUERIES.record,
            {
                "event_id": str(uuid.uuid4()),
                "cube_id": request.cube_id,
                "actor": ACTOR,
                "query": query,
                "top_k": request.top_k,
                "event_time": utcnow(),
                "results": [{"memory_id": r.memory_id, "score": r.score} for r in results],
                "latency_ms": latency,
            },
        )
        return results, latency

    # -- a turn ----------------------------------------------------------------------------------

    async def prepare(self, request: ChatRequest) -> Turn:
        """Check the request and retrieve its memories; raises :class:`ChatError` for a request
        that cannot be answered (before anything is streamed)."""
        try:
            messages = tuple(normalize(request.messages))
        except ValueError as exc:
            raise ChatError(str(exc)) from exc
        request = replace(request, messages=messages)
        started = time.perf_counter()
        self.foreground.touch()
        result = ChatResult(f"chatcmpl-{uuid.uuid4().hex[:24]}", request.cube_id, self.model_name)
        found, retrieve_ms = await asyncio.to_thread(self.retrieve, request)
        result.timings_ms["retrieve_ms"] = retrieve_ms
        result.retrieved = [{"memory_id": r.memory_id, "text": r.text, "score": r.score}
                            for r in found]  # fmt: skip
        return Turn(request, result, found, started)

    async def stream(self, turn: Turn) -> AsyncIterator[Piece | ChatResult]:
        """The turn's answer, piece by piece, then its :class:`ChatResult` once it is published
        back to the cube."""
        request, result = turn.request, turn.result
        source = self._remote_turn if self.proxy else self._local_turn
        try:
            async for piece in source(request, result, turn.found):
                self.foreground.touch()
                yield piece
        except Exception:
            self.counters["failed"] += 1
            raise
        if request.publish:
            result.published = await asyncio.to_thread(self._publish, request, result)
        result.timings_ms["total_ms"] = (time.perf_counter() - turn.started) * 1e3
        self.counters["turns"] += 1
        self.counters["tokens"] += result.completion_tokens
        yield result

    async def chat(self, request: ChatRequest) -> AsyncIterator[Piece | ChatResult]:
        """:meth:`prepare` then :meth:`stream`."""
        turn = await self.prepare(request)
        async for item in self.stream(turn):
            yield item

    async def complete(self, request: ChatRequest) -> ChatResult:
        """The whole turn at once."""
        async for item in self.chat(request):
            if isinstance(item, ChatResult):
                return item
        raise RuntimeError("the turn ended without a result")

    async def _local_turn(
        self, request: ChatRequest, result: ChatResult, found: list[Result]
    ) -> AsyncIterator[Piece]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()
        queued_at = time.perf_counter()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def run() -> None:
            self.counters["waiting"] -= 1
            self.counters["running"] += 1
            try:
                result.timings_ms["queue_ms"] = (time.perf_counter() - queued_at) * 1e3
                self._generate(request, result, found, emit, cancelled)
                emit("end", None)
            except Exception as exc:
                emit("error", exc)
            finally:
                self.counters["running"] -= 1

        self.counters["waiting"] += 1
        future = self._executor.submit(run)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield Piece(value)
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            cancelled.set()  # a client that went away stops the generation at its next token
            if future.cancel():
                self.counters["waiting"] -= 1

    def _generate(
        self,
        request: ChatRequest,
        result: ChatResult,
        found: list[Result],
        emit: Callable[[str, Any], None],
        cancelled: threading.Event,
    ) -> None:
        """In the generation thread: the LM, the memory context, the prompt, the tokens."""
        t0 = time.perf_counter()
        lm = self.lm()
        result.model = lm.model_id
        t1 = time.perf_counter()
        adapter = self.context.adapter(request.cube_id, lm)
        prefix = self.context.prefix(request.cube_id, lm, adapter)
        t2 = time.perf_counter()
        in_prefix = set(prefix.memory_ids)
        retrieved = [r for r in found if r.memory_id not in in_prefix]
        prompt = build_prompt(lm, prefix.texts, [r.text for r in retrieved], request.messages)
        if prompt.prefix != prefix.text:
            raise RuntimeError("the prompt's prefix is not the cached prefix")
        continuation = lm.encode(prompt.continuation)
        result.prefix = prefix.describe()
        result.adapter = adapter.describe() if adapter else None
        result.memories = [*prefix.texts, *(r.text for r in retrieved)]
        result.prompt_tokens = prefix.tokens + len(continuation)
        if request.debug:
            result.prompt = prompt.text
        result.timings_ms.update(lm_load_ms=(t1 - t0) * 1e3, context_ms=(t2 - t1) * 1e3)
        stop = (*request.stop, "<|im_end|>")
        first: float | None = None
        pieces: list[str] = []
        for token in lm.generate(continuation, prefix_cache=prefix.cache,
                                 max_new_tokens=request.max_new_tokens,
                                 temperature=request.temperature, top_p=request.top_p,
                                 seed=request.seed, adapter=adapter.hook if adapter else None,
                                 stop=stop):  # fmt: skip
            if first is None:
                first = time.perf_counter()
                result.timings_ms["ttft_ms"] = (first - t0) * 1e3
            pieces.append(token.text)
            result.completion_tokens += 1
            emit("piece", token.text)
            if cancelled.is_set():
                break
        result.timings_ms["generate_ms"] = (time.perf_counter() - t2) * 1e3
        answer = "".join(pieces)
        for s in stop:
            if s in answer:
                answer = answer[: answer.index(s)]
        result.answer = answer.strip()
        full = result.completion_tokens >= request.max_new_tokens
        result.finish_reason = "length" if full else "stop"

    async def _remote_turn(
        self, request: ChatRequest, result: ChatResult, found: list[Result]
    ) -> AsyncIterator[Piece]:
        """Proxy mode: the OpenAI-compatible endpoint answers, every memory injected."""
        import openai

        t0 = time.perf_counter()
        prefix_ids, prefix_texts = await asyncio.to_thread(
            self.context.prefix_texts, request.cube_id
        )
        in_prefix = set(prefix_ids)
        retrieved = [r for r in found if r.memory_id not in in_prefix]
        messages = injected_messages(prefix_texts, [r.text for r in retrieved], request.messages)
        result.prefix = {"source": "injected", "tokens": None, "memory_ids": list(prefix_ids),
                         "activation_memory_id": None, "detail": "remote model"}  # fmt: skip
        result.memories = [*prefix_texts, *(r.text for r in retrieved)]
        if request.debug:
            result.prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
        client = self._client()
        kwargs: dict[str, Any] = {"model": self.settings.llm_model, "messages": messages,
                                  "max_tokens": request.max_new_tokens,
                                  "temperature": request.temperature}  # fmt: skip
        if request.top_p < 1.0:
            kwargs["top_p"] = request.top_p
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.stop:
            kwargs["stop"] = list(request.stop)
        pieces: list[str] = []
        try:
            stream = await client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    result.prompt_tokens = chunk.usage.prompt_tokens
                    result.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        if not pieces:
                            result.timings_ms["ttft_ms"] = (time.perf_counter() - t0) * 1e3
                        pieces.append(choice.delta.content)
                        yield Piece(choice.delta.content)
                    if choice.finish_reason:
                        result.finish_reason = choice.finish_reason
        except openai.APIStatusError as exc:
            raise ChatError(
                f"the LLM endpoint answered {exc.status_code}: {exc.message}", 502, "upstream"
            ) from exc
        except openai.APIError as exc:
            raise ChatError(f"the LLM endpoint failed: {exc}", 502, "upstream") from exc
        result.timings_ms["generate_ms"] = (time.perf_counter() - t0) * 1e3
        result.answer = "".join(pieces).strip()
        if not result.completion_tokens:
            result.completion_tokens = len(pieces)

    def _client(self) -> Any:
        if self._remote is None:
            from openai import AsyncOpenAI

            key = self.settings.llm_api_key
            self._remote = AsyncOpenAI(
                base_url=str(self.settings.llm_base_url).rstrip("/"),
                api_key=key.get_secret_value() if key else "no-key",
                timeout=120.0,
                max_retries=1,
            )
        return self._remote

    # -- publishing ------------------------------------------------------------------------------

    def _publish(self, request: ChatRequest, result: ChatResult) -> list[str]:
        """The turn as interactions of the cube (actor chat): the user's message, the answer."""
        when = utcnow()
        meta = {"chat_id": result.chat_id, "model": result.model,
                "memory_ids": ",".join(result.memory_ids)}  # fmt: skip
        turns = [("USER", request.user, request.messages[-1]["content"])]
        if result.answer:
            turns.append(("ASSISTANT", "assistant", result.answer))
        events = [
            Interaction(
                cube_id=request.cube_id,
                content=content,
                speaker=speaker,
                session_id=request.session_id,
                turn_id=f"{result.chat_id}/{role.lower()}",
                actor=ACTOR,
                role=role,  # type: ignore[arg-type]
                event_time=when,
                metadata=meta,
                event_id=str(uuid.uuid5(NAMESPACE, f"{result.chat_id}/{role}")),
            )
            for role, speaker, content in turns
        ]
        self.producer.publish_interactions(events)
        return [e.event_id for e in events]


def chat_service(runtime: Runtime, producer: EventProducer) -> ChatService:
    """The chat of a process with views (search needs them)."""

    def searcher() -> Searcher:
        if runtime.stores is None:
            raise ChatError(
                f"this process runs role {runtime.role!r}, which has no views to search; "
                "chat with a process of role 'views' or 'all'",
                503,
                "no_views",
            )
        return runtime.stores.searcher

    loader = getattr(runtime, "lm", None)  # the process's LM, shared with activation memory
    return ChatService(runtime.settings, searcher, producer, FoldMemoryContext(runtime), loader,
                       foreground=runtime.foreground)  # fmt: skip


__all__ = ["SYSTEM", "ChatError", "ChatRequest", "ChatResult", "ChatService", "FoldMemoryContext",
           "MemoryContext", "Piece", "Turn", "chat_service"]  # fmt: skip

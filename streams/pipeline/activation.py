"""Activation memory: each cube's activated memories, prefilled once, as a KV cache in MinIO.

The MemScheduler decides which memories are hot (ACTIVATE / DEACTIVATE ops through the writer).
This processor looks at the views' fold every few seconds. For a cube whose activated set is
not what its current ACTIVATION memory was computed from, it renders the memory prefix
(:func:`processors.prompt.memory_prefix`, the text every chat of the cube starts with), runs
the prefill once, stores the cache as safetensors in MinIO, content-addressed, **before** the op
that names it exists (claim-check), then sends a CREATE command for a new ACTIVATION memory
that supersedes the old one, and archives the old one: a cube has one active cache, and going
back to an earlier set restores that set's memory. A cube with no activated memories left has
its cache archived. A build waits while the process serves searches or chat turns
(:mod:`streams.runtime.foreground`), for at most :data:`DEFER_MAX_S`.

The passes run in a build thread of the processor's own, not in :meth:`ActivationProcessor.step`:
one prefill of a long prefix on a busy machine takes many seconds (16 s was seen), more than a
step may (the host stops a processor between two steps, and shutdown waited for the build). A
step is a heartbeat that reports the build thread's failure to the host; :meth:`close` cancels
a build in flight (the prefill stops at the model's next layer, :class:`processors.lm.Cancelled`)
and nothing of it is stored or sent: the next process builds it again.

A cache is never changed in place: a new set is a new object and a new memory. When chat finds
the stored object refused on load (a changed byte, a truncated object), it calls
:meth:`ActivationProcessor.repair`: the next pass checks the object and, if it is bad, prefills
again; the same prefix on the same model gives the same bytes, so the object is written back
under its own name and the op in the log stays valid (a different result is a new CREATE).
Replay needs none of this: the ops name the objects, which are verified by hash, not recomputed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from processors.commands import (
    command_id,
    create_command,
    created_memory_id,
    current_memory,
    payload_sha256,
)
from processors.fold import Memory
from processors.kv_cache import KIND, CacheRefused, dump_for, load_for, read_meta, sha256_hex
from processors.lm import AdapterHook, Cancelled, LocalLM
from processors.ops import ACTIVATION_PAYLOAD
from processors.prompt import memory_prefix, prefix_memories
from schemas import Codec
from sinks.blobs import BlobCorrupted, BlobMissing, BlobStore
from streams.pipeline.views import ViewsProcessor
from streams.runtime.foreground import Foreground
from streams.runtime.host import lower_priority, name_os_thread
from streams.runtime.processor import Processor
from streams.settings import Settings
from streams.transport.events import utcnow
from streams.transport.producer import EventProducer
from streams.transport.topics import COMMANDS

log = logging.getLogger("memstream.activation")

#: A cache build waits until no search or chat turn was served for this long...
QUIET_S = 0.5
#: ...but never longer than this (under a steady load, a build runs anyway, at ``nice`` 10).
DEFER_MAX_S = 15.0
#: A step waits this long on the build thread: the host's heartbeat, and how soon it can stop us.
HEARTBEAT_S = 1.0
#: How long :meth:`ActivationProcessor.close` waits for the build thread it cancelled: a prefill
#: stops at its next layer (a fraction of a second), loading the LM (its first use) cannot stop.
CLOSE_WAIT_S = 10.0


class ActivationProcessor(Processor):
    """The views' activated sets -> KV caches in MinIO -> CREATE / ARCHIVE commands."""

    name = "activation"
    nice = 10  # a KV-cache build (an LM prefill, 0.3-1 s of a core) waits for the searches
    inputs = ("memory-ops (the views' fold)",)
    outputs = ("minio:blobs/kv", "commands")
    state = "the sets it asked a cache for (until the op is folded); the rest is in the fold"

    def __init__(
        self,
        settings: Settings,
        views: Callable[[], ViewsProcessor | None],
        lm: Callable[[], LocalLM],
        blobs: BlobStore,
        codec: Codec | None = None,
        every_s: float = 2.0,
        foreground: Foreground | None = None,
    ) -> None:
        self.settings = settings
        self.foreground = foreground or Foreground()
        self.views = views
        self.lm = lm
        self.blobs = blobs
        self.codec = codec or Codec()
        self.every_s = every_s
        self.issuer = f"activation/{settings.worker_id}"
        self._asked: dict[str, tuple[str, ...]] = {}
        self._adapters: dict[str, AdapterHook] = {}
        self._adapter_of: dict[str, str] = {}  # cache sha256 -> the adapter it was built with
        self._suspect: set[str] = set()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._deferred_since: float | None = None
        self._lm_loaded = False
        self._cancel = threading.Event()  # set by close: the build thread stops
        self._ended = threading.Event()  # the build thread has ended
        self._failure: Exception | None = None
        self._thread: threading.Thread | None = None
        self.counters = {"caches_built": 0, "caches_repaired": 0, "caches_archived": 0,
                         "cache_tokens": 0, "cache_bytes": 0, "builds_deferred": 0,
                         "builds_cancelled": 0}  # fmt: skip

    def open(self) -> None:
        self._producer = EventProducer(self.settings, self.codec)
        self._topic = self.settings.topic(COMMANDS.name)
        self._thread = threading.Thread(target=self._run, name="activation-build", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel the build in flight, if any (nothing of it is stored or sent), wait for the
        build thread (bounded), close the producer."""
        self._cancel.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S)
            if self._thread.is_alive():
                log.warning("activation: the build thread did not stop within %.0f s (loading "
                            "the LM?); it ends without sending anything", CLOSE_WAIT_S)  # fmt: skip
        if getattr(self, "_producer", None) is not None:
            self._producer.close()

    def ready(self) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "pending": len(self._asked)}

    def repair(self, cube_id: str) -> None:
        """The cube's stored cache was refused on load: check it and rebuild it if bad."""
        with self._lock:
            self._suspect.add(cube_id)
        self._wake.set()

    def step(self) -> None:
        """A heartbeat: the build thread does the work; a pass that raised fails the processor
        here (the host restarts it, as it did when the pass ran in the step)."""
        if not self._ended.wait(HEARTBEAT_S) or self._cancel.is_set():
            return
        raise self._failure or RuntimeError("the activation build thread ended")

    def _run(self) -> None:
        """The build thread: a pass every ``every_s`` (sooner when woken), until closed."""
        name_os_thread("activation-bld")
        lower_priority(self.nice)
        try:
            while not self._cancel.is_set():
                self._wake.wait(self.every_s if self._deferred_since is None else QUIET_S)
                self._wake.clear()
                if self._cancel.is_set():
                    break
                self._pass()
        except Cancelled as exc:
            self.counters["builds_cancelled"] += 1
            log.info("activation: cache build cancelled, nothing stored or sent (%s)", exc)
        except Exception as exc:
            self._failure = exc
        finally:
            self._ended.set()

    def _check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("the processor is closing")

    def _pass(self) -> None:
        """Look at the fold once: build, archive or repair what each cube needs."""
        views = self.views()
        if views is None:
            return
        cubes: dict[str, list[Memory]] = {}
        for table in list(views.folds.values()):
            for m in list(table.memories.values()):
                if m.activated or m.memory_type == "ACTIVATION":
                    cubes.setdefault(m.cube_id, []).append(m)
        with self._lock:
            suspects, self._suspect = self._suspect, set()
        for cube_id, memories in cubes.items():
            self._sync(cube_id, memories, cube_id in suspects)

    def _sync(self, cube_id: str, memories: list[Memory], suspect: bool) -> None:
        hot = prefix_memories(memories, cube_id)  # the order chat renders them in
        wanted = tuple(m.memory_id for m in hot)
        current = current_memory(memories, cube_id, "ACTIVATION")
        if not hot:
            if current is not None and self._asked.get(cube_id) != ():
                self._archive(current)
            elif current is None:
                self._asked.pop(cube_id, None)
            return
        if not self._lm_loaded and self._defer():
            return  # loading the LM (seconds of CPU, once) is the first build's first cost
        self._check()
        lm = self.lm()
        self._lm_loaded = True
        hook, adapter_sha = self._adapter(memories, cube_id, lm)
        have = None
        if current is not None:
            have = (tuple(current.payload.get("memory_ids", ())), self._built_with(current))
        if have == (wanted, adapter_sha) and not suspect:
            self._asked.pop(cube_id, None)
            return
        if not suspect and self._asked.get(cube_id) == wanted:
            return  # asked already: the writer's op is on its way
        if self._defer():
            return  # the next pass asks again
        prefix = memory_prefix(lm, [m.text for m in hot])
        damaged = suspect and current is not None and have == (wanted, adapter_sha)
        if damaged and self._intact(lm, current, prefix, adapter_sha):
            return
        self._check()
        cache, tokens = lm.prefill(prefix, adapter=hook, cancel=self._cancel)
        self._check()  # done, but closing: the next process builds it (nothing half-sent)
        data = dump_for(lm, cache, prefix, list(wanted), adapter_sha)
        if damaged and self._rewrite(current, data):
            return
        self._adapter_of[sha256_hex(data)] = adapter_sha
        uri, sha = self.blobs.put(KIND, data)  # the object first: the op only names it
        payload = {"uri": uri, "model_id": lm.model_id, "weights_sha256": lm.weights_sha256,
                   "token_count": tokens, "dtype": lm.dtype, "sha256": sha,
                   "memory_ids": list(wanted)}  # fmt: skip
        known = next((m for m in memories if m.memory_id == created_memory_id(
            cube_id, "ACTIVATION", payload_sha256(payload))), None)  # fmt: skip
        if known is not None:  # back to a cache the cube had: that memory again
            if known.status == "archived":
                self._send(self._lifecycle(known, "RESTORE", "its memories are activated again"))
            if current is not None and current.memory_id != known.memory_id:
                self._send(self._lifecycle(current, "ARCHIVE", "superseded"))
            self._asked[cube_id] = wanted
            return
        command = create_command(
            cube_id,
            (ACTIVATION_PAYLOAD, payload),
            self.issuer,
            utcnow(),
            supersedes=[current.memory_id] if current else [],
            reason=f"KV cache of {len(wanted)} activated memories ({tokens} tokens)",
            evidence={"tokens": float(tokens), "bytes": float(len(data))},
        )
        self._send(command)
        if current is not None:  # one active cache per cube: the one it replaces retires
            self._send(self._lifecycle(current, "ARCHIVE", "superseded"))
        self._asked[cube_id] = wanted
        self.counters["caches_built"] += 1
        self.counters["cache_tokens"] += tokens
        self.counters["cache_bytes"] += len(data)
        log.info("activation: cube %s cache of %d memories, %d tokens, %d bytes", cube_id,
                 len(wanted), tokens, len(data))  # fmt: skip

    def _defer(self) -> bool:
        """Whether a build should wait for the requests being served (see
        :mod:`streams.runtime.foreground`); never for more than :data:`DEFER_MAX_S`."""
        now = time.monotonic()
        if self.foreground.idle_s() >= QUIET_S:
            self._deferred_since = None
            return False
        if self._deferred_since is None:
            self._deferred_since = now
        if now - self._deferred_since >= DEFER_MAX_S:
            self._deferred_since = None  # overdue: this build runs, the next may wait again
            return False
        self.counters["builds_deferred"] += 1
        return True

    def _adapter(
        self, memories: list[Memory], cube_id: str, lm: LocalLM
    ) -> tuple[AdapterHook | None, str]:
        """The cube's current adapter, if any: a prefix computed through it is what chat with
        the adapter needs (LoRA changes the attention projections, hence the keys and values)."""
        memory = current_memory(memories, cube_id, "PARAMETER")
        if memory is None:
            return None, ""
        sha = str(memory.payload.get("sha256", ""))
        if sha not in self._adapters:
            from processors.lora import AdapterRefused, adapter_hook
            from streams.pipeline.parameter import fetch_adapter

            try:
                view, _ = fetch_adapter(self.blobs, memory.payload, lm)
                self._adapters[sha] = adapter_hook(view)
            except (AdapterRefused, BlobMissing, BlobCorrupted) as exc:
                log.warning("activation: adapter of %s refused (%s): cache without it",
                            cube_id, exc)  # fmt: skip
                return None, ""
        return self._adapters[sha], sha

    def _built_with(self, current: Memory) -> str:
        """The adapter a stored cache was computed through ("" for none), from its header."""
        sha = str(current.payload.get("sha256", ""))
        if sha not in self._adapter_of:
            try:
                data = self.blobs.get_unverified(current.payload["uri"])
                self._adapter_of[sha] = read_meta(data).adapter_sha256
            except (CacheRefused, BlobMissing, KeyError) as exc:
                log.warning("activation: cache %s unreadable (%s)", sha[:12], exc)
                return "?"  # unknown: built again
        return self._adapter_of[sha]

    def _intact(self, lm: LocalLM, current: Memory, prefix: str, adapter_sha: str) -> bool:
        try:
            load_for(lm, self.blobs.get_unverified(current.payload["uri"]),
                     current.payload["sha256"], prefix_text=prefix,
                     adapter_sha256=adapter_sha)  # fmt: skip
            return True
        except (CacheRefused, BlobMissing, BlobCorrupted) as exc:
            log.warning("activation: cache of %s refused (%s); rebuilding", current.cube_id, exc)
            return False

    def _rewrite(self, current: Memory, data: bytes) -> bool:
        """Put the rebuilt bytes back under the old object's name if they are the same."""
        if sha256_hex(data) != current.payload["sha256"]:
            return False  # not the same bytes: a new memory instead
        self.blobs.put(KIND, data, replace=True)
        self.counters["caches_repaired"] += 1
        log.info("activation: repaired the cache object of cube %s", current.cube_id)
        return True

    def _archive(self, current: Memory) -> None:
        self._send(self._lifecycle(current, "ARCHIVE", "no activated memories left"))
        self._asked[current.cube_id] = ()

    def _lifecycle(self, memory: Memory, kind: str, reason: str) -> dict[str, Any]:
        """An ARCHIVE or RESTORE of a cache memory, at its current version (deterministic)."""
        return {
            "command_id": command_id(
                "activation", memory.cube_id, kind, memory.memory_id, str(memory.version)
            ),
            "cube_id": memory.cube_id,
            "memory_id": memory.memory_id,
            "command": kind,
            "issued_by": self.issuer,
            "event_time": utcnow(),
            "reason": reason,
            "expected_version": memory.version,
            "evidence": {},
            "payload": None,
            "source_op": None,
            "supersedes": [],
        }

    def _send(self, command: dict[str, Any]) -> None:
        self._producer.publish(self._topic, command["cube_id"], COMMANDS.record, command)
        if command["command"] == "ARCHIVE":
            self.counters["caches_archived"] += 1

"""Parameter memory in the background: LoRA training in its own OS process, adapters in MinIO.

- :class:`BackgroundTrainer` runs one training at a time in a ``multiprocessing`` **spawn**
  child (a fresh interpreter: no forked Kafka clients or torch threads, and the GIL and the
  cores it takes are not the stream's; it runs at a lower priority, ``nice`` 10). The child loads
  the base model itself (``loader``, e.g. :func:`lm_loader`), trains
  (:func:`processors.lora.train_adapter`) and reports ``(step, steps, loss)`` on a queue; the
  parent only drains that queue, without blocking, so its thread keeps stepping. When the child
  is done, the adapter's safetensors bytes go to the blob store (content-addressed in MinIO) and
  the training is a :class:`FinishedTraining`: uri, sha256, version, base model id and weights
  hash, rank, the memory ids it learned, the losses before and after.
- :class:`ParameterProcessor` is the hosted processor: each step polls the trainer, and every
  ``check_every_s`` asks the policy (:func:`processors.lora_policy.decide_training`) about each
  cube of the folded memories it is given; its :meth:`~ParameterProcessor.stats` (in
  ``/v1/status``) show the training in progress (cube, step, loss) and the adapters made.
- :func:`parameter_payload` turns a finished training into the ``ParameterPayload`` of a
  PARAMETER op (MemoryOp v2); :func:`fetch_adapter` loads one back from MinIO onto a model
  (verified: hash, base model id and weights, tensor shapes; see :mod:`processors.lora`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from processors.commands import create_command, current_memory
from processors.fold import Memory
from processors.lora_policy import LoraPolicy, StabilityTracker, TrainingDecision, decide_training
from processors.ops import PARAMETER_PAYLOAD
from sinks.blobs import BlobMissing, BlobStore
from streams.runtime.processor import Processor
from streams.settings import Settings
from streams.transport.events import utcnow
from streams.transport.producer import EventProducer
from streams.transport.topics import COMMANDS

log = logging.getLogger("memstream.parameter")

ADAPTER_KIND = "adapter"


@dataclass(frozen=True)
class TrainingJob:
    """What the child trains: a cube's memories (ids and texts, same order) and how."""

    cube_id: str
    version: int
    memory_ids: tuple[str, ...]
    texts: tuple[str, ...]
    settings: Any  # processors.lora.LoraSettings (imported lazily: it pulls torch)


@dataclass(frozen=True)
class FinishedTraining:
    """A trained adapter stored in MinIO, and what it learned."""

    cube_id: str
    version: int
    uri: str
    sha256: str
    size: int
    base_model_id: str
    base_weights_sha256: str
    rank: int
    trained_on: tuple[str, ...]
    loss_base: float
    loss_adapter: float
    step_losses: tuple[float, ...]
    seconds: float


def parameter_payload(finished: FinishedTraining) -> dict[str, Any]:
    """The ``ParameterPayload`` (MemoryOp v3) of the PARAMETER op that names this adapter."""
    return {
        "uri": finished.uri,
        "base_model_id": finished.base_model_id,
        "base_weights_sha256": finished.base_weights_sha256,
        "rank": finished.rank,
        "sha256": finished.sha256,
        "trained_on": list(finished.trained_on),
    }


def _load_local_lm(model_dir: str, source: str, threads: int | None) -> Any:
    from processors.lm import LocalLM

    return LocalLM.load(Path(model_dir), source, threads=threads)


def lm_loader(model_dir: Path, source: str, threads: int | None = 1) -> Callable[[], Any]:
    """A picklable loader of the local LM for the training child (``settings.effective_lm_dir``,
    ``settings.lm_model``)."""
    return functools.partial(_load_local_lm, str(model_dir), source, threads)


def _train_in_child(loader: Callable[[], Any], job: TrainingJob, out: Any) -> None:
    """The child's body: load the model, train, send the adapter bytes (or the error)."""
    try:
        with contextlib.suppress(OSError):
            os.nice(10)  # the stream's processes come first
        from processors.lora import BaseIdentity, train_adapter

        started = time.monotonic()
        lm = loader()
        out.put(("loaded", time.monotonic() - started))
        report = train_adapter(
            lm.model,
            lm.tokenizer,
            job.texts,
            job.memory_ids,
            BaseIdentity(lm.model_id, lm.weights_sha256),
            job.settings,
            version=job.version,
            on_step=lambda step, steps, loss: out.put(("step", step, steps, loss)),
        )
        out.put(("done", report.adapter.data, report.adapter.config.to_json(), report.loss_base,
                 report.loss_adapter, report.step_losses, report.seconds))  # fmt: skip
    except BaseException as exc:  # reported, then the child exits
        out.put(("error", f"{type(exc).__name__}: {exc}"))


@dataclass
class Progress:
    """The training in progress, as ``/v1/status`` shows it."""

    cube_id: str
    version: int
    memories: int
    steps: int
    started: float = field(default_factory=time.monotonic)
    phase: str = "loading"  # loading | training | storing
    step: int = 0
    loss: float | None = None
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"cube_id": self.cube_id, "version": self.version, "memories": self.memories,
                "phase": self.phase, "step": self.step, "steps": self.steps,
                "loss": None if self.loss is None else round(self.loss, 4),
                "elapsed_s": round(time.monotonic() - self.started, 1)}  # fmt: skip


class TrainingFailed(RuntimeError):
    """The child reported an error or died without a result (``cube_id``: whose training)."""

    def __init__(self, reason: str, cube_id: str) -> None:
        self.reason = reason
        self.cube_id = cube_id
        super().__init__(f"training of cube {cube_id} failed: {reason}")


class BackgroundTrainer:
    """One LoRA training at a time, in a spawned child process; the caller never waits on it.

    :meth:`submit` starts a training (False if one is running); :meth:`poll` drains the child's
    reports within ``timeout`` and returns the :class:`FinishedTraining` once (after storing the
    adapter), raises :class:`TrainingFailed` once for a failed one, else None.
    """

    def __init__(self, loader: Callable[[], Any], blobs: BlobStore) -> None:
        self.loader = loader
        self.blobs = blobs
        self._ctx = mp.get_context("spawn")
        self._process: Any = None
        self._queue: Any = None
        self.job: TrainingJob | None = None
        self.progress: Progress | None = None
        self.last_error: str | None = None

    @property
    def busy(self) -> bool:
        return self._process is not None

    def submit(self, job: TrainingJob) -> bool:
        if self.busy:
            return False
        self._queue = self._ctx.Queue()
        self._process = self._ctx.Process(
            target=_train_in_child,
            args=(self.loader, job, self._queue),
            name=f"memstream-lora-{job.cube_id}",
            daemon=True,
        )
        self.progress = Progress(job.cube_id, job.version, len(job.memory_ids), job.settings.steps)
        self.job = job
        self._process.start()
        log.info("training adapter v%d of cube %s on %d memories (pid %d)", job.version,
                 job.cube_id, len(job.memory_ids), self._process.pid)  # fmt: skip
        return True

    def poll(self, timeout: float = 0.0) -> FinishedTraining | None:
        if self._process is None:
            if timeout:
                time.sleep(timeout)
            return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self._queue.get(timeout=max(0.0, deadline - time.monotonic()) or 0.01)
            except queue.Empty:
                if self._process.is_alive():
                    return None
                try:  # it exited: whatever it sent before is in the pipe by now
                    message = self._queue.get(timeout=1.0)
                except queue.Empty:
                    code = self._process.exitcode
                    self._fail(f"the training process exited ({code}) without a result")
            result = self._handle(message)
            if result is not None or time.monotonic() >= deadline:
                return result

    def _handle(self, message: tuple[Any, ...]) -> FinishedTraining | None:
        kind, *rest = message
        progress = self.progress
        assert progress is not None
        if kind == "loaded":
            progress.phase = "training"
        elif kind == "step":
            progress.step, _, progress.loss = rest
            progress.losses.append(progress.loss)
        elif kind == "error":
            self._fail(rest[0])
        elif kind == "done":
            progress.phase = "storing"
            return self._store(*rest)
        return None

    def _store(self, data: bytes, config_json: str, loss_base: float, loss_adapter: float,
               step_losses: tuple[float, ...], seconds: float) -> FinishedTraining:  # fmt: skip
        from processors.lora import AdapterConfig, read_header, sha256_hex

        job = self.job
        assert job is not None
        try:
            _, config = read_header(data)  # what the child sent is a whole adapter
            if AdapterConfig.from_json(config_json) != config:
                raise ValueError("the adapter's header is not the config the child sent")
            uri, sha256 = self.blobs.put(ADAPTER_KIND, data)
            if sha256 != sha256_hex(data):
                raise ValueError(f"the blob store answered sha256 {sha256} for other bytes")
        except Exception as exc:
            self._fail(f"storing the adapter: {type(exc).__name__}: {exc}")
        self._reap()
        return FinishedTraining(
            cube_id=job.cube_id, version=job.version, uri=uri, sha256=sha256, size=len(data),
            base_model_id=config.base_model_id, base_weights_sha256=config.base_weights_sha256,
            rank=config.rank, trained_on=config.trained_on, loss_base=loss_base,
            loss_adapter=loss_adapter, step_losses=tuple(step_losses), seconds=seconds,
        )  # fmt: skip

    def _fail(self, reason: str) -> NoReturn:
        cube_id = self.job.cube_id if self.job else "?"
        self.last_error = reason
        self._reap()
        raise TrainingFailed(reason, cube_id)

    def _reap(self) -> None:
        process, self._process = self._process, None
        self.progress = None
        if process is not None:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    def close(self) -> None:
        """Stop a running training (its child is killed; nothing was stored)."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        self._reap()

    def wait(self, timeout: float) -> FinishedTraining | None:
        """Block until the running training finishes (tests and the CLI; never a processor)."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            finished = self.poll(timeout=min(1.0, deadline - time.monotonic()))
            if finished is not None:
                return finished
        return None


def fetch_adapter(blobs: BlobStore, payload: Mapping[str, Any], lm: Any) -> Any:
    """Load the adapter a ``ParameterPayload`` names from MinIO onto ``lm`` (a LocalLM).

    Returns (the adapted view of the model, its AdapterConfig); the base model is not modified.
    Raises :class:`processors.lora.AdapterRefused` for a missing object or bytes that fail
    verification (hash, framing, base model id and weights, tensor shapes).
    """
    from processors.lora import AdapterRefused, BaseIdentity, load_adapter

    try:
        data = blobs.get_unverified(payload["uri"])  # load_adapter checks the hash and says how
    except BlobMissing as exc:
        raise AdapterRefused(str(exc), "missing") from exc
    identity = BaseIdentity(lm.model_id, lm.weights_sha256)
    return load_adapter(lm.model, data, payload["sha256"], identity)


class ParameterProcessor(Processor):
    """Trains each cube's adapter when the policy says so, one at a time, in the background.

    ``memories`` returns the folded memories it decides on (e.g. the views processor's folds);
    ``on_finished`` receives each :class:`FinishedTraining` (the PARAMETER op's command goes
    there: :func:`parameter_payload`). ``adapters`` seeds each cube's current (version, memory
    ids), e.g. from the log's PARAMETER ops, so versions continue and nothing is retrained.
    """

    name = "parameter"
    inputs = ()
    outputs = ()
    state = "per cube: its adapter's version and memory ids, when its memories last changed"

    def __init__(
        self,
        trainer: BackgroundTrainer,
        memories: Callable[[], Iterable[Memory]],
        lora: Any,
        policy: LoraPolicy = LoraPolicy(),  # noqa: B008 (frozen)
        on_finished: Callable[[FinishedTraining], None] | None = None,
        adapters: Mapping[str, tuple[int, tuple[str, ...]]] | None = None,
        current: Callable[[], Mapping[str, tuple[int, tuple[str, ...]]]] | None = None,
        check_every_s: float = 10.0,
        retry_after_s: float = 300.0,
        poll_s: float = 0.5,
    ) -> None:
        self.trainer = trainer
        self.memories = memories
        self.lora = lora
        self.policy = policy
        self.on_finished = on_finished
        self.adapters: dict[str, tuple[int, tuple[str, ...]]] = dict(adapters or {})
        self.current = current
        self.check_every_s = check_every_s
        self.retry_after_s = retry_after_s
        self.poll_s = poll_s
        self.tracker = StabilityTracker()
        self.finished: list[FinishedTraining] = []
        self.failed: dict[str, tuple[float, str]] = {}
        self.decisions: dict[str, str] = {}
        self.counters = {"trained": 0, "failed": 0, "checks": 0}
        self._next_check = 0.0

    def step(self) -> None:
        try:
            finished = self.trainer.poll(timeout=self.poll_s)
        except TrainingFailed as exc:
            self.failed[exc.cube_id] = (time.monotonic(), exc.reason)
            self.counters["failed"] += 1
            log.warning("%s", exc)
            finished = None
        if finished is not None:
            self._finish(finished)
        if not self.trainer.busy and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self.check_every_s
            self.check()

    def _finish(self, finished: FinishedTraining) -> None:
        self.adapters[finished.cube_id] = (finished.version, finished.trained_on)
        self.finished.append(finished)
        self.finished = self.finished[-20:]
        self.counters["trained"] += 1
        log.info("adapter v%d of cube %s: loss %.3f -> %.3f, %s", finished.version,
                 finished.cube_id, finished.loss_base, finished.loss_adapter,
                 finished.uri)  # fmt: skip
        if self.on_finished is not None:
            self.on_finished(finished)

    def check(self) -> TrainingDecision | None:
        """Ask the policy about every cube; start the first training it wants. Returns it."""
        self.counters["checks"] += 1
        if self.current is not None:  # what the log says now (after a restart, a rollback)
            for cube, (version, trained_on) in self.current().items():
                if version >= self.adapters.get(cube, (0, ()))[0]:
                    self.adapters[cube] = (version, trained_on)
        by_cube: dict[str, list[Memory]] = {}
        for memory in self.memories():
            by_cube.setdefault(memory.cube_id, []).append(memory)
        now = time.monotonic()
        chosen = None
        for cube_id in sorted(by_cube):
            ops, changed_at = self.tracker.observe(cube_id, by_cube[cube_id])
            version, trained_on = self.adapters.get(cube_id, (0, ()))
            decision = decide_training(cube_id, by_cube[cube_id], ops, changed_at, trained_on,
                                       self.policy)  # fmt: skip
            self.decisions[cube_id] = decision.reason
            failed = self.failed.get(cube_id)
            if (
                chosen is None
                and decision.train
                and not (failed and now - failed[0] < self.retry_after_s)
            ):
                chosen = (decision, version + 1)
        if chosen is None:
            return None
        decision, version = chosen
        job = TrainingJob(decision.cube_id, version, decision.memory_ids, decision.texts,
                          self.lora)  # fmt: skip
        return decision if self.trainer.submit(job) else None

    def close(self) -> None:
        self.trainer.close()

    def stats(self) -> dict[str, Any]:
        progress = self.trainer.progress
        return {
            **self.counters,
            "training": progress.as_dict() if progress else None,
            "adapters": {
                cube: {"version": v, "memories": len(ids)}
                for cube, (v, ids) in sorted(self.adapters.items())
            },
            "last": [
                {
                    "cube_id": f.cube_id,
                    "version": f.version,
                    "uri": f.uri,
                    "loss_base": round(f.loss_base, 4),
                    "loss_adapter": round(f.loss_adapter, 4),
                    "seconds": round(f.seconds, 1),
                }
                for f in self.finished[-3:]
            ],
            "last_error": self.trainer.last_error,
        }


def lora_settings(settings: Settings) -> Any:
    """The :class:`processors.lora.LoraSettings` of ``settings`` (``MEMSTREAM_LORA_*``)."""
    from processors.lora import LoraSettings

    return LoraSettings(
        rank=settings.lora_rank,
        alpha=2 * settings.lora_rank,
        steps=settings.lora_steps,
        lr=settings.lora_lr,
        max_tokens=settings.lora_max_tokens,
    )


def lora_policy(settings: Settings) -> LoraPolicy:
    return LoraPolicy(min_memories=settings.lora_min_memories, stable_ops=settings.lora_stable_ops)


def adapters_in(memories: Iterable[Memory]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Per cube, from its PARAMETER memories in the fold: how many adapters it has had (the
    next one's version is one more) and what the newest one learned, archived or not: a rolled
    back adapter's memories are not trained on again until they change."""
    by_cube: dict[str, list[Memory]] = {}
    for m in memories:
        if m.memory_type == "PARAMETER":
            by_cube.setdefault(m.cube_id, []).append(m)
    out = {}
    for cube, adapters in by_cube.items():
        newest = max(adapters, key=lambda m: (m.created_at, m.memory_id))
        out[cube] = (len(adapters), tuple(newest.payload.get("trained_on", ())))
    return out


def parameter_processor(
    settings: Settings,
    memories: Callable[[], Iterable[Memory]],
    on_finished: Callable[[FinishedTraining], None] | None = None,
    adapters: Mapping[str, tuple[int, tuple[str, ...]]] | None = None,
    current: Callable[[], Mapping[str, tuple[int, tuple[str, ...]]]] | None = None,
) -> ParameterProcessor:
    """The processor as ``settings`` configure it: the local LM (``lm_model``) trained in a
    child process, adapters in the settings' MinIO bucket. A factory for the host."""
    trainer = BackgroundTrainer(
        lm_loader(settings.effective_lm_dir, settings.lm_model), BlobStore.from_settings(settings)
    )
    return ParameterProcessor(trainer, memories, lora_settings(settings), lora_policy(settings),
                              on_finished, adapters, current)  # fmt: skip


class AdapterRecorder:
    """``on_finished`` of the hosted processor: a finished adapter becomes a PARAMETER memory
    through the one writer (a CREATE command superseding the cube's current adapter)."""

    def __init__(self, settings: Settings, memories: Callable[[], Iterable[Memory]]) -> None:
        self.settings = settings
        self.memories = memories
        self.issuer = f"parameter/{settings.worker_id}"
        self._producer: EventProducer | None = None

    def __call__(self, finished: FinishedTraining) -> None:
        if self._producer is None:
            self._producer = EventProducer(self.settings)
        cube = finished.cube_id
        current = current_memory(self.memories(), cube, "PARAMETER")
        command = create_command(
            cube,
            (PARAMETER_PAYLOAD, parameter_payload(finished)),
            self.issuer,
            utcnow(),
            supersedes=[current.memory_id] if current else [],
            reason=f"adapter v{finished.version} on {len(finished.trained_on)} memories: loss "
            f"{finished.loss_base:.3f} -> {finished.loss_adapter:.3f}",
            evidence={
                "loss_base": finished.loss_base,
                "loss_adapter": finished.loss_adapter,
                "seconds": finished.seconds,
                "version": float(finished.version),
            },
        )
        topic = self.settings.topic(COMMANDS.name)
        self._producer.publish(topic, cube, COMMANDS.record, command)

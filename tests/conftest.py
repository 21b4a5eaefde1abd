"""Shared fixtures. Integration tests use the services that `memstream infra up` started."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from infra import kafka, minio
from streams.settings import Settings
from streams.transport.topics import ensure_topics


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings from the environment, as `memstream infra up` saw them."""
    return Settings()


@pytest.fixture(scope="session")
def settings(base_settings: Settings) -> Settings:
    """The running services, with topics under a prefix of this test run's own.

    A fresh prefix keeps runs independent of each other and of the demo's data.
    """
    if not kafka.answers(base_settings):
        pytest.fail(
            f"Kafka does not answer at {base_settings.kafka_bootstrap}: run `memstream infra up`"
        )
    if not minio.answers(base_settings):
        pytest.fail(
            f"MinIO does not answer at {base_settings.minio_endpoint}: run `memstream infra up`"
        )
    run = uuid.uuid4().hex[:8]
    # The scheduler activates no memory (top_n 0) and no KV cache is built unless a test sets
    # a policy of its own (tests/integration/test_scheduler.py, test_activation.py): their ops
    # would add versions to other tests' memories.
    settings = base_settings.model_copy(
        update={"topic_prefix": f"test-{run}.", "scheduler_top_n": 0, "activation_memory": False}
    )
    ensure_topics(settings)
    return settings


@pytest.fixture
def group_id() -> str:
    return f"test-group-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clean_env() -> Iterator[dict[str, str]]:
    """os.environ without MEMSTREAM_ variables, restored afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MEMSTREAM_")}
    for key in saved:
        del os.environ[key]
    yield os.environ
    for key in [k for k in os.environ if k.startswith("MEMSTREAM_")]:
        del os.environ[key]
    os.environ.update(saved)


#: How long the run may wait, once every test has finished, for threads that would keep the
#: interpreter alive (a Faust consumer thread is never a daemon).
EXIT_GRACE_S = 60.0


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run with its own exit status even if a non-daemon thread outlives it.

    A safety net, not a test: the interpreter waits forever for a non-daemon thread, and mode's
    threads are never daemons. ``FaustProcessor.close`` ends its app's threads also when the
    app's stop hangs (tests/integration/test_access_agent.py proves it); a thread that still
    outlives the run is named on stderr instead of hanging CI.
    """
    import sys
    import threading
    import time
    from concurrent.futures.thread import _threads_queues

    deadline = time.monotonic() + EXIT_GRACE_S
    while time.monotonic() < deadline:
        # A thread pool's idle workers (the embedder keeps one) are ended by concurrent.futures
        # itself at interpreter exit, before the interpreter waits for threads.
        left = [t for t in threading.enumerate()
                if t is not threading.main_thread() and not t.daemon and t.is_alive()
                and t not in _threads_queues]  # fmt: skip
        if not left:
            return
        time.sleep(0.5)
    names = ", ".join(t.name for t in left)
    print(f"\nthreads still running {EXIT_GRACE_S:.0f} s after the run: {names}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(int(getattr(config, "_memstream_exitstatus", 1)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._memstream_exitstatus = int(exitstatus)  # type: ignore[attr-defined]

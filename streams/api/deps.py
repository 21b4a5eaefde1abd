"""What the routers share: the process's runtime and producer, and the checks on them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import HTTPException, Request

from streams.pipeline.build import Stores
from streams.pipeline.roles import Runtime
from streams.pipeline.views import ViewsProcessor
from streams.query.time_travel import TimeTravel
from streams.runtime.host import name_os_thread
from streams.transport.producer import EventProducer

log = logging.getLogger("memstream.api")

T = TypeVar("T")

#: How long the producer of best-effort events (QueryEvents) lets a batch fill.
BEST_EFFORT_LINGER_MS = 100


@dataclass
class Service:
    """The process behind the API (set by the app's lifespan)."""

    runtime: Runtime
    producer: EventProducer
    time_travel: TimeTravel = field(init=False)
    events: LaterPublisher = field(init=False)
    _searching: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.time_travel = TimeTravel(
            self.runtime.settings, self.runtime.snapshots, self.runtime.codec
        )
        # Best-effort events on a producer of their own that waits to fill its batches: a
        # search's QueryEvent was a produce request of its own, which the broker handled while
        # the next search embedded its query; the agents count in half-second batches anyway.
        self._best_effort = EventProducer(
            self.runtime.settings, self.runtime.codec, config={"linger.ms": BEST_EFFORT_LINGER_MS}
        )
        self.events = LaterPublisher(self._best_effort)
        # One search per core at a time (the query embedding releases the GIL while it runs).
        self._searching = ThreadPoolExecutor(
            len(os.sched_getaffinity(0)),
            thread_name_prefix="api-search",
            initializer=name_os_thread,
            initargs=("api-search",),
        )

    async def search(self, run: Callable[[], T]) -> T:
        """Run a search off the event loop, on the API's search threads.

        Not Starlette's ``run_in_threadpool``: AnyIO's hop to a worker thread (capacity
        limiter, cancel scope, context copy) took a fifth of the loop thread's time per search
        on a 2-core machine; asyncio's ``run_in_executor`` is one queue put and one wake-up.
        """
        return await asyncio.get_running_loop().run_in_executor(self._searching, run)

    def close(self) -> None:
        """Finish the searches in flight and publish what is queued (before the producer
        closes)."""
        self._searching.shutdown(wait=True)
        self.events.close()
        self._best_effort.close()

    def stores(self) -> Stores:
        """The view stores, or a 503 that says which role serves them."""
        if self.runtime.stores is None:
            raise HTTPException(
                503,
                f"this process runs role {self.runtime.role!r}, which has no views; "
                "ask a process with role 'views' or 'all'",
            )
        return self.runtime.stores

    def views(self) -> ViewsProcessor:
        self.stores()
        views = self.runtime.host.get("views")
        if not isinstance(views, ViewsProcessor):
            raise HTTPException(503, "the views processor is restarting")
        return views


class LaterPublisher:
    """Best-effort events (a search's QueryEvent) published on the API's own thread.

    Not a response background task: Starlette runs those inside the request's cycle, so the
    connection's next request waited for this one's publish, one more hop through the thread
    pool per search. A failure is logged; the caller has its answer already.
    """

    def __init__(self, producer: EventProducer) -> None:
        self._producer = producer
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="api-events")

    def publish(self, topic: str, key: str, record: str, value: Mapping[str, Any]) -> None:
        future = self._thread.submit(self._producer.publish_nowait, topic, key, record, value)
        future.add_done_callback(_log_failure)

    def close(self) -> None:
        """Wait for the queued events, then stop the thread."""
        self._thread.shutdown(wait=True)


def _log_failure(future: Future[None]) -> None:
    if (error := future.exception()) is not None:
        log.warning("a best-effort event was not published: %r", error)


async def service(request: Request) -> Service:
    """The app's :class:`Service`. Async on purpose: FastAPI runs a sync dependency in its
    thread pool, a round trip between threads on every request for a dict lookup."""
    return request.app.state.service

"""A cube's memory updates as an asyncio iterator, without blocking the event loop.

Why a thread of its own rather than ``asyncio.to_thread`` per poll: a librdkafka consumer must
be created, polled, committed and closed by one thread (closing it from another can deadlock),
and long polls would hold the loop's shared executor (a handful of threads) for every
subscriber at once. The thread reads batches into a bounded queue (backpressure: a slow caller
pauses the reader, never the broker's retention), and commits what the caller was handed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections import deque
from typing import Any

from streams.settings import Settings
from streams.transport.updates import CubeReader, MemoryUpdate, Since

_END = object()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve the start future unless its waiter gave up (cancelled) already."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Subscription:
    """Async iterator (and async context manager) of one cube's updates.

    ``group_id`` names the committed position this subscription resumes from and advances; with
    ``commit=False`` it only reads (the SSE endpoint, which resumes by ``Last-Event-ID``). An
    update counts as delivered when ``__anext__`` hands it out; the position is committed every
    ``commit_interval`` seconds and when the subscription closes, so a crash may hand out again
    what came in the last interval; ``after=update.position`` resumes exactly.
    """

    def __init__(
        self,
        cube_id: str,
        group_id: str | None = None,
        *,
        since: Since = None,
        after: str | None = None,
        settings: Settings | None = None,
        commit: bool = True,
        poll_timeout: float = 0.2,
        commit_interval: float = 0.5,
        buffer: int = 8,
    ) -> None:
        self.settings = settings or Settings()
        self.cube_id = cube_id
        self.group_id = group_id or f"{self.settings.topic_prefix}updates.{uuid.uuid4().hex}"
        self._since, self._after, self._commit = since, after, commit
        self._poll_timeout, self._commit_interval = poll_timeout, commit_interval
        self._queue: asyncio.Queue[Any] = asyncio.Queue(buffer)
        self._batch: deque[MemoryUpdate] = deque()
        self._stop = threading.Event()
        self._closed = asyncio.Event()  # wakes a caller waiting in __anext__ when closed
        self._thread: threading.Thread | None = None
        self._handed = -1  # offset after the last update handed out (-1: none yet)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.start_offset: int | None = None
        self.partition: int | None = None
        self.duplicates = 0

    async def start(self) -> Subscription:
        """Open the consumer and resolve the start position; returns once it is fixed (an op
        published after this returns will be delivered)."""
        if self._thread is not None:
            return self
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"updates-{self.cube_id}", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self.close()
            raise
        return self

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> MemoryUpdate:
        if self._thread is None:
            await self.start()
        while not self._batch:
            if self._stop.is_set():
                raise StopAsyncIteration
            item = await self._next_item()
            if item is _END:
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                raise item
            self._batch.extend(item)
        update = self._batch.popleft()
        self._handed = update.offset + 1
        return update

    async def _next_item(self) -> Any:
        """The next queued batch, or the end once the subscription is closed."""
        get = asyncio.ensure_future(self._queue.get())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            get.cancel()
            closed.cancel()
        return _END if closed.done() and not closed.cancelled() else get.result()

    def close(self) -> None:
        """Stop reading (a caller waiting for the next update gets the end); the reader thread
        commits what was handed out and closes the consumer on its own, at most one poll later.
        Call it from the subscription's loop; safe from a cancelled task."""
        self._stop.set()
        self._closed.set()

    async def aclose(self) -> None:
        """Stop and wait until the position is committed and the consumer closed."""
        self.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            reader = CubeReader(
                self.cube_id, self.group_id, self.settings, since=self._since, after=self._after
            )
        except BaseException as exc:
            self._call(_settle, ready, exc)
            return
        self.start_offset, self.partition = reader.start_offset, reader.partition
        self._call(_settle, ready, None)
        last_commit = 0.0
        try:
            while not self._stop.is_set():
                updates = reader.poll(self._poll_timeout)
                self.duplicates = reader.dedup.duplicates
                now = time.monotonic()
                if self._commit and now - last_commit >= self._commit_interval:
                    reader.commit(self._handed, asynchronous=True)
                    last_commit = now
                if updates and not self._put(updates):
                    break
        except Exception as exc:
            self._put(exc)
        finally:
            try:
                if self._commit:
                    reader.commit(self._handed)
            finally:
                reader.close()
                if not self._stop.is_set():
                    self._put(_END)

    def _call(self, fn: Any, *args: Any) -> None:
        """Run ``fn`` on the subscriber's loop (if it is still there)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody waits any more
            self._stop.set()

    def _put(self, item: Any) -> bool:
        """Queue ``item`` for the caller, waiting while the queue is full; False once the
        subscription is closed or its loop gone."""
        assert self._loop is not None
        try:
            future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        except RuntimeError:
            self._stop.set()
            return False
        while True:
            try:
                future.result(timeout=self._poll_timeout)
                return True
            except concurrent.futures.TimeoutError:
                if self._stop.is_set() or self._loop.is_closed():
                    future.cancel()
                    return False

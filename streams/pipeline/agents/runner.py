"""Hosting a Faust app as a :class:`~streams.runtime.processor.Processor`.

memstream's host runs each processor in a thread of its own and drives it by ``open`` / ``step``
/ ``close``; the HTTP API serves from another thread, on its own loop. A Faust app is a
``mode.Service`` tree that runs on whatever asyncio loop starts it, so a Faust processor gets a
private loop in the host's thread: ``open`` creates it and schedules the app's start, each
``step`` runs the loop for half a second (Faust's consumer, commit timer, changelog producer and
agents all make progress only then) and raises if the app crashed, ``close`` stops the app
(offsets committed, changelog flushed, consumer group left) and closes the loop.

Not ``faust.Worker``: a worker owns the whole process (signal handlers, logging setup, working
directory, ``run_forever``), which a hosted processor must not. Not
``faust.contrib.asgi.faust_lifespan`` either: that runs Faust on the API's loop, so Faust's
rebalances and catch-up would share the loop with request handling, and a crashed agent could
not be restarted without restarting the API. Starting the app service directly is what both of
those do underneath; :func:`~faust.contrib.asgi.bind_to_running_loop` pins the app to the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import ClassVar

import faust
from aiokafka.codec import has_lz4
from faust.contrib.asgi import bind_to_running_loop
from faust.streams import _current_event
from faust.types import EventT
from mode.threads import WorkerThread

from streams.pipeline.agents.app import create_app
from streams.runtime.processor import Processor
from streams.settings import Settings

log = logging.getLogger("memstream.agents")

#: The agents read their topics in batches of up to this many events, or what arrived within
#: this long (``take_events``): each memory a batch touches is one table write (one changelog
#: record), not one per hit, and the work comes in short bursts between searches instead of a
#: slice of every search (a QueryEvent counted at once cost the search path more CPU than the
#: search itself).
BATCH_MAX = 1000
BATCH_S = 0.5


@contextmanager
def writing_for(event: EventT) -> Iterator[None]:
    """Table writes in this block go to ``event``'s changelog partition, as if made while the
    stream handled it. A Faust table picks the partition of a write from the stream's current
    event, which a batch of ``take_events`` does not set; an agent that writes each key once per
    batch writes it for the batch's last event of that key (the same partition: a key's events
    all come from one)."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


@contextmanager
def acked_only_if_done(events: Sequence[EventT]) -> Iterator[None]:
    """A batch of ``take_events`` whose handling fails stays unacknowledged.

    ``take_events`` acknowledges its batch in a ``finally``, so also when the handler raised or
    was cancelled; the commit that follows (a crashed app's stop commits what was acked) would
    then skip events never counted. A message already marked acked is one the consumer does not
    record as processed, so its offset, and every later one, stays uncommitted and is
    redelivered to the next instance, which the agents' offset guards make harmless.
    """
    try:
        yield
    except BaseException:
        for event in events:
            event.message.acked = True
        raise


def owned_partitions(app: faust.App, topic: str) -> set[int]:
    """The partitions of ``topic`` that ``app`` owns as of its latest rebalance.

    From the assignor's record of the assignment, the one the tables' recovery works from, not
    from ``app.consumer.assignment()``: the consumer's view lives in its own thread and reads
    empty while that thread joins a new generation, so a recovery callback that asked it could
    drop every key from the tables just as they were recovered.
    """
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


class FaustAppFailed(RuntimeError):
    """The Faust app crashed or stopped by itself; the host restarts the processor."""


class MissingCodec(RuntimeError):
    """aiokafka cannot decompress the batches memstream's producers write."""


class FaustProcessor(Processor):
    """A processor whose work is done by agents of its own Faust app (``settings.group(name)``).

    Subclasses declare their topics, tables and agents in :meth:`declare`, which gets a fresh
    app at every :meth:`open`, so a restarted processor never reuses a stopped app.
    """

    #: How long one step runs the loop: well inside the host's one-second step budget.
    step_s: ClassVar[float] = 0.5
    #: How long close waits for the app to stop (commit, flush, leave the group).
    stop_timeout_s: ClassVar[float] = 30.0
    #: How long close then waits for each of the app's threads to end, first asked to stop,
    #: then with its loop stopped under it.
    thread_timeout_s: ClassVar[float] = 10.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: faust.App | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[None] | None = None
        self._recovered = threading.Event()

    @abstractmethod
    def declare(self, app: faust.App) -> None:
        """Declare topics, tables and agents on ``app`` (runs in :meth:`open`, in the
        processor's thread, with the private loop current)."""

    def open(self) -> None:
        """Create the private loop and the app, and schedule the start; returns at once, since
        the app's start lasts until the partitions are assigned and the tables recovered."""
        if not has_lz4():
            # memstream's producers compress with lz4; without cramjam aiokafka's fetcher
            # crashes on the first batch, deep in the consumer thread. Say so up front.
            raise MissingCodec("aiokafka cannot read lz4 batches: install aiokafka[lz4] (cramjam)")
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self.app = create_app(self.settings, self.name)
        self.declare(self.app)
        self._starting = self._loop.create_task(self._start(self.app), name=f"start-{self.name}")

    async def _start(self, app: faust.App) -> None:
        bind_to_running_loop(app)
        app.finalize()
        await app.start()
        if not app.should_stop:
            self._recovered.set()

    def step(self) -> None:
        """Run the loop for :attr:`step_s`; raise :class:`FaustAppFailed` if the app crashed."""
        loop, app, starting = self._loop, self.app, self._starting
        if loop is None or app is None or starting is None:
            raise FaustAppFailed(f"{self.name}: step() before open()")
        if starting.done():
            loop.run_until_complete(asyncio.sleep(self.step_s))
        else:
            loop.run_until_complete(asyncio.wait([starting], timeout=self.step_s))
        if app.crashed:
            raise FaustAppFailed(f"{self.name}: Faust app crashed: {app.crash_reason!r}") from (
                app.crash_reason
            )
        if starting.done():
            starting.result()  # a start that raised fails the processor with its own error
            if app.should_stop:
                raise FaustAppFailed(f"{self.name}: Faust app stopped by itself")

    def close(self) -> None:
        """Stop the app (bounded by :attr:`stop_timeout_s`) and close the loop; safe after a
        failed or partial :meth:`open`."""
        loop, app = self._loop, self.app
        if loop is None:
            return
        self._recovered.clear()
        try:
            if self._starting is not None and not self._starting.done():
                self._starting.cancel()
                loop.run_until_complete(asyncio.wait([self._starting]))
            if app is not None and app.started:
                if app.crashed:
                    # The crash has already stopped the consumer thread's loop, so the final
                    # commit of Faust's wait-for-empty would raise "Event loop is closed" and
                    # abort the stop half-way (the producer left open). Skip it: what was not
                    # committed is redelivered, and the agents make redeliveries harmless.
                    app.conf.stream_wait_empty = False
                loop.run_until_complete(asyncio.wait_for(app.stop(), self.stop_timeout_s))
        except Exception:
            log.exception("%s: the Faust app did not stop cleanly", self.name)
        finally:
            if app is not None:
                _end_threads(self.name, app, self.thread_timeout_s)
            _close_loop(loop)
            self._loop = None

    def threads(self) -> list[threading.Thread]:
        """The app's service threads still alive (Faust's consumer thread): none after
        :meth:`close`."""
        return [] if self.app is None else [t for t in _threads_of(self.app) if t.is_alive()]

    def ready(self) -> bool:
        """True once the app runs with its partitions assigned and its tables recovered from
        their changelogs (Faust starts the agents only then)."""
        return self._recovered.is_set()


def _threads_of(app: faust.App) -> list[WorkerThread]:
    """mode's service threads (Faust's consumer thread, a threaded producer's) of ``app``."""
    return [
        t
        for t in threading.enumerate()
        if isinstance(t, WorkerThread) and getattr(t.service, "app", None) is app
    ]


def _end_threads(name: str, app: faust.App, timeout_s: float) -> None:
    """End every service thread of ``app``, also when its stop timed out or failed half-way.

    mode's threads are never daemons, so one left running keeps the process from exiting. An
    app whose stop hung (aiokafka's metadata loop kept busy, a commit that never answered)
    leaves its consumer thread waiting for a stop signal that the cancelled stop never sent.
    Each thread is first told to stop as the app's stop would have (its loop then stops the
    consumer and cancels what is left); one that still runs after ``timeout_s`` has its loop
    stopped under it. Nothing is lost either way: what was not committed is redelivered.
    """
    threads = [t for t in _threads_of(app) if t.is_alive()]
    for thread in threads:
        with suppress(RuntimeError):  # its loop closed: the thread ended meanwhile
            thread.service._stopped_set()
    for thread in threads:
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("%s: thread %s did not stop; stopping its loop", name, thread.name)
            with suppress(RuntimeError):
                thread.service.thread_loop.call_soon_threadsafe(thread.service.thread_loop.stop)
            thread.join(timeout_s)
        if thread.is_alive():
            log.error("%s: thread %s is still running", name, thread.name)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the app left on the loop, then close it, so no task outlives the processor."""
    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        asyncio.set_event_loop(None)
        loop.close()

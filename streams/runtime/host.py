"""The host: runs the enabled processors, one thread each, supervises them, reports health.

Supervision policy (documented in the README): a processor that raises is closed and restarted
with exponential backoff (0.5 s, doubling, at most 30 s), as a fresh instance, so it rebuilds its
state from the log (snapshot + tail) instead of carrying on with a state it may have half
updated. A processor that fails ``max_failures`` times within ``window_s`` gives up: the host
sets :attr:`Host.failed`, ``memstream serve`` drains the others (bounded) and exits non-zero, and
the orchestrator (systemd, Kubernetes, compose ``restart: always``) starts a clean process.
A processor hosted with an ``on_give_up`` callback is not critical (a replay's next generation):
when it gives up, the host forgets it and calls the callback instead, and the process goes on.
``/readyz`` is red while any processor is not running, has not caught up, or has not finished a
step for ``stall_s`` seconds (hung).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streams.runtime.processor import Processor

log = logging.getLogger("memstream.host")

Factory = Callable[[], Processor]
#: Called with a processor's name and last error when the host gives up on it.
GiveUp = Callable[[str, str | None], None]


@dataclass
class Supervised:
    """One processor slot: its factory, current instance and what happened to it."""

    name: str
    factory: Factory
    instance: Processor | None = None
    state: str = "starting"  # starting | running | restarting | failed | stopped
    restarts: int = 0
    last_error: str | None = None
    last_step: float = field(default_factory=time.monotonic)
    failures: deque[float] = field(default_factory=deque)
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    #: Not critical: giving up on it calls this instead of failing the host.
    on_give_up: GiveUp | None = None


class Host:
    """Starts, supervises and stops a set of processors."""

    def __init__(
        self,
        factories: dict[str, Factory],
        max_failures: int = 5,
        window_s: float = 300.0,
        stall_s: float = 120.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.slots = {name: Supervised(name, factory) for name, factory in factories.items()}
        self.max_failures = max_failures
        self.window_s = window_s
        self.stall_s = stall_s
        self.max_backoff_s = max_backoff_s
        self.failed = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        self._started = True
        for slot in list(self.slots.values()):
            self._run(slot)

    def _run(self, slot: Supervised) -> None:
        slot.thread = threading.Thread(
            target=self._supervise, args=(slot,), name=f"processor-{slot.name}", daemon=True
        )
        slot.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every processor to stop after its current step, and wait (bounded) for them."""
        slots = list(self.slots.values())
        for slot in slots:
            slot.stop.set()
        deadline = time.monotonic() + timeout
        for slot in slots:
            if slot.thread is not None:
                slot.thread.join(max(0.0, deadline - time.monotonic()))

    def add(self, name: str, factory: Factory, on_give_up: GiveUp | None = None) -> None:
        """Host one more processor (a replay's next generation), started at once if the host
        runs. With ``on_give_up`` it is not critical: once it fails ``max_failures`` times the
        host forgets it and calls ``on_give_up(name, last_error)``, and :attr:`failed` stays
        clear."""
        with self._lock:
            if name in self.slots:
                raise ValueError(f"processor {name!r} is already hosted")
            slot = self.slots[name] = Supervised(name, factory, on_give_up=on_give_up)
        if self._started:
            self._run(slot)

    def remove(self, name: str, timeout: float = 30.0) -> None:
        """Stop one processor (after its current step), then forget it: whoever checks for the
        name (a replay resuming its processor) never sees a second instance start while the
        first is still stopping."""
        slot = self.slots.get(name)
        if slot is None:
            return
        slot.stop.set()
        if slot.thread is not None and slot.thread is not threading.current_thread():
            slot.thread.join(timeout)
            if slot.thread.is_alive():
                log.warning("processor %s did not stop within %.0f s; forgotten while it stops",
                            name, timeout)  # fmt: skip
        with self._lock:
            if self.slots.get(name) is slot:
                del self.slots[name]

    def promote(self, source: str, target: str, timeout: float = 30.0) -> None:
        """Let the running ``source`` take ``target``'s place: ``target`` is stopped, and
        ``source`` goes on, undisturbed, under the name ``target`` (a generation switch), as
        critical as ``target`` was (it takes its ``on_give_up``, None for a live processor)."""
        replaced = self.slots.get(target)
        self.remove(target, timeout)
        with self._lock:
            slot = self.slots.pop(source)
            slot.name = target
            slot.on_give_up = replaced.on_give_up if replaced is not None else None
            self.slots[target] = slot

    def get(self, name: str) -> Processor | None:
        """The current instance of a processor (a restart replaces it)."""
        slot = self.slots.get(name)
        return slot.instance if slot is not None else None

    # supervision -------------------------------------------------------------------------------

    def _supervise(self, slot: Supervised) -> None:
        backoff = 0.5
        while not slot.stop.is_set():
            slot.state = "starting"
            try:
                slot.instance = slot.factory()
                name_os_thread(slot.name)
                lower_priority(slot.instance.nice)
                slot.instance.open()
                slot.state = "running"
                while not slot.stop.is_set():
                    slot.instance.step()
                    slot.last_step = time.monotonic()
                    if slot.failures and slot.last_step - slot.failures[-1] > self.window_s:
                        slot.failures.clear()
                        backoff = 0.5
            except:  # noqa: E722 (librdkafka can raise a KafkaError, not an exception, from a
                # rebalance callback: `except BaseException` misses it and the thread would die)
                exc = sys.exc_info()[1]
                log.error(
                    "processor %s failed: %r",
                    slot.name,
                    exc,
                    exc_info=isinstance(exc, BaseException),
                )
                slot.state = "failed"
                slot.last_error = f"{type(exc).__name__}: {exc}"
                slot.failures.append(time.monotonic())
            finally:
                self._close(slot)
            if slot.stop.is_set():
                break
            while slot.failures and time.monotonic() - slot.failures[0] > self.window_s:
                slot.failures.popleft()
            if len(slot.failures) >= self.max_failures:
                log.error("processor %s failed %d times in %.0f s: giving up", slot.name,
                          len(slot.failures), self.window_s)  # fmt: skip
                self._give_up(slot)
                return
            slot.state = "restarting"
            slot.restarts += 1
            slot.stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
        slot.state = "stopped"

    def _give_up(self, slot: Supervised) -> None:
        """A critical processor fails the host; one that is not is forgotten, and whoever
        hosted it is told (a promotion in between makes it critical: it is read under the
        lock)."""
        with self._lock:
            callback = slot.on_give_up
            if callback is None:
                self.failed.set()
                return
            if self.slots.get(slot.name) is slot:
                del self.slots[slot.name]
        try:
            callback(slot.name, slot.last_error)
        except Exception:
            log.exception("processor %s: its give-up callback failed", slot.name)

    @staticmethod
    def _close(slot: Supervised) -> None:
        if slot.instance is None:
            return
        try:
            slot.instance.close()
        except Exception:
            log.exception("processor %s failed to close", slot.name)

    # health ------------------------------------------------------------------------------------

    def processor_health(self, slot: Supervised) -> dict[str, Any]:
        now = time.monotonic()
        instance = slot.instance
        alive = slot.thread is not None and slot.thread.is_alive()
        stalled = slot.state == "running" and now - slot.last_step > self.stall_s
        ready = False
        stats: dict[str, Any] = {}
        if instance is not None and slot.state == "running":
            try:
                ready = bool(instance.ready())
                stats = instance.stats()
            except Exception as exc:  # a stats bug must not turn a health check into a 500
                stats = {"error": repr(exc)}
        return {
            "state": "stalled" if stalled else slot.state,
            "alive": alive,
            "ready": alive and ready and not stalled,
            "restarts": slot.restarts,
            "last_error": slot.last_error,
            "seconds_since_step": round(now - slot.last_step, 1),
            "inputs": list(type(instance).inputs) if instance else [],
            "outputs": list(type(instance).outputs) if instance else [],
            "stats": stats,
        }

    def health(self) -> dict[str, dict[str, Any]]:
        return {name: self.processor_health(slot) for name, slot in list(self.slots.items())}

    def ready(self) -> bool:
        return not self.failed.is_set() and all(h["ready"] for h in self.health().values())

    def live(self) -> bool:
        return not self.failed.is_set()


def lower_priority(nice: int) -> None:
    """Give the calling thread at least ``nice`` (Linux threads have a nice value each; elsewhere
    nothing changes). Never raises it back: a thread's priority only goes down."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    if os.getpriority(os.PRIO_PROCESS, tid) < nice:
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def name_os_thread(name: str) -> None:
    """Name the calling thread for the OS as well (Linux keeps 15 bytes): Python 3.11 names its
    threads for itself only, so ``top -H`` and ``/proc/<pid>/task/*/comm`` showed every
    processor as "python", and a processor's CPU could not be told from another's."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass

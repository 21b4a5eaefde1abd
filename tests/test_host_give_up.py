"""A processor that is not critical (a replay's next generation) gives up alone: the host
forgets it and says so, and the process goes on; promoted, it is critical again."""

from __future__ import annotations

import threading
import time
from typing import Any

from streams.runtime.host import Host
from streams.runtime.processor import Processor


class Steady(Processor):
    name = "steady"
    inputs = ("in",)
    outputs = ("out",)

    def open(self) -> None:
        pass

    def step(self) -> None:
        time.sleep(0.01)

    def ready(self) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        return {}


class Broken(Steady):
    name = "broken"

    def open(self) -> None:
        raise RuntimeError("cannot start")


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_processor_with_on_give_up_fails_alone() -> None:
    host = Host({"live": Steady}, max_failures=3, max_backoff_s=0.05)
    gave_up: list[tuple[str, str | None]] = []
    host.start()
    try:
        host.add("next", Broken, on_give_up=lambda name, error: gave_up.append((name, error)))
        wait_for(lambda: gave_up)
        assert gave_up == [("next", "RuntimeError: cannot start")]
        assert "next" not in host.slots and not host.failed.is_set() and host.live()
        wait_for(host.ready)
    finally:
        host.stop(5)


def test_a_critical_processor_still_fails_the_host() -> None:
    host = Host({"live": Broken}, max_failures=2, max_backoff_s=0.05)
    host.start()
    try:
        assert host.failed.wait(10)
    finally:
        host.stop(5)


def test_a_promoted_processor_is_as_critical_as_the_one_it_replaces() -> None:
    fail = threading.Event()

    class Failing(Steady):
        def step(self) -> None:
            if fail.is_set():
                raise RuntimeError("boom")
            time.sleep(0.01)

    host = Host({"live": Steady}, max_failures=2, max_backoff_s=0.05)
    host.start()
    try:
        host.add("next", Failing, on_give_up=lambda name, error: None)
        wait_for(host.ready)
        host.promote("next", "live")
        assert host.slots["live"].on_give_up is None
        fail.set()
        assert host.failed.wait(10)
    finally:
        host.stop(5)

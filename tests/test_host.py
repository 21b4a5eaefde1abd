"""The host supervises processors: health, restart with backoff, giving up."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from streams.runtime.host import Host
from streams.runtime.processor import Processor


class Counting(Processor):
    """Steps until told to fail; counts what happened to it."""

    name = "counting"
    inputs = ("in",)
    outputs = ("out",)
    opened: list[int] = []  # noqa: RUF012 (shared on purpose: instances come and go)

    def __init__(self, fail: threading.Event, fail_open: bool = False) -> None:
        self.fail = fail
        self.fail_open = fail_open
        self.steps = 0

    def open(self) -> None:
        if self.fail_open:
            raise RuntimeError("cannot connect")
        Counting.opened.append(id(self))

    def step(self) -> None:
        if self.fail.is_set():
            self.fail.clear()
            raise RuntimeError("boom")
        self.steps += 1
        time.sleep(0.01)

    def ready(self) -> bool:
        return self.steps > 0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps}


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_failed_processor_is_restarted_fresh_and_readiness_follows() -> None:
    fail = threading.Event()
    host = Host({"counting": lambda: Counting(fail)})
    host.start()
    try:
        wait_for(host.ready)
        first = host.get("counting")
        fail.set()
        wait_for(lambda: not host.ready(), 5)
        wait_for(host.ready)
        health = host.health()["counting"]
        assert health["restarts"] == 1 and health["last_error"] == "RuntimeError: boom"
        assert host.get("counting") is not first and host.live()
        assert health["inputs"] == ["in"] and health["stats"]["steps"] > 0
    finally:
        host.stop()
    assert host.health()["counting"]["state"] == "stopped"


def test_a_processor_that_keeps_failing_makes_the_host_give_up() -> None:
    host = Host({"counting": lambda: Counting(threading.Event(), fail_open=True)},
                max_failures=3, max_backoff_s=0.05)  # fmt: skip
    host.start()
    try:
        assert host.failed.wait(10)
        assert not host.live() and not host.ready()
        assert host.health()["counting"]["last_error"] == "RuntimeError: cannot connect"
    finally:
        host.stop()


def test_a_hung_processor_is_not_ready() -> None:
    class Hanging(Counting):
        def step(self) -> None:
            self.steps += 1
            time.sleep(0.5)

    host = Host({"hanging": lambda: Hanging(threading.Event())}, stall_s=0.2)
    host.start()
    try:
        wait_for(lambda: host.health()["hanging"]["state"] == "stalled")
        assert not host.ready()
    finally:
        host.stop()


class Priority(Processor):
    """Records the nice value of the thread its steps run in."""

    name = "priority"
    seen: dict[str, int] = {}  # noqa: RUF012 (read by the test after the thread ran)

    def __init__(self, label: str, nice: int) -> None:
        self.label = label
        self.nice = nice  # type: ignore[misc] (an instance stands for a subclass here)

    def step(self) -> None:
        tid = threading.get_native_id()
        Priority.seen[self.label] = os.getpriority(os.PRIO_PROCESS, tid)
        time.sleep(0.01)


def test_a_background_processor_runs_at_its_lower_priority_and_the_others_do_not() -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    host = Host({"kv": lambda: Priority("kv", 10), "stream": lambda: Priority("stream", 0)})
    host.start()
    try:
        wait_for(lambda: {"kv", "stream"} <= set(Priority.seen))
    finally:
        host.stop()
    assert Priority.seen["kv"] == max(base, 10)
    assert Priority.seen["stream"] == base
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


class ThreadName(Processor):
    """Records the OS name of the thread its steps run in."""

    name = "thread-name"
    seen: dict[str, str] = {}  # noqa: RUF012 (read by the test after the thread ran)

    def __init__(self, label: str) -> None:
        self.label = label

    def step(self) -> None:
        tid = threading.get_native_id()
        ThreadName.seen[self.label] = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        time.sleep(0.01)


def test_each_processor_thread_carries_its_name_for_the_os() -> None:
    host = Host({"views": lambda: ThreadName("views"),
                 "a-very-long-processor-name": lambda: ThreadName("long")})  # fmt: skip
    host.start()
    try:
        wait_for(lambda: {"views", "long"} <= set(ThreadName.seen))
    finally:
        host.stop()
    assert ThreadName.seen["views"] == "views"
    assert ThreadName.seen["long"] == "a-very-long-pro"  # Linux keeps 15 bytes
    assert Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip() != "views"

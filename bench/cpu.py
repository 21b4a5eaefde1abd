"""Where the machine's CPU went during a measured window: per process and per worker thread.

A pipeline's speed next to its embedder ceiling says how much is lost, not to what. The
embedder shares the cores with everything else on the machine (the Kafka broker's JVM, the
milvus-lite server, MinIO, the worker's other threads), so the window's CPU-seconds of each
are what a change must cut. Threads are grouped by their OS name (the runtime names each
processor's thread, see ``streams.runtime.host.name_os_thread``; a trailing number is dropped).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

#: Services by a substring of their command line.
SERVICES = {"kafka broker": "kafka.Kafka", "minio": "minio server"}


def _thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of a process: its group name and CPU seconds (user + system)."""
    out: dict[int, tuple[str, float]] = {}
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return out
    for t in threads:
        try:
            name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        except OSError:
            continue
        out[t.id] = (re.sub(r"[-_:.]?\d+$", "", name) or "?", t.user_time + t.system_time)
    return out


def _process_times(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


class CpuMeter:
    """CPU-seconds over a window for the worker processes (with their children, e.g. the
    milvus-lite server) and the local services, as shares of the machine's capacity."""

    def __init__(self, workers: dict[str, int]) -> None:
        self.workers = workers
        self.services = {
            name: p.pid
            for name, needle in SERVICES.items()
            for p in psutil.process_iter(["cmdline"])
            if needle in " ".join(p.info["cmdline"] or [])
        }

    def _sample(self) -> dict[str, Any]:
        processes: dict[str, float] = {}
        threads: dict[str, dict[int, tuple[str, float]]] = {}
        for name, pid in self.workers.items():
            processes[name] = _process_times(pid)
            threads[name] = _thread_times(pid)
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                label = f"{name}: {child.name()}"
                processes[label] = processes.get(label, 0.0) + _process_times(child.pid)
        for name, pid in self.services.items():
            processes[name] = _process_times(pid)
            threads[name] = _thread_times(pid)  # the broker's: JIT compiler, GC or requests
        return {"at": time.perf_counter(), "processes": processes, "threads": threads,
                "machine": psutil.cpu_times()}  # fmt: skip

    def start(self) -> CpuMeter:
        self._start = self._sample()
        return self

    def stop(self) -> dict[str, Any]:
        """CPU-seconds per process and per worker thread group since :meth:`start`, the
        window's length, and how busy the whole machine was (everything, not only ours)."""
        end = self._sample()
        wall = end["at"] - self._start["at"]
        capacity = wall * (psutil.cpu_count() or 1)
        a, b = self._start["machine"], end["machine"]
        idle = (b.idle + getattr(b, "iowait", 0.0)) - (a.idle + getattr(a, "iowait", 0.0))
        processes = {
            name: round(seconds - self._start["processes"].get(name, 0.0), 2)
            for name, seconds in end["processes"].items()
        }
        threads = {}
        for worker, live in end["threads"].items():
            before = self._start["threads"].get(worker, {})
            groups: Counter[str] = Counter()
            for tid, (group, seconds) in live.items():
                groups[group] += seconds - before.get(tid, (group, 0.0))[1]
            # threads that ended within the window took their times with them
            groups["(ended threads)"] = processes[worker] - sum(groups.values())
            threads[worker] = {g: round(s, 2) for g, s in groups.most_common() if s >= 0.05}
        return {
            "wall_s": round(wall, 2),
            "machine_busy": round(1 - idle / capacity, 3),
            "cpu_s": dict(sorted(processes.items(), key=lambda kv: -kv[1])),
            "thread_cpu_s": threads,
        }

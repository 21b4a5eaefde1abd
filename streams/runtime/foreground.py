"""When this process last served someone who waits for the answer (a search, a chat turn).

Background work that may wait, a KV-cache build above all (an LM prefill: a core for 0.3-1 s,
and the interpreter between its layers), asks :meth:`Foreground.idle_s` before it starts and
defers while requests are being served. ``nice`` alone does not keep it out of a search's way:
the prefill's Python holds the GIL that the search's thread needs between its native calls, and
a lower OS priority only makes the holder slower to hand it back.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Foreground:
    """The foreground requests in flight and the monotonic time of the last one's start or end;
    shared by the API and the background processors of one process."""

    def __init__(self) -> None:
        self._last = -math.inf
        self._active = 0
        self._lock = threading.Lock()

    def touch(self) -> None:
        """Foreground work happens now (a chat turn's next token, say)."""
        self._last = time.monotonic()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around a request: busy for as long as it runs, however long it is kept waiting (a
        search starved of the interpreter by the very build that asks must count as busy)."""
        with self._lock:
            self._active += 1
        self.touch()
        try:
            yield
        finally:
            self.touch()
            with self._lock:
                self._active -= 1

    def idle_s(self) -> float:
        """Seconds since the last foreground request ended (0 while one runs; ``inf``: none
        yet)."""
        if self._active:
            return 0.0
        return time.monotonic() - self._last

"""Background LM work yields to the requests being served, for a bounded time."""

from __future__ import annotations

import math

from streams.pipeline import activation
from streams.pipeline.activation import ActivationProcessor
from streams.runtime.foreground import Foreground
from streams.settings import Settings


def processor(foreground: Foreground) -> ActivationProcessor:
    return ActivationProcessor(Settings(), lambda: None, lambda: None, None, foreground=foreground)  # type: ignore[arg-type]


def test_idle_until_touched_and_busy_while_a_request_runs() -> None:
    foreground = Foreground()
    assert foreground.idle_s() == math.inf
    foreground.touch()
    assert 0 <= foreground.idle_s() < 1
    with foreground.serving():
        foreground._last -= 60  # a request kept waiting for a minute is still being served
        assert foreground.idle_s() == 0
    assert 0 < foreground.idle_s() < 1


def test_a_build_waits_while_requests_are_served_and_runs_once_quiet() -> None:
    foreground = Foreground()
    p = processor(foreground)
    assert not p._defer()  # nothing served yet
    foreground.touch()
    assert p._defer() and p._defer()
    assert p.counters["builds_deferred"] == 2
    foreground._last -= activation.QUIET_S  # the last request ended QUIET_S ago
    assert not p._defer()
    assert p._deferred_since is None


def test_a_build_waits_no_longer_than_the_bound() -> None:
    foreground = Foreground()
    p = processor(foreground)
    foreground.touch()
    assert p._defer()
    assert p._deferred_since is not None
    p._deferred_since -= activation.DEFER_MAX_S  # deferred for the whole bound already
    foreground.touch()  # and requests keep coming
    assert not p._defer()  # overdue: this one runs
    assert p._defer()  # the next one may wait again

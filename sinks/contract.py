"""The sink contract: what every view store promises the processor that feeds it.

A sink writes a batch and flushes (the quix-streams order: sinks, state, producer, offsets). Its
``write`` either returns, with the rows the store refused and why, or raises because the store
could not be reached. The caller dead-letters the refused rows, never the batch around them, and
commits the batch's position only after every sink returned: a store that is down keeps the
position where it was, so the batch is written again after the restart; a row a store will never
take (a value over one of its limits) cannot hold the rest of the batch back.

A store says "no" to a batch, not to a row, so :func:`write_isolating` splits a refused batch in
halves until each refused row stands alone (a batch of n rows with one bad row costs about
2·log2(n) writes, and only when a row is refused). A lone row that fails while the store still
answers a liveness probe is refused; one that fails while the probe fails too means the store is
down, and that raises :class:`StoreUnavailable`. Every write is an idempotent upsert or an
insert into a table that collapses by key, so writing a half again after a partial write changes
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from processors.fold import Memory
from schemas.limits import REASON_BYTES
from streams.transport.consumer import Event

T = TypeVar("T")


@dataclass(frozen=True)
class Refused:
    """A row a store would not take: its key (a memory id for the state views, an op's event id
    for the audit tables) and the store's reason."""

    sink: str
    key: str
    reason: str


@dataclass(frozen=True)
class Batch:
    """What one step of the views hands every sink: the ops to record and the memory states
    they left (the latest state of each memory an op touched)."""

    ops: Sequence[Event]
    states: Sequence[Memory]


class StoreUnavailable(Exception):
    """The store did not answer: nothing was refused, the batch must be written again."""


class Sink(Protocol):
    """A view store fed by the views processor."""

    name: str

    def write(self, batch: Batch) -> list[Refused]:
        """Write the batch; return the rows the store refused. Raises when the store is down."""
        ...

    def flush(self) -> None:
        """Make what was written durable and quick to read (a sink may have nothing to do)."""
        ...


def write_isolating(
    sink: str,
    rows: Sequence[T],
    write: Callable[[Sequence[T]], Any],
    key: Callable[[T], str],
    alive: Callable[[], bool],
) -> list[Refused]:
    """Write ``rows`` with ``write``; if the store refuses, find the rows it refuses by halving.

    ``alive`` is a cheap probe of the store (a metadata call): it tells a refused row from a
    store that went away under the write.
    """
    if not rows:
        return []
    try:
        write(rows)
        return []
    except Exception as exc:
        if not _alive(alive):
            raise StoreUnavailable(f"{sink} did not answer: {type(exc).__name__}") from exc
        if len(rows) == 1:
            return [Refused(sink, key(rows[0]), reason_of(exc))]
    half = len(rows) // 2
    return [
        *write_isolating(sink, rows[:half], write, key, alive),
        *write_isolating(sink, rows[half:], write, key, alive),
    ]


def _alive(probe: Callable[[], bool]) -> bool:
    try:
        return bool(probe())
    except Exception:
        return False


def reason_of(exc: BaseException) -> str:
    """The store's words for a refusal, on one line and cut to the dead-letter limit (the
    dead-letter topic is the operators', never a caller's)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    data = text.encode("utf-8", "replace")
    if len(data) <= REASON_BYTES:
        return text
    return data[: REASON_BYTES - 3].decode("utf-8", "ignore") + "..."

"""The processor model: one stream processor is one object with declared inputs and outputs that
the :class:`~streams.runtime.host.Host` drives, one thread each.

A processor never owns a loop of its own: the host calls :meth:`Processor.open` once, then
:meth:`Processor.step` until it is stopped, then :meth:`Processor.close`. Each step is one bounded
unit of work (poll, process, commit) that returns within a second or two, so the host can see a
processor that hangs (no heartbeat) as surely as one that raised, and can stop any of them
between two steps without tearing a batch in half.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar


class Processor(ABC):
    """A stream processor hosted by :class:`~streams.runtime.host.Host`.

    Subclasses set ``name`` (unique in a process; names its consumer group), ``inputs`` and
    ``outputs`` (logical topic names, e.g. ``"interactions"``) and ``state`` (what it keeps in
    memory, in words, for ``/v1/status``), and implement :meth:`step`.
    """

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()
    state: ClassVar[str] = ""
    #: The ``nice`` value of its thread (Linux; 0: the stream's own priority). Background work
    #: that may wait (KV-cache builds) sets 10, so a search or the writer preempts it.
    nice: ClassVar[int] = 0

    def open(self) -> None:  # noqa: B027 (optional hook)
        """Connect consumers and producers; called once, in the processor's own thread."""

    @abstractmethod
    def step(self) -> None:
        """Do one bounded unit of work. An exception fails the processor (the host restarts it)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what :meth:`open` acquired; called once, also after a failure."""

    def ready(self) -> bool:
        """Whether it has caught up with its inputs (``/readyz`` waits for every processor)."""
        return True

    def stats(self) -> dict[str, Any]:
        """Counters and state sizes for ``/v1/status``."""
        return {}

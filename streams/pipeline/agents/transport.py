"""The Kafka transport of memstream's Faust apps: aiokafka's, with fetches that wait to fill.

Faust's consumer asks the broker for new records with aiokafka's default ``fetch_min_bytes=1``:
the broker answers as soon as one record is there. On ``memstream.queries`` that is one fetch,
one wake-up of the consumer thread and one hand-off to the agent per search, a cost of the
search path on a small machine (the agents share its cores and the API's interpreter). The
agents count in batches (see :data:`~streams.pipeline.agents.runner.BATCH_S`), so they gain
nothing from records that arrive sooner: here a fetch waits for :data:`FETCH_MIN_BYTES` or
:data:`FETCH_MAX_WAIT_MS`, whichever comes first. Under load it fills at once; when idle a new
record reaches an agent within half a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import aiokafka
from faust.transport.drivers import aiokafka as driver

if TYPE_CHECKING:
    from faust.types import ConsumerT

#: The broker answers a fetch once this much is waiting...
FETCH_MIN_BYTES = 256 * 1024
#: ...or once this long has passed.
FETCH_MAX_WAIT_MS = 500


class ConsumerThread(driver.AIOKafkaConsumerThread):
    """aiokafka's consumer thread, whose consumer fetches in batches."""

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Faust passes neither to the constructor, which only stores them until start() builds
        # the fetcher (aiokafka 0.14, pinned in infra/constraints.txt; a unit test checks them).
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    """The ``kafka://`` transport with :class:`Consumer`."""

    Consumer: ClassVar[type[ConsumerT]] = Consumer

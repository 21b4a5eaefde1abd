"""The Faust application of memstream's stateful agents, one per processor, built from Settings.

A factory rather than faust-streaming's usual module-level ``app``: the app id names the consumer
group and the changelog topics, so it must follow the settings (a test run's topic prefix, a
deployment's), and a processor the host restarts gets a fresh app, never one half stopped.
"""

from __future__ import annotations

import faust
from faust.types import TransportT

from streams.pipeline.agents.transport import Transport
from streams.settings import Settings


class AgentsApp(faust.App):
    """A Faust app on memstream's Kafka transport (fetches that wait to fill, see
    :mod:`streams.pipeline.agents.transport`)."""

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)


def create_app(settings: Settings, name: str) -> faust.App:
    """A Faust app for the agent ``name``: consumer group ``settings.group(name)``, in-memory
    tables recovered from their changelog topics, no web server, at-least-once processing.

    Why these settings: the HTTP API is memstream's own (FastAPI on its loop), so Faust's aiohttp
    server stays off; ``memory://`` tables need no local disk to trust, since the changelog is
    the state's record (the one rule: the log is the truth); no standby replicas, since a
    memory:// table has no persisted offset and re-reads a partition's changelog from the start
    whenever the partition becomes active, so a standby copy would only cost memory and reads;
    and ``exactly_once`` stays off (its transactional mode has open bugs): the agents make
    redeliveries harmless themselves. ``producer_linger``: the changelog records of a batch go
    out in a few produce requests rather than one each (the broker shares the machine).
    """
    app_id = settings.group(name)
    datadir = settings.data_dir / "faust" / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    return AgentsApp(
        app_id,
        broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        table_standby_replicas=0,
        processing_guarantee="at_least_once",
        web_enabled=False,
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        datadir=datadir,
        producer_linger=0.05,
    )

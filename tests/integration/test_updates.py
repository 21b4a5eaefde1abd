"""Subscriptions on the real broker, through `memstream serve`: the SDK's Kafka subscription,
the SSE endpoint and the MCP server, all checked against the ops actually in the log.

One ingest (30 LoCoMo turns) is shared by the module: the subscribers start before it, two of
them drop out after a few updates and resume afterwards (consumer group, Last-Event-ID).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from mcp import Client, StdioServerParameters

from schemas import Codec
from streams.sdk import locomo
from streams.sdk.client import AsyncMemoryClient
from streams.sdk.local import ServeProcess
from streams.sdk.subscribe import MemoryUpdate, subscribe
from streams.settings import Settings
from streams.transport.topics import MEMORY_OPS, partition_for

pytestmark = pytest.mark.integration
TURNS = 30
DROP_AFTER = 5  # the resuming subscribers disconnect after this many updates


@dataclass
class Received:
    """What one subscriber got, with the wall time each update arrived."""

    updates: list[MemoryUpdate] = field(default_factory=list)
    at: list[float] = field(default_factory=list)

    def add(self, update: MemoryUpdate) -> None:
        self.updates.append(update)
        self.at.append(time.time())

    def events(self) -> list[tuple[str, int]]:
        return [(u.raw["event_id"], u.offset) for u in self.updates]

    def delays(self) -> list[float]:
        """Seconds from each op's Kafka timestamp (the writer's produce time, before its
        transaction commits) to its arrival."""
        return [at - u.timestamp_ms / 1000 for u, at in zip(self.updates, self.at, strict=True)]

    def max_delay(self) -> float:
        return max(self.delays())


@dataclass
class Scenario:
    cube: str
    other: str
    log: list[tuple[str, int]]  # (event id, offset) of the cube's ops, as the log holds them
    sdk: Received
    sse: Received
    other_sdk: Received
    sdk_resumed: tuple[Received, Received]
    sse_resumed: tuple[Received, Received]


def same_partition_cube(cube: str, partitions: int) -> str:
    """A different cube whose ops share ``cube``'s partition (so skipping them is tested)."""
    target = partition_for(cube, partitions)
    return next(
        c for i in range(10_000) if partition_for(c := f"{cube}-other-{i}", partitions) == target
    )


def log_of(settings: Settings, cube: str) -> list[tuple[str, int]]:
    """The cube's committed ops as a plain read_committed consumer sees its partition."""
    tp = TopicPartition(settings.topic(MEMORY_OPS.name), partition_for(cube, settings.partitions))
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"check-{uuid.uuid4().hex}",
                         "isolation.level": "read_committed",
                         "enable.auto.commit": False})  # fmt: skip
    try:
        _, end = consumer.get_watermark_offsets(tp, 10, cached=False)
        consumer.assign([TopicPartition(tp.topic, tp.partition, 0)])
        ops, codec = [], Codec()
        deadline = time.monotonic() + 30
        while consumer.position([tp])[0].offset < end and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                assert msg.error() is None, msg.error()
                if msg.key() == cube.encode():
                    op = codec.decode(msg.value(), reader=MEMORY_OPS.record).record
                    ops.append((op["event_id"], msg.offset()))
        return ops
    finally:
        consumer.close()


async def collect(updates: AsyncIterator[MemoryUpdate], into: Received, limit: int = 0) -> None:
    async for update in updates:
        into.add(update)
        if limit and len(into.updates) >= limit:
            return


async def until(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.1)


async def run_scenario(worker: ServeProcess) -> Scenario:
    s = worker.settings
    cube = f"subs-{uuid.uuid4().hex[:6]}"
    other = same_partition_cube(cube, s.partitions)
    sample = locomo.load()[0]
    turns = [i.model_dump(exclude={"cube_id"}) for i in islice(locomo.interactions(sample), TURNS)]
    http = AsyncMemoryClient(s.api_url)
    sdk, sse, other_sdk = Received(), Received(), Received()
    sdk_first, sdk_rest, sse_first, sse_rest = Received(), Received(), Received(), Received()
    group, resume_group = f"g-{uuid.uuid4().hex[:6]}", f"r-{uuid.uuid4().hex[:6]}"
    try:
        async with (
            subscribe(cube, group_id=group, settings=s) as sub,
            subscribe(other, settings=s) as other_sub,
            subscribe(cube, group_id=resume_group, settings=s) as dropping,
        ):
            start = sub.start_offset  # the SSE streams start where the SDK one did
            tasks = [
                asyncio.create_task(collect(sub, sdk)),
                asyncio.create_task(collect(other_sub, other_sdk)),
                asyncio.create_task(collect(dropping, sdk_first, DROP_AFTER)),
                asyncio.create_task(collect(http.updates(cube, since=start), sse)),
            ]
            async with aclosing(http.updates(cube, since=start)) as first:
                tasks.append(asyncio.create_task(collect(first, sse_first, DROP_AFTER)))
                await asyncio.sleep(1.0)  # the SSE requests are in (their start is explicit)
                for chunk in range(0, TURNS, 10):  # a live ingest: three batches
                    await asyncio.to_thread(worker.client.publish, cube, turns[chunk : chunk + 10])
                    await asyncio.sleep(0.3)
                await asyncio.to_thread(worker.client.wait_drained)
                log = await asyncio.to_thread(log_of, s, cube)
                await until(lambda: min(len(sdk.updates), len(sse.updates)) >= len(log), 30)
                await asyncio.sleep(1.0)  # anything extra (a duplicate) would arrive by now
                await dropping.aclose()  # (already stopped after DROP_AFTER updates)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        async with subscribe(cube, group_id=resume_group, settings=s) as resumed:
            rest = asyncio.create_task(collect(resumed, sdk_rest))
            last = sse_first.updates[-1].position
            again = asyncio.create_task(collect(http.updates(cube, last_event_id=last), sse_rest))
            await until(
                lambda: (
                    len(sdk_first.updates) + len(sdk_rest.updates) >= len(log)
                    and len(sse_first.updates) + len(sse_rest.updates) >= len(log)
                ),
                30,
            )
            await asyncio.sleep(1.0)
            for task in (rest, again):
                task.cancel()
            await asyncio.gather(rest, again, return_exceptions=True)
    finally:
        await http.aclose()
    return Scenario(
        cube, other, log, sdk, sse, other_sdk, (sdk_first, sdk_rest), (sse_first, sse_rest)
    )


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(settings, tmp_path_factory.mktemp("updates")).start()
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def scenario(worker: ServeProcess) -> Scenario:
    result = asyncio.run(run_scenario(worker))
    assert len(result.log) >= TURNS, "the ingest made fewer ops than turns"
    for name, got in (("SDK", result.sdk), ("SSE", result.sse)):
        ms = sorted(d * 1000 for d in got.delays())
        print(f"\n{name}: {len(ms)} ops, delay p50 {ms[len(ms) // 2]:.0f} ms, max {ms[-1]:.0f} ms")
    return result


def test_sdk_subscriber_gets_every_op_of_its_cube_once_in_order(scenario: Scenario) -> None:
    assert scenario.sdk.events() == scenario.log
    assert {u.cube_id for u in scenario.sdk.updates} == {scenario.cube}
    adds = [u for u in scenario.sdk.updates if u.op == "ADD"]
    assert adds and all(u.text and u.version == 1 for u in adds)
    assert all(u.generation == u.raw.get("generation") for u in scenario.sdk.updates)


def test_sse_subscriber_gets_every_op_of_its_cube_once_in_order(scenario: Scenario) -> None:
    assert scenario.sse.events() == scenario.log
    assert [u.position for u in scenario.sse.updates] == [u.position for u in scenario.sdk.updates]
    assert [u.text for u in scenario.sse.updates] == [u.text for u in scenario.sdk.updates]


def test_updates_arrive_within_two_seconds_of_the_op(scenario: Scenario) -> None:
    assert scenario.sdk.max_delay() <= 2.0
    assert scenario.sse.max_delay() <= 2.0


def test_a_subscriber_of_another_cube_on_the_same_partition_gets_none(
    worker: ServeProcess, scenario: Scenario
) -> None:
    partitions = worker.settings.partitions
    assert partition_for(scenario.other, partitions) == partition_for(scenario.cube, partitions)
    assert scenario.other_sdk.updates == []


def test_sdk_group_resumes_after_the_last_delivered_update(scenario: Scenario) -> None:
    first, rest = scenario.sdk_resumed
    assert len(first.updates) == DROP_AFTER
    assert first.events() + rest.events() == scenario.log


def test_sse_resumes_after_last_event_id(scenario: Scenario) -> None:
    first, rest = scenario.sse_resumed
    assert len(first.updates) == DROP_AFTER
    assert first.events() + rest.events() == scenario.log


def test_recent_updates_are_the_last_ops_of_the_cube(
    worker: ServeProcess, scenario: Scenario
) -> None:
    async def recent() -> list[MemoryUpdate]:
        http = AsyncMemoryClient(worker.settings.api_url)
        try:
            return await http.recent_updates(scenario.cube, limit=10)
        finally:
            await http.aclose()

    found = asyncio.run(recent())
    assert [(u.raw["event_id"], u.offset) for u in found] == scenario.log[-10:]


def test_mcp_server_lists_its_tools_and_searches(worker: ServeProcess, scenario: Scenario) -> None:
    memstream = Path(sys.executable).with_name("memstream")
    server = StdioServerParameters(
        command=str(memstream),
        args=["mcp", "--url", worker.settings.api_url],
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    texts = {u.memory_id: u.text for u in scenario.sdk.updates if u.text}

    async def session() -> tuple[set[str], dict, dict, list]:
        async with Client(server) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            found = await client.call_tool(
                "search", {"cube_id": scenario.cube, "query": "support group", "top_k": 3}
            )
            assert not found.is_error, found.content
            hit = found.structured_content["hits"][0]
            memory = await client.call_tool("get", {"memory_id": hit["memory_id"]})
            resource = await client.read_resource(f"memstream://cubes/{scenario.cube}/updates")
            return tools, hit, memory.structured_content, json.loads(resource.contents[0].text)

    tools, hit, memory, updates = asyncio.run(session())
    assert tools == {"add", "search", "get", "history"}
    assert hit["memory_id"] in texts and hit["text"] == texts[hit["memory_id"]]
    assert memory["memory_id"] == hit["memory_id"]
    assert [u["position"] for u in updates][-1] == scenario.sdk.updates[-1].position


def test_sse_stream_ends_cleanly_when_the_server_shuts_down(
    worker: ServeProcess, scenario: Scenario
) -> None:
    """Last in the module: it stops the shared worker."""

    async def stream_across_shutdown() -> tuple[list[MemoryUpdate], float]:
        http = AsyncMemoryClient(worker.settings.api_url)
        got: list[MemoryUpdate] = []
        try:
            since = scenario.log[-1][1]  # replays the cube's last op, then waits
            streaming = asyncio.create_task(collect(http.updates(scenario.cube, since=since),
                                                    received := Received()))  # fmt: skip
            await until(lambda: received.updates, 10)
            stopped = time.monotonic()
            await asyncio.to_thread(worker.stop)
            await asyncio.wait_for(streaming, 15)  # ends by itself: no exception, no hang
            got = received.updates
            return got, time.monotonic() - stopped
        finally:
            await http.aclose()

    got, took = asyncio.run(stream_across_shutdown())
    assert [(u.raw["event_id"], u.offset) for u in got] == scenario.log[-1:]
    # It stopped by itself (uvicorn re-raises the SIGTERM it handled), not by stop()'s SIGKILL.
    assert worker.proc is not None and worker.proc.returncode in (0, -signal.SIGTERM)
    assert took < 15

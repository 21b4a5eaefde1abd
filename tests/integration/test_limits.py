"""Every input checked at the door, nothing crashes by request (issue 29, findings 2b, 7, 8).

On the real broker and stores, through the HTTP API (uvicorn in this process, on a free port):
each input that answered 500 (or was taken without complaint) is now a 4xx with its reason, in
the shape the OpenAPI documents; an interaction produced straight to Kafka past the API's limits
is dead-lettered with a record cut to fit, and the writer goes on; update streams are capped per
client and in all (429 with Retry-After), and a closed stream frees its slot.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from confluent_kafka import Producer
from fastapi import FastAPI

from processors.extract import RuleExtractor
from schemas import Codec
from schemas.limits import (
    BATCH_ITEMS,
    BODY_BYTES,
    DEAD_LETTER_VALUE_BYTES,
    MEMORY_TEXT_BYTES,
    REASON_BYTES,
)
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.sdk.local import free_port
from streams.settings import Settings
from streams.transport.consumer import EventConsumer
from streams.transport.topics import DLQ, INTERACTIONS, ensure_topics

pytestmark = pytest.mark.integration
MAY_8 = "2023-05-08T13:56:00+00:00"
#: Small caps, so that the test holds few streams open.
PER_CLIENT, TOTAL = 2, 3


class Server:
    """A FastAPI app behind uvicorn in a thread, on a free port."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    s = settings.model_copy(update={
        "data_dir": tmp_path_factory.mktemp("limits"), "clickhouse_url": chdb_dsn,
        "topic_prefix": f"limits-{uuid.uuid4().hex[:8]}.",
        "sse_max_per_client": PER_CLIENT, "sse_max_streams": TOTAL,
    })  # fmt: skip
    ensure_topics(s)
    return build_runtime(s, "all", embedder=embedder_for(s), extractor=RuleExtractor())


@pytest.fixture(scope="module")
def server(runtime: Runtime) -> Iterator[Server]:
    with Server(create_app(runtime.settings, runtime)) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            wait(lambda: http.get("/readyz").status_code == 200, 120, "runtime never got ready")
        yield srv


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    # A fresh connection per request: a refused body may be left unread by the server.
    with httpx.Client(base_url=server.url, timeout=120, headers={"connection": "close"}) as c:
        yield c


def turn(**fields: Any) -> dict[str, Any]:
    return {"content": "I adopted a cat named Luna.", "speaker": "Caroline", **fields}


def refused(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """The response is ``status`` with a reason naming ``words``, in the documented shape: a
    422's detail is a list of {loc, msg, type}, every other refusal's a string."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    detail = body["detail"]
    if status == 422:
        assert isinstance(detail, list) and detail
        assert all({"loc", "msg", "type"} <= set(item) and "input" not in item
                   for item in detail)  # fmt: skip
        text = " ".join(" ".join(map(str, i["loc"])) + " " + i["msg"] for i in detail)
    else:
        assert isinstance(detail, str)
        text = detail
    for word in words:
        assert word in text, (word, text[:500])
    return body


# -- finding 7: what answered 500 ---------------------------------------------------------------


def test_speaker_cube_or_session_over_256_bytes_is_422(http: httpx.Client) -> None:
    long = "a" * 257
    cube = f"lim-{uuid.uuid4().hex[:6]}"
    refused(http.post(f"/v1/cubes/{cube}/interactions", json=[turn(speaker=long)]), 422,
            "speaker")  # fmt: skip
    refused(http.post(f"/v1/cubes/{cube}/interactions", json=[turn(session_id=long)]), 422,
            "session_id")  # fmt: skip
    refused(http.post(f"/v1/cubes/{long}/interactions", json=[turn()]), 422, "cube_id")
    # Bytes, not characters: 200 two-byte characters are 400 bytes.
    refused(http.post(f"/v1/cubes/{cube}/interactions", json=[turn(speaker="é" * 200)]), 422,
            "speaker", "400 bytes")  # fmt: skip
    refused(http.get(f"/v1/cubes/{long}/search", params={"q": "cat"}), 422, "cube_id")


def test_a_lone_surrogate_is_422_and_the_answer_is_valid_json(http: httpx.Client) -> None:
    cube = f"lim-{uuid.uuid4().hex[:6]}"
    raw = {"content-type": "application/json"}
    for body, field in [
        (b'[{"content": "a cat \\ud800", "speaker": "Caroline"}]', "content"),
        (b'[{"content": "a cat", "speaker": "Caro\\udfffline"}]', "speaker"),
        (b'[{"content": "a cat", "speaker": "C", "metadata": {"\\ud800": "x"}}]', "metadata"),
    ]:
        refused(http.post(f"/v1/cubes/{cube}/interactions", content=body, headers=raw), 422,
                field)  # fmt: skip
    command = b'{"memory_id": "m", "command": "ARCHIVE", "reason": "\\udc80"}'
    refused(http.post(f"/v1/cubes/{cube}/commands", content=command, headers=raw), 422, "reason")


def test_a_field_over_1mb_is_refused(http: httpx.Client) -> None:
    cube = f"lim-{uuid.uuid4().hex[:6]}"
    big = "x" * 1_100_000
    refused(http.post(f"/v1/cubes/{cube}/interactions", json=[turn(turn_id=big)]), 422,
            "turn_id")  # fmt: skip
    refused(http.post(f"/v1/cubes/{cube}/interactions", json=[turn(metadata={"k": big})]), 422,
            "metadata")  # fmt: skip
    refused(http.post(f"/v1/cubes/{cube}/interactions", json=[turn(content=big)]), 413,
            "content")  # fmt: skip
    command = {"memory_id": "m", "command": "ARCHIVE", "reason": big}
    refused(http.post(f"/v1/cubes/{cube}/commands", json=command), 422, "reason")
    refused(http.get(f"/v1/cubes/{cube}/search", params={"q": "y" * 20_000}), 422, "q")


def test_expected_version_beyond_32_bits_is_422(http: httpx.Client) -> None:
    command = {"memory_id": "m", "command": "ARCHIVE", "expected_version": 2**32}
    refused(http.post("/v1/cubes/lim/commands", json=command), 422, "expected_version")
    ok = http.post("/v1/cubes/lim/commands", json={**command, "expected_version": 2**31 - 1})
    assert ok.status_code == 202


def test_year_0001_in_since_or_as_of_is_refused(http: httpx.Client) -> None:
    year1 = "0001-01-01T00:00:00"
    refused(http.get("/v1/cubes/lim/search", params={"q": "cat", "since": year1}), 422, "since")
    refused(http.get("/v1/cubes/lim/search", params={"q": "cat", "until": year1}), 422, "until")
    refused(http.get("/v1/cubes/lim/search", params={"q": "cat", "as_of": year1}), 400, "1900")
    refused(http.get("/v1/cubes/lim/memories", params={"as_of": year1}), 400, "1900")
    refused(http.get("/v1/cubes/lim/updates", params={"since": year1}), 422, "since", "1900")


def test_an_offset_of_1e30_is_refused(http: httpx.Client) -> None:
    huge = str(10**30)
    refused(http.get("/v1/cubes/lim/search", params={"q": "cat", "as_of": huge}), 400, "offset")
    refused(http.get("/v1/cubes/lim/memories", params={"as_of": huge}), 400, "offset")
    refused(http.get("/v1/cubes/lim/updates", params={"since": huge}), 422, "since")
    # On the cube's own partition, and as digits the header's pattern allows.
    refused(http.get("/v1/cubes/lim/updates", headers={"Last-Event-ID": f"0:{2**63}"}), 400,
            "Last-Event-ID")  # fmt: skip
    refused(http.get("/v1/cubes/lim/updates", headers={"Last-Event-ID": f"0:{huge}"}), 422,
            "last-event-id")  # fmt: skip
    refused(http.get("/v1/cubes/lim/updates", params={"since": "²"}), 422, "since")


# -- finding 7: what was taken without complaint --------------------------------------------------


def test_event_times_outside_the_stores_range_are_422(http: httpx.Client) -> None:
    for when in ("9999-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "1899-12-31T23:59:59Z"):
        refused(http.post("/v1/cubes/lim/interactions", json=[turn(event_time=when)]), 422,
                "event_time")  # fmt: skip
    refused(http.post("/v1/cubes/lim/interactions", json=[turn(event_time=0)]), 422,
            "event_time")  # fmt: skip
    refused(http.post("/v1/cubes/lim/commands", json={"memory_id": "m", "command": "ARCHIVE",
                                                      "event_time": "9999-01-01T00:00:00Z"}),
            422, "event_time")  # fmt: skip


def test_a_batch_over_1000_items_is_422(http: httpx.Client) -> None:
    batch = [turn(content=f"fact {i}") for i in range(20_000)]
    refused(http.post("/v1/cubes/lim/interactions", json=batch), 422, "1000")
    assert len(batch[:BATCH_ITEMS]) == 1000


def test_a_24mb_body_is_413_before_it_is_read(http: httpx.Client) -> None:
    body = b"[" + b",".join([b'{"content": "' + b"x" * 200_000 + b'", "speaker": "C"}'] * 120)
    body += b"]"
    assert len(body) > 24_000_000 > BODY_BYTES
    refused(http.post("/v1/cubes/lim/interactions", content=body,
                      headers={"content-type": "application/json"}), 413, "limit")  # fmt: skip

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    refused(http.post("/v1/cubes/lim/interactions", content=chunked(),
                      headers={"content-type": "application/json"}), 413, "limit")  # fmt: skip


def test_blank_content_or_speaker_is_422(http: httpx.Client) -> None:
    refused(http.post("/v1/cubes/lim/interactions", json=[turn(content="   ")]), 422, "content")
    refused(http.post("/v1/cubes/lim/interactions", json=[turn(speaker=" \t")]), 422, "speaker")
    refused(http.post("/v1/cubes/%20/interactions", json=[turn()]), 422, "cube_id")


def test_a_cube_or_tag_with_a_control_character_is_422(http: httpx.Client) -> None:
    """Milvus reads them inside a string literal of its filter: a line break was a 500."""
    refused(http.get("/v1/cubes/a%0Ab/memories"), 422, "cube_id", "control character")
    refused(http.get("/v1/cubes/lim/search", params={"q": "cat", "tags": "x\ty"}), 422, "tags")


# -- finding 7: the memory text ------------------------------------------------------------------


def test_a_sentence_over_64_kib_becomes_memories_within_the_limit(http: httpx.Client) -> None:
    cube = f"lim-{uuid.uuid4().hex[:6]}"
    sentence = " ".join(f"word{i}" for i in range(22_000)) + " zebracrossing"  # ~200 KB
    assert len(sentence.encode()) > 3 * MEMORY_TEXT_BYTES
    body = [turn(content=sentence, event_time=MAY_8)]
    assert http.post(f"/v1/cubes/{cube}/interactions", json=body).status_code == 200
    wait(lambda: len(http.get(f"/v1/cubes/{cube}/memories").json()) >= 4, 60, "not all pieces")
    rows = http.get(f"/v1/cubes/{cube}/memories").json()
    assert all(len(r["text"].encode()) <= MEMORY_TEXT_BYTES for r in rows)
    assert any("zebracrossing" in r["text"] for r in rows)


# -- finding 2b: straight to Kafka ---------------------------------------------------------------


def test_a_1mb_metadata_interaction_is_dead_lettered_cut_and_the_writer_goes_on(
    runtime: Runtime, http: httpx.Client, group_id: str
) -> None:
    s = runtime.settings
    cube = f"lim-{uuid.uuid4().hex[:6]}"
    record = {"event_id": str(uuid.uuid4()), "cube_id": cube, "session_id": "s", "turn_id": None,
              "actor": "attacker", "speaker": "Mallory", "role": "USER", "content": "  ",
              "event_time": datetime(2023, 5, 8, tzinfo=UTC),
              "metadata": {"k": "v" * 1_000_000}}  # fmt: skip
    value = Codec().encode("Interaction", record)
    assert len(value) > 1_000_000  # over the producer's own limit as a dead letter, before
    sent: list[Any] = []
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "compression.type": "lz4",
                         "partitioner": "murmur2_random",
                         "message.max.bytes": 4_000_000})  # fmt: skip
    producer.produce(s.topic(INTERACTIONS.name), value=value, key=cube.encode(),
                     on_delivery=lambda err, msg: sent.append((err, msg)))  # fmt: skip
    producer.flush(30)
    [(err, msg)] = sent
    assert err is None
    # The positive control: a normal interaction right after it becomes searchable.
    assert http.post(f"/v1/cubes/{cube}/interactions",
                     json=[turn(content="After that, I adopted a dog named Rex.",
                                event_time=MAY_8)]).status_code == 200  # fmt: skip
    hits = wait(lambda: http.get(f"/v1/cubes/{cube}/search", params={"q": "dog Rex"}).json()
                ["hits"], 120, "the writer did not go on")  # fmt: skip
    assert "Rex" in hits[0]["text"]
    letter = None
    with EventConsumer([s.topic(DLQ.name)], group_id, s) as dlq:
        for _ in range(120):
            for e in dlq.poll_batch(100, 0.5):
                if (e.value["partition"], e.value["offset"]) == (msg.partition(), msg.offset()):
                    letter = e
            if letter is not None:
                break
    assert letter is not None, "no dead letter"
    assert letter.writer_version == 2
    dead = letter.value
    assert dead["value"] == value[:DEAD_LETTER_VALUE_BYTES]
    assert dead["value_bytes"] == len(value) and dead["key_bytes"] is None
    assert "empty content" in dead["error"] and f"of {len(value)} bytes" in dead["error"]
    assert len(dead["error"].encode()) <= REASON_BYTES
    status = http.get("/v1/status", params={"lag": "false"}).json()
    assert status["running"] and status["processors"]["reader"]["restarts"] == 0


# -- finding 8: update streams -------------------------------------------------------------------


def _stream(stack: ExitStack, url: str, source: str, cube: str) -> httpx.Response:
    client = stack.enter_context(httpx.Client(
        base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=source)))  # fmt: skip
    return stack.enter_context(client.stream("GET", f"/v1/cubes/{cube}/updates"))


def test_update_streams_over_the_caps_get_429_and_a_closed_stream_frees_its_slot(
    server: Server, runtime: Runtime
) -> None:
    cube = f"lim-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        mine = [_stream(stack, server.url, "127.0.0.1", cube) for _ in range(PER_CLIENT)]
        assert [r.status_code for r in mine] == [200] * PER_CLIENT
        over = _stream(stack, server.url, "127.0.0.1", cube)  # this client's cap
        assert over.status_code == 429 and int(over.headers["retry-after"]) > 0
        over.read()
        assert "client 127.0.0.1" in over.json()["detail"]
        other = _stream(stack, server.url, "127.0.0.2", cube)
        assert other.status_code == 200
        full = _stream(stack, server.url, "127.0.0.3", cube)  # the server's cap
        assert full.status_code == 429 and "retry-after" in full.headers
        full.read()
        assert f"maximum of {TOTAL}" in full.json()["detail"]

        mine[0].close()  # the client goes away: its stream ends and frees its slot

        def admitted() -> bool:
            with ExitStack() as probe:
                return _stream(probe, server.url, "127.0.0.3", cube).status_code == 200

        wait(admitted, 20, "the closed stream's slot was not freed")
    slots = server.app.state.update_streams
    wait(lambda: slots.held() == 0, 20, "slots still held after every stream closed")

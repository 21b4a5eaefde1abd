"""Chat with memory on the real broker, MinIO and stores, with the real SmolLM2 (few tokens).

The API runs in this process behind uvicorn on a free port, so the official ``openai`` client
talks to it over HTTP. Checked: the OpenAI-compatible endpoint streamed and not, with the cube's
relevant memory in the prompt; the turn published back and turned into memories that the next
chat retrieves; memstream's own SSE chat; the stored KV cache of an ACTIVATION memory reused as
the prefix (and a corrupted one refused and recomputed); clear 4xx errors; and the proxy mode,
where a fake OpenAI-compatible server (standing in for a hosted LLM) receives the memories.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from processors.commands import create_command
from processors.extract import RuleExtractor
from processors.lm import load_lm
from processors.ops import ACTIVATION_PAYLOAD
from processors.prompt import memory_prefix
from sinks.blobs import BlobStore, parse_uri
from streams.api.app import create_app
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.sdk.local import free_port
from streams.settings import Settings
from streams.transport.producer import EventProducer
from streams.transport.topics import COMMANDS, ensure_topics

pytestmark = pytest.mark.integration
TOKENS = 8
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
FACTS = [
    "I moved to Lisbon last month and I love the tram rides.",
    "My favourite food is grilled sardines with lemon.",
    "I am learning to play the cello with a teacher named Marta.",
]


class Server:
    """A FastAPI app behind uvicorn in a thread, on a free port."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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


def drained(http: httpx.Client) -> bool:
    status = http.get("/v1/status").json()
    return status["caught_up"] and not any(status["lag"].values())


def runtime_for(
    settings: Settings, data_dir: Any, chdb_dsn: str, prefix: str, **update: Any
) -> Runtime:
    s = settings.model_copy(update={"data_dir": data_dir, "clickhouse_url": chdb_dsn,
                                    "topic_prefix": prefix, **update})  # fmt: skip
    ensure_topics(s)
    return build_runtime(s, "all", embedder=embedder_for(s), extractor=RuleExtractor())


def ingest(http: httpx.Client, cube: str, facts: list[str], speaker: str = "Caroline") -> None:
    when = [(T0 + timedelta(minutes=i)).isoformat() for i in range(len(facts))]
    pairs = zip(facts, when, strict=True)
    body = [{"content": f, "speaker": speaker, "event_time": t} for f, t in pairs]
    assert http.post(f"/v1/cubes/{cube}/interactions", json=body).status_code == 200
    wait(lambda: drained(http), 120, "ingest not drained")


def memory_with(http: httpx.Client, cube: str, word: str) -> dict[str, Any]:
    rows = http.get(f"/v1/cubes/{cube}/memories").json()
    return next(r for r in rows if word in r["text"])


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    return runtime_for(settings, tmp_path_factory.mktemp("chat"), chdb_dsn,
                       f"chat-{uuid.uuid4().hex[:8]}.")  # fmt: skip


@pytest.fixture(scope="module")
def server(runtime: Runtime) -> Iterator[Server]:
    with Server(create_app(runtime.settings, runtime)) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            wait(lambda: http.get("/readyz").status_code == 200, 120, "runtime never got ready")
        yield srv


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def cube(http: httpx.Client) -> str:
    name = f"chat-{uuid.uuid4().hex[:6]}"
    ingest(http, name, FACTS)
    return name


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)


def test_openai_client_gets_an_answer_whose_prompt_holds_the_relevant_memory(
    http: httpx.Client, client: openai.OpenAI, cube: str
) -> None:
    lisbon = memory_with(http, cube, "Lisbon")
    assert http.get("/v1/status").json()["chat"]["lm"]["state"] in ("not loaded", "loaded")
    completion = client.chat.completions.create(
        model=f"memstream/{cube}",
        messages=[{"role": "user", "content": "Which city did I move to?"}],
        max_tokens=TOKENS,
        extra_body={"memstream": {"debug": True, "publish": False}},
    )
    assert completion.object == "chat.completion"
    assert completion.model == f"memstream/{cube}"
    [choice] = completion.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    ext = completion.model_extra["memstream"]
    assert lisbon["memory_id"] in ext["memory_ids"]
    assert ext["retrieved"][0]["memory_id"] == lisbon["memory_id"]  # the best hit for the question
    assert lisbon["text"] in ext["memories"] and lisbon["text"] in ext["prompt"]
    assert ext["prompt"].rstrip().endswith("<|im_start|>assistant")
    assert "Which city did I move to?" in ext["prompt"]
    assert 1 <= completion.usage.completion_tokens <= TOKENS
    assert completion.usage.prompt_tokens == ext["prompt_tokens"] > 20
    assert ext["prefix"]["source"] in ("computed", "process-cache")
    assert ext["published"] == []
    lm = http.get("/v1/status").json()["chat"]["lm"]
    assert lm["state"] == "loaded" and lm["model_id"] == "SmolLM2-135M-Instruct"
    assert len(lm["weights_sha256"]) == 64


def test_streamed_chat_becomes_memory_that_the_next_chat_retrieves(
    http: httpx.Client, client: openai.OpenAI, cube: str
) -> None:
    message = "My sister Beatriz is visiting me in Lisbon next June."
    stream = client.chat.completions.create(
        model=f"memstream/{cube}",
        messages=[{"role": "user", "content": message}],
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        user="Caroline",
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    ext = final.model_extra["memstream"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == ext["completion_tokens"] >= 1
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert text.strip() and len(pieces) <= ext["completion_tokens"]
    assert len(ext["published"]) == 2  # the user's message and the answer

    # The turn is on the log as interactions of the cube, and becomes its memories.
    wait(lambda: drained(http), 120, "the chat turn was not drained")
    rows = http.get(f"/v1/cubes/{cube}/memories").json()
    from_chat = [r for r in rows if r["source_event_id"] in ext["published"]]
    assert any("Beatriz" in r["text"] and "Caroline" in r["text"] for r in from_chat), from_chat
    beatriz = next(r for r in from_chat if "Beatriz" in r["text"])

    # The next chat retrieves what the last one said.
    again = client.chat.completions.create(
        model=f"memstream/{cube}",
        messages=[{"role": "user", "content": "Who is visiting me in June?"}],
        max_tokens=2,
        extra_body={"memstream": {"publish": False}},
    )
    assert beatriz["memory_id"] in again.model_extra["memstream"]["memory_ids"]


def test_native_chat_streams_sse_and_answers_json(http: httpx.Client, cube: str) -> None:
    body = {"message": "What food do I like?", "max_new_tokens": TOKENS, "publish": False}
    events: list[tuple[str, Any]] = []
    with http.stream("POST", f"/v1/cubes/{cube}/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        header_ids = response.headers["x-memstream-memory-ids"].split(",")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"} and len(kinds) >= 2
    done = events[-1][1]
    tokens = "".join(e["text"] for k, e in events if k == "token")
    assert done["answer"] == tokens.split("<|im_end|>")[0].strip()
    sardines = memory_with(http, cube, "sardines")
    assert sardines["memory_id"] in done["memory_ids"] and header_ids == [
        r["memory_id"] for r in done["retrieved"]
    ]
    assert {"retrieve_ms", "context_ms", "generate_ms", "total_ms"} <= set(done["timings_ms"])
    assert done["completion_tokens"] == len(kinds) - 1

    whole = http.post(f"/v1/cubes/{cube}/chat", json={**body, "stream": False})
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["answer"] == done["answer"]  # greedy: the same answer
    assert answer["memory_ids"] == done["memory_ids"]


def test_a_stored_kv_cache_is_reused_as_the_prefix_and_a_corrupted_one_refused(
    http: httpx.Client, client: openai.OpenAI, runtime: Runtime, cube: str
) -> None:
    s = runtime.settings
    lm = load_lm(s.effective_lm_dir, s.lm_model, threads=s.lm_threads or None)
    blobs = BlobStore.from_settings(s)
    cello = memory_with(http, cube, "cello")
    sardines = memory_with(http, cube, "sardines")

    def activation(memories: list[dict[str, Any]], day: int, supersedes: list[str]) -> dict:
        prefix = memory_prefix(lm, [m["text"] for m in memories])
        cache, tokens = lm.prefill(prefix)
        ids = [m["memory_id"] for m in memories]
        uri, sha, _ = blobs.put_kv_cache(lm, cache, prefix, memory_ids=ids)
        payload = {"uri": uri, "model_id": lm.model_id, "weights_sha256": lm.weights_sha256,
                   "token_count": tokens, "dtype": lm.dtype, "sha256": sha,
                   "memory_ids": ids}  # fmt: skip
        return create_command(cube, (ACTIVATION_PAYLOAD, payload), "test/0",
                              T0 + timedelta(days=day), supersedes=supersedes)  # fmt: skip

    def send(command: dict) -> None:
        with EventProducer(s) as producer:
            producer.publish(s.topic(COMMANDS.name), cube, COMMANDS.record, command)
        wait(lambda: http.get(f"/v1/memories/{command['memory_id']}").status_code == 200, 60,
             "the ACTIVATION memory was not created")  # fmt: skip

    def ask() -> dict[str, Any]:
        answer = client.chat.completions.create(
            model=f"memstream/{cube}",
            messages=[{"role": "user", "content": "Who teaches me the cello?"}],
            max_tokens=2,
            extra_body={"memstream": {"publish": False, "debug": True}},
        )
        return answer.model_extra["memstream"]

    first = activation([cello], 30, [])
    send(first)
    ext = ask()
    assert ext["prefix"]["source"] == "activation-memory"
    assert ext["prefix"]["activation_memory_id"] == first["memory_id"]
    assert ext["prefix"]["memory_ids"] == [cello["memory_id"]]
    assert ext["prefix"]["tokens"] == first["payload"][1]["token_count"]
    # The prefix memory is in the prompt once: the retrieved ones exclude it.
    assert ext["prompt"].count(cello["text"]) == 1
    assert ext["memory_ids"][0] == cello["memory_id"]

    # A newer cache whose object was changed after it was written: refused, recomputed.
    second = activation([sardines, cello], 31, [first["memory_id"]])
    uri = second["payload"][1]["uri"]
    data = bytearray(blobs.get_unverified(uri))
    data[-1] ^= 0xFF
    bucket, key, _ = parse_uri(uri)
    blobs.client.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
    send(second)
    ext = ask()
    assert ext["prefix"]["source"] in ("computed", "process-cache")
    assert second["memory_id"] in ext["prefix"]["detail"]
    assert "corrupted" in ext["prefix"]["detail"]
    assert cello["text"] in ext["prompt"]  # retrieved instead


def test_clear_client_errors(http: httpx.Client, client: openai.OpenAI, cube: str) -> None:
    user = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=user)
    with pytest.raises(openai.BadRequestError, match="not a cube name"):
        client.chat.completions.create(model="memstream/no spaces!", messages=user)
    with pytest.raises(openai.BadRequestError, match="messages is empty"):
        client.chat.completions.create(model=f"memstream/{cube}", messages=[])
    with pytest.raises(openai.BadRequestError, match="last message must be"):
        client.chat.completions.create(
            model=f"memstream/{cube}", messages=[{"role": "assistant", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="role 'tool'"):
        client.chat.completions.create(
            model=f"memstream/{cube}",
            messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}],
        )
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=f"memstream/{cube}", messages=user, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=f"memstream/{cube}", messages=user, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="X-Memstream-Cube"):
        client.chat.completions.create(model="memstream/other", messages=user,
                                       extra_headers={"X-Memstream-Cube": cube})  # fmt: skip
    bad = http.post("/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    native = http.post(f"/v1/cubes/{cube}/chat", json={"messages": [], "stream": False})
    assert native.status_code == 400 and "messages is empty" in native.json()["detail"]

    # The cube in the header: any model name, and `memstream` is listed with the cubes.
    answer = client.chat.completions.create(
        model="memstream", messages=user, max_tokens=1,
        extra_headers={"X-Memstream-Cube": cube}, extra_body={"memstream": {"publish": False}},
    )  # fmt: skip
    assert answer.model == f"memstream/{cube}" and answer.usage.completion_tokens == 1
    listed = {m.id for m in client.models.list()}
    assert {"memstream", f"memstream/{cube}"} <= listed
    assert client.models.retrieve(f"memstream/{cube}").id == f"memstream/{cube}"


# -- proxy mode -------------------------------------------------------------------------------


class FakeLLM:
    """A stand-in for a hosted OpenAI-compatible LLM: records requests, answers fixed text."""

    ANSWER = ("You ", "live ", "in ", "Porto.")

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        base = {"id": "fake-1", "created": 0, "model": body["model"]}
        if not body.get("stream"):
            return JSONResponse(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(self.ANSWER)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
                }
            )

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
            data = {**base, "object": "chat.completion.chunk", "choices": choices,
                    **({"usage": usage} if usage else {})}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            for piece in self.ANSWER:
                yield chunk({"content": piece})
            yield chunk({}, "stop")
            yield chunk({}, usage={"prompt_tokens": 11, "completion_tokens": 4,
                                   "total_tokens": 15})  # fmt: skip
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def test_proxy_mode_sends_the_memories_to_the_configured_endpoint(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str
) -> None:
    fake = FakeLLM()
    with Server(fake.app) as upstream:
        proxy = runtime_for(settings, tmp_path_factory.mktemp("chat-proxy"), chdb_dsn,
                            f"chatp-{uuid.uuid4().hex[:8]}.", llm_base_url=f"{upstream.url}/v1",
                            llm_model="hosted-model")  # fmt: skip
        with (
            Server(create_app(proxy.settings, proxy)) as srv,
            httpx.Client(base_url=srv.url, timeout=120) as http,
        ):
            wait(lambda: http.get("/readyz").status_code == 200, 120, "proxy runtime not ready")
            cube = f"proxy-{uuid.uuid4().hex[:6]}"
            ingest(http, cube, ["I moved to Porto in March and work at a bakery."])
            porto = memory_with(http, cube, "Porto")
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
            question = [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Where do I live?"}]  # fmt: skip
            whole = client.chat.completions.create(model=f"memstream/{cube}", messages=question)
            streamed = list(client.chat.completions.create(
                model=f"memstream/{cube}", messages=question, stream=True))  # fmt: skip
            status = http.get("/v1/status").json()["chat"]

            assert whole.choices[0].message.content == "You live in Porto."
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
                "You live in Porto."
            )
            assert len(fake.requests) == 2
            for sent in fake.requests:
                assert sent["model"] == "hosted-model"
                injected = sent["messages"][0]
                assert injected["role"] == "system" and porto["text"] in injected["content"]
                assert sent["messages"][1:] == question  # the client's conversation, as sent
            assert porto["memory_id"] in whole.model_extra["memstream"]["memory_ids"]
            assert whole.usage.prompt_tokens == 11 and whole.usage.completion_tokens == 4
            assert status["mode"] == "proxy" and status["lm"]["state"] == "not loaded"

            # The proxied turn is memory too.
            published = whole.model_extra["memstream"]["published"]
            final = next(c for c in streamed if c.choices and c.choices[0].finish_reason)
            assert len(published) == 2 and len(final.model_extra["memstream"]["published"]) == 2
            published += final.model_extra["memstream"]["published"]
            wait(lambda: drained(http), 120, "the proxied turn was not drained")
            rows = http.get(f"/v1/cubes/{cube}/memories").json()
            from_chat = [r for r in rows if r["source_event_id"] in published]
            assert any("You live in Porto." in r["text"] for r in from_chat), rows


def test_cli_and_sdk_chat_stream_from_the_running_api(server: Server, cube: str) -> None:
    from typer.testing import CliRunner

    from streams.cli.app import app
    from streams.sdk.client import MemoryClient

    result = CliRunner().invoke(app, ["chat", cube, "--message", "What do I play?", "--url",
                                      server.url, "--max-new-tokens", "4", "--no-publish",
                                      "--memories"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "memories, prefix" in result.output and "prompt +" in result.output
    assert "cello" in result.output  # the memory table lists the retrieved memory

    with MemoryClient(server.url) as memory:
        events = list(memory.chat(cube, "What do I play?", stream=True, max_new_tokens=3,
                                  publish=False))  # fmt: skip
        once = memory.chat(cube, "What do I play?", max_new_tokens=3, publish=False)
    assert [k for k, _ in events][-1] == "done" and events[-1][1]["answer"] == once["answer"]
    assert any("cello" in t for t in once["memories"])
    bad = CliRunner().invoke(app, ["chat", "no spaces!", "-m", "hi", "--url", server.url])
    assert bad.exit_code == 1 and "not a cube name" in bad.output


def test_the_cubes_adapter_is_applied_in_chat(
    http: httpx.Client, client: openai.OpenAI, runtime: Runtime, cube: str
) -> None:
    from processors.lora import BaseIdentity, LoraSettings, train_adapter
    from processors.ops import PARAMETER_PAYLOAD

    s = runtime.settings
    lm = load_lm(s.effective_lm_dir, s.lm_model, threads=s.lm_threads or None)
    cello = memory_with(http, cube, "cello")
    report = train_adapter(lm.model, lm.tokenizer, [cello["text"]], [cello["memory_id"]],
                           BaseIdentity(lm.model_id, lm.weights_sha256),
                           LoraSettings(rank=2, steps=1, max_tokens=32, batch_size=1))  # fmt: skip
    uri, sha = BlobStore.from_settings(s).put("adapter", report.adapter.data)
    payload = {"uri": uri, "base_model_id": lm.model_id, "base_weights_sha256": lm.weights_sha256,
               "rank": 2, "sha256": sha, "trained_on": [cello["memory_id"]]}  # fmt: skip
    command = create_command(cube, (PARAMETER_PAYLOAD, payload), "test/0", T0 + timedelta(days=40))
    with EventProducer(s) as producer:
        producer.publish(s.topic(COMMANDS.name), cube, COMMANDS.record, command)
    wait(lambda: http.get(f"/v1/memories/{command['memory_id']}").status_code == 200, 60,
         "the PARAMETER memory was not created")  # fmt: skip

    answer = client.chat.completions.create(
        model=f"memstream/{cube}",
        messages=[{"role": "user", "content": "Who teaches me the cello?"}],
        max_tokens=2,
        extra_body={"memstream": {"publish": False}},
    )
    ext = answer.model_extra["memstream"]
    assert ext["adapter"] == {"memory_id": command["memory_id"], "sha256": sha, "applied": True,
                              "detail": "applied"}  # fmt: skip
    # The stored cache was computed without the adapter: it does not fit, so it is recomputed.
    assert ext["prefix"]["source"] in ("computed", "process-cache")

"""LLMExtractor against a flaky OpenAI-compatible endpoint: retries, then the rules.

The endpoint is a fake on 127.0.0.1 (hosted LLM APIs are off this machine) that fails as
scripted, then answers. Failures carry a short ``Retry-After`` where the real client honours
one, so the client's own backoff is exercised without making the tests slow.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from processors.extract import LLMExtractor, MemoryItem, RuleExtractor

MEMORIES = {
    "memories": [
        {"text": "Caroline went to a support group on 7 May 2023.", "tags": ["Support Group"]},
        {"text": "Caroline lives in Boston.", "tags": ["Boston"], "key": "caroline/home"},
        {"text": ""},
    ]
}
EXPECTED = [
    MemoryItem("Caroline went to a support group on 7 May 2023.", ("support group",)),
    MemoryItem("Caroline lives in Boston.", ("boston",), "caroline/home"),
]
TURN = {
    "event_id": "e1",
    "cube_id": "cube",
    "speaker": "Caroline",
    "content": "I went to a support group yesterday. I now live in Boston, it is lovely.",
    "event_time": datetime(2023, 5, 8, 13, 56, tzinfo=UTC),
}


@dataclass
class Step:
    """How the fake answers one request: an HTTP status (200: ``content``), after a delay."""

    status: int = 200
    content: str = json.dumps(MEMORIES)
    delay: float = 0.0
    retry_after_ms: int | None = 10


@dataclass
class FakeEndpoint:
    """A chat-completions endpoint that plays ``script`` request by request, then ``rest``."""

    url: str = ""
    script: list[Step] = field(default_factory=list)
    rest: Step = field(default_factory=Step)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def next_step(self, request: dict[str, Any]) -> Step:
        self.requests.append(request)
        return self.script.pop(0) if self.script else self.rest


def _handler(fake: FakeEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            step = fake.next_step({"path": self.path, "body": body})
            time.sleep(step.delay)
            if step.status == 200:
                message = {"role": "assistant", "content": step.content}
                reply: dict[str, Any] = {"choices": [{"index": 0, "message": message}]}
            else:
                reply = {"error": {"message": f"scripted {step.status}", "type": "server_error"}}
            data = json.dumps(reply).encode()
            try:
                self.send_response(step.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if step.status != 200 and step.retry_after_ms is not None:
                    self.send_header("retry-after-ms", str(step.retry_after_ms))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left: that is the point of a delayed step

        def log_message(self, *args: object) -> None:
            return

    return Handler


@pytest.fixture
def fake() -> Iterator[FakeEndpoint]:
    endpoint = FakeEndpoint()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(endpoint))
    endpoint.url = f"http://127.0.0.1:{server.server_port}/v1"
    # A short poll interval: shutdown() waits for the loop to look, 0.5 s by default.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield endpoint
    server.shutdown()
    server.server_close()


def extractor(url: str, **options: Any) -> LLMExtractor:
    return LLMExtractor(url, "tiny", "sk-test", **{"timeout": 2.0, "max_retries": 2, **options})


@pytest.mark.parametrize(
    "failures",
    [
        [Step(500)],
        [Step(429), Step(503)],
        [Step(500, retry_after_ms=None)],  # no Retry-After: the client's exponential backoff
    ],
    ids=["500", "429-then-503", "500-backoff"],
)
def test_transient_errors_are_retried_until_the_endpoint_answers(
    fake: FakeEndpoint, failures: list[Step]
) -> None:
    fake.script = list(failures)
    llm = extractor(fake.url)
    assert llm.extract(TURN) == EXPECTED
    assert len(fake.requests) == len(failures) + 1
    assert {r["path"] for r in fake.requests} == {"/v1/chat/completions"}
    assert llm.fallbacks == 0


def test_a_timeout_is_retried(fake: FakeEndpoint) -> None:
    fake.script = [Step(delay=1.0)]
    llm = extractor(fake.url, timeout=0.2)
    assert llm.extract(TURN) == EXPECTED
    assert len(fake.requests) == 2


def test_an_endpoint_that_stays_down_falls_back_to_the_rules(
    fake: FakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    fake.rest = Step(500)
    llm = extractor(fake.url, cooldown=60.0)
    with caplog.at_level(logging.WARNING, logger="processors.extract"):
        items = llm.extract(TURN)
    assert items == RuleExtractor().extract(TURN)
    assert len(fake.requests) == 3  # the first try and two retries
    assert llm.fallbacks == 1
    assert "extracted by the rules instead, LLM skipped for 60s" in caplog.text

    # Within the cool-down the endpoint is not asked again: no interaction pays the retries.
    assert llm.extract(TURN) == items
    assert len(fake.requests) == 3
    assert llm.fallbacks == 2


def test_after_the_cooldown_the_endpoint_is_asked_again(fake: FakeEndpoint) -> None:
    fake.script = [Step(500), Step(500)]
    llm = extractor(fake.url, max_retries=1, cooldown=0.05)
    assert llm.extract(TURN) == RuleExtractor().extract(TURN)
    time.sleep(0.1)
    assert llm.extract(TURN) == EXPECTED
    assert len(fake.requests) == 3
    assert llm.fallbacks == 1


def test_a_refused_connection_falls_back_without_raising() -> None:
    with socket.socket() as reserved:  # bound, never listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        llm = extractor(f"http://127.0.0.1:{reserved.getsockname()[1]}/v1", max_retries=1)
        assert llm.extract(TURN) == RuleExtractor().extract(TURN)
    assert llm.fallbacks == 1


@pytest.mark.parametrize(
    "answer",
    [Step(400), Step(content="Sure! Caroline went to a support group."), Step(content="{}")],
    ids=["400", "not-json", "no-memories"],
)
def test_a_bad_request_or_answer_falls_back_for_that_interaction_only(
    fake: FakeEndpoint, answer: Step
) -> None:
    fake.script = [answer]
    llm = extractor(fake.url)
    assert llm.extract(TURN) == RuleExtractor().extract(TURN)
    assert len(fake.requests) == 1  # not retried: asking again would get the same answer
    assert llm.extract(TURN) == EXPECTED  # and the next interaction asks the LLM again
    assert llm.fallbacks == 1

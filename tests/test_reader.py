"""MemReader, extraction and dates without the broker: determinism and the rules."""

from __future__ import annotations

import json
import threading
import zlib
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import numpy as np
import pytest

from processors.dates import resolve
from processors.extract import LLMExtractor, RuleExtractor, split_sentences, subject_key
from processors.fusion import CubeMemories
from processors.reader import MemReader, Sourced

MAY_8 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


class HashEmbedder:
    """A deterministic stand-in for MiniLM: bag of hashed words, unit length."""

    model_id = "test/hash"
    dim = 64

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def interaction(content: str, event_id: str, at: datetime = MAY_8, speaker: str = "Caroline"):
    return {
        "event_id": event_id,
        "cube_id": "cube",
        "session_id": "s1",
        "turn_id": f"D1:{event_id}",
        "actor": "test",
        "speaker": speaker,
        "role": "USER",
        "content": content,
        "event_time": at,
        "metadata": {},
    }


@pytest.mark.parametrize(
    ("said", "expected"),
    [
        ("I went there yesterday", "yesterday (7 May 2023)"),
        ("We met last Friday", "last Friday (5 May 2023)"),
        ("I painted it two weeks ago", "two weeks ago (the week of 24 April 2023)"),
        ("I am moving next month", "next month (June 2023)"),
        ("Last year I ran a marathon", "Last year (2022)"),
        ("I start tomorrow", "tomorrow (9 May 2023)"),
        ("I visited 3 days ago", "3 days ago (5 May 2023)"),
        ("It was last weekend", "last weekend (the weekend of 6 May 2023)"),
    ],
)
def test_relative_dates(said: str, expected: str) -> None:
    text, dates = resolve(said, MAY_8)
    assert expected in text
    assert dates == [expected[expected.index("(") + 1 : -1]]


def test_sentences_and_subject_keys() -> None:
    assert split_sentences("I moved. Then I painted! Did you? Yes.") == [
        "I moved.",
        "Then I painted!",
        "Did you?",
        "Yes.",
    ]
    assert subject_key("Caroline", "I moved to Lisbon last month") == "caroline/home"
    assert subject_key("Caroline", "My favorite color is blue") == "caroline/favorite/color"
    assert subject_key("Mel", "I work as a nurse") == "mel/job"
    assert subject_key("Mel", "The weather is nice") is None


def test_rule_extractor_names_the_speaker_and_drops_filler() -> None:
    items = RuleExtractor().extract(
        interaction("Hey Mel! I went to a LGBTQ support group yesterday. It was powerful.", "e1")
    )
    assert [i.text for i in items] == [
        "Caroline said: I went to a LGBTQ support group yesterday (7 May 2023). It was powerful.",
        "Caroline said: I went to a LGBTQ support group yesterday (7 May 2023).",
    ]
    assert items[0].dates == items[1].dates == ("7 May 2023",)
    assert "lgbtq" in items[0].tags


def test_reprocessing_emits_nothing_new_and_a_fresh_reader_emits_identical_ops() -> None:
    batch = [
        Sourced(interaction("I moved to Boston for my studio. I paint every day now.", "e1")),
        Sourced(interaction("My favorite color is teal, it calms me down a lot.", "e2")),
        Sourced(interaction("I moved to Boston for my studio. I paint every day now.", "e3")),
        Sourced(interaction("I moved to Lisbon to be near the ocean.", "e4")),
    ]
    first = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    ops = first.process(batch)
    assert first.process(batch) == []
    again = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64)).process(batch)
    assert again == ops
    assert len({o["event_id"] for o in ops}) == len(ops)
    # e1: the turn and its keyed sentence; e2: one keyed turn; e3 repeats both of e1's; e4
    # supersedes the home fact (the sentence, not e1's whole turn).
    assert [o["op"] for o in ops] == ["ADD", "ADD", "ADD", "MERGE", "MERGE", "MERGE", "MERGE",
                                      "UPDATE", "ADD"]  # fmt: skip


def test_ops_of_a_crashed_batch_are_recognised_when_the_log_is_refolded() -> None:
    """The fold rebuilt from the log after a crash makes the reader skip what is done."""
    batch = [Sourced(interaction(f"I planted {n} tomato seedlings in the garden.", f"e{n}"))
             for n in range(5)]  # fmt: skip
    ops = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64)).process(batch)
    refolded = CubeMemories(64)
    for op in ops[:3]:
        refolded.apply(op)
    rest = MemReader(RuleExtractor(), HashEmbedder(), refolded).process(batch)
    assert rest == ops[3:]


class FakeOpenAI(BaseHTTPRequestHandler):
    """A local stand-in for an OpenAI-compatible chat endpoint (hosted LLMs are off-machine)."""

    requests: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        memories = {"memories": [{"text": "Caroline went to a support group on 7 May 2023.",
                                  "tags": ["Support Group"], "key": None}]}  # fmt: skip
        reply = {"choices": [{"message": {"role": "assistant", "content": json.dumps(memories)}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


def test_llm_extractor_speaks_the_openai_chat_api() -> None:
    server = HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        extractor = LLMExtractor(f"http://127.0.0.1:{server.server_port}/v1", "tiny", "sk-test")
        items = extractor.extract(interaction("I went to a support group yesterday.", "e1"))
    finally:
        server.shutdown()
    assert [i.text for i in items] == ["Caroline went to a support group on 7 May 2023."]
    assert items[0].tags == ("support group",)
    request = FakeOpenAI.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "tiny"
    assert "Monday 08 May 2023" in request["body"]["messages"][0]["content"]


def test_a_live_generation_with_settings_refused_today_still_starts_its_writer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pointer written by an older version may hold reader settings this one refuses: the
    writer runs with the deployment's instead of raising at every start (a crash loop)."""
    from streams.pipeline.reader import ReaderProcessor
    from streams.runtime.generations import Generation
    from streams.settings import Settings

    bad = Generation(id=1, ops=1, kind="reextract", reader={"merge_threshold": "abc"})
    settings = Settings(merge_threshold=0.9)
    writer = ReaderProcessor(settings, HashEmbedder(), RuleExtractor(), None, generation=bad)  # type: ignore[arg-type]
    assert writer.reader.merge_threshold == 0.9
    assert "reader settings are invalid" in caplog.text
    good = Generation(id=1, ops=1, kind="reextract", reader={"merge_threshold": 0.5})
    writer = ReaderProcessor(settings, HashEmbedder(), RuleExtractor(), None, generation=good)  # type: ignore[arg-type]
    assert writer.reader.merge_threshold == 0.5


def test_a_fact_repeated_many_times_merges_into_ops_of_bounded_size() -> None:
    """Each MERGE carried every earlier source event in caused_by: a sentence said a few
    thousand times made an op over the broker's message limit (the writer's transaction fails,
    every retry again). Now it carries the latest CAUSES; the lineage keeps the rest."""
    from schemas.limits import CAUSES

    reader = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    said = "My favorite color is teal, it calms me down a lot."
    ops = reader.process([Sourced(interaction(said, f"e{n}")) for n in range(CAUSES + 20)])
    merges = [o for o in ops if o["op"] == "MERGE" and o["supersedes"]]
    assert len(merges) == CAUSES + 19  # every repeat merged: the positive control
    assert max(len(o["caused_by"]) for o in merges) == CAUSES
    assert merges[-1]["caused_by"][-1] == f"e{CAUSES + 19}"  # the newest source is kept

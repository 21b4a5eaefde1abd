"""The BEAM loader (streams/sdk/beam.py) on a small conversation written here."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.sdk import beam


def _turn(i: int, role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "id": i, "content": content, **extra}


CHAT = [
    {
        "batch_number": 1,
        "time_anchor": None,
        "turns": [
            [
                _turn(
                    0,
                    "user",
                    "I keep my budget at $120 a month. ->-> 1,1",
                    time_anchor="March-15-2024",
                    index="1,1",
                ),
                _turn(1, "assistant", "Noted: $120 a month."),
            ],
            [
                _turn(2, "user", "Can we plan the sprint?\n->->  1,2"),
                _turn(3, "assistant", "Sure, two weeks. ->-> 1,2"),
            ],
        ],
    },
    {
        "batch_number": 2,
        "turns": [
            [
                _turn(
                    4,
                    "user",
                    "The sprint now ends on April 5 ->-> 2,N/A",
                    time_anchor="April-01-2024",
                ),
                _turn(5, "assistant", "Updated."),
                _turn(6, "user", "(thanks, and the demo too ->-> 2,3)"),
                _turn(7, "assistant", "Glad to help; a -> b -> c stays as it is."),
            ]
        ],
    },
]

QUESTIONS = {
    "knowledge_update": [
        {
            "question": "When does the sprint end?",
            "source_chat_ids": {"original_info": [2], "updated_info": [4, 4]},
        },
    ],
    "event_ordering": [
        {"question": "In what order?", "source_chat_ids": [0, 2, [4, 6]]},
    ],
    "abstention": [
        {"question": "What did my manager say?", "source_chat_ids": None},
        {"question": "Which bank?"},
    ],
    "information_extraction": [
        {"question": "What is my budget?", "source_chat_ids": [0, 99]},  # 99: no such turn
    ],
}


def _write(folder: Path, chat: list[dict[str, Any]], truncated: list | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "chat.json").write_text(json.dumps(chat))
    if truncated is not None:
        (folder / "chat_trunecated.json").write_text(json.dumps(truncated))
    (folder / "probing_questions.json").write_text(json.dumps(QUESTIONS))
    return folder


def test_markers_are_cut_and_roles_become_speakers(tmp_path: Path) -> None:
    sample = beam.load_one(_write(tmp_path / "1", CHAT))
    assert sample.sample_id == "beam-1"
    texts = {t.turn_id: t.content for t in sample.turns}
    assert texts["0"] == "I keep my budget at $120 a month."
    assert texts["2"] == "Can we plan the sprint?"
    assert texts["3"] == "Sure, two weeks."  # an assistant turn's marker too
    assert texts["4"] == "The sprint now ends on April 5"
    assert texts["6"] == "(thanks, and the demo too"
    assert texts["7"] == "Glad to help; a -> b -> c stays as it is."
    interactions = list(beam.interactions(sample, "cube-x"))
    assert [(i.speaker, i.role) for i in interactions[:2]] == [
        ("user", "USER"),
        ("assistant", "ASSISTANT"),
    ]
    assert {i.cube_id for i in interactions} == {"cube-x"}
    assert [i.turn_id for i in interactions] == [str(n) for n in range(8)]
    assert interactions[0].session_id == "beam-1/batch_1"
    assert interactions[4].session_id == "beam-1/batch_2"
    assert all("->->" not in i.content for i in interactions)


def test_time_anchors_carry_forward_a_minute_a_turn(tmp_path: Path) -> None:
    sample = beam.load_one(_write(tmp_path / "1", CHAT))
    times = [t.event_time for t in sample.turns]
    march, april = datetime(2024, 3, 15, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC)
    assert times[:4] == [march + timedelta(minutes=n) for n in range(4)]
    assert times[4:] == [april + timedelta(minutes=n) for n in range(4)]
    assert times == sorted(times)


def test_without_anchors_the_base_date_keeps_the_order(tmp_path: Path) -> None:
    bare = [
        {
            "batch_number": 1,
            "turns": [
                [
                    _turn(i, "user" if i % 2 == 0 else "assistant", f"turn {i} ->-> 1,{i}")
                    for i in range(5)
                ]
            ],
        }
    ]
    sample = beam.load_one(_write(tmp_path / "7", bare))
    assert [t.event_time for t in sample.turns] == [
        beam.BASE_TIME + timedelta(minutes=n) for n in range(5)
    ]


def test_evidence_is_flattened_and_questions_without_it_are_kept(tmp_path: Path) -> None:
    sample = beam.load_one(_write(tmp_path / "1", CHAT))
    by_key = {q.key: q for q in sample.questions}
    assert by_key["knowledge_update/0"].gold == ("2", "4")  # a dict of lists, each id once
    assert by_key["event_ordering/0"].gold == ("0", "2", "4", "6")  # nested lists
    assert by_key["information_extraction/0"].gold == ("0",)  # 99 names no turn
    assert by_key["abstention/0"].gold == ()
    assert by_key["abstention/1"].gold == ()  # no source_chat_ids at all
    assert len(sample.questions) == 5
    assert beam.flatten({"a": [1, [2, "3"]], "b": 1}) == ["1", "2", "3"]


def test_the_truncated_chat_is_preferred(tmp_path: Path) -> None:
    prefix = [{"batch_number": 1, "turns": [CHAT[0]["turns"][0]]}]
    folder = _write(tmp_path / "5", CHAT, truncated=prefix)
    sample = beam.load_one(folder)
    assert sample.chat_file.name == "chat_trunecated.json"
    assert [t.turn_id for t in sample.turns] == ["0", "1"]
    # evidence outside the prefix names no turn there
    assert {q.key: q.gold for q in sample.questions}["knowledge_update/0"] == ()


def test_load_reads_every_conversation_in_numeric_order(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        _write(tmp_path / str(n), CHAT)
    (tmp_path / "notes").mkdir()  # a folder without a chat is not a conversation
    assert [s.sample_id for s in beam.load(tmp_path)] == ["beam-1", "beam-2", "beam-10"]
    assert [s.sample_id for s in beam.load(tmp_path / "2")] == ["beam-2"]


def test_bench_quality_counts_questions_without_evidence_apart(tmp_path: Path) -> None:
    from bench.quality import load_beam, summarise

    _write(tmp_path / "3", CHAT)
    benchmark = load_beam(tmp_path)
    (conversation,) = benchmark.conversations
    assert conversation.name == "beam-3"
    assert [i.turn_id for i in conversation.interactions("c")] == [str(n) for n in range(8)]
    assert conversation.turns[0] == ("0", "user: I keep my budget at $120 a month.")
    keys = [a.key for a in conversation.questions]
    assert len(set(keys)) == len(keys) == 5
    assert "beam-3#abstention/1" in keys
    rows = [None if not a.gold else {"recall@10": 1.0} for a in conversation.questions]
    groups = {"overall": rows, "abstention": rows[2:4], "beam-3": rows}
    summary = summarise(groups, ["beam-3"])
    assert list(summary) == ["overall", "abstention", "beam-3"]
    assert summary["overall"] == {"questions": 5, "scored": 3, "recall@10": 1.0}
    assert summary["abstention"] == {"questions": 2, "scored": 0}

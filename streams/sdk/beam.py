"""Reading conversations in BEAM's format as memstream interactions, with their time anchors.

BEAM ("Beyond a Million Tokens", Tavakoli et al., 2025) stores each conversation as a folder:
``chat.json`` (a list of batches ``{batch_number, turns: [[{role, id, content, time_anchor?,
index?}, ...]]}``), maybe ``chat_trunecated.json`` (sic; a prefix of ``chat.json``, the one
BEAM's own answer generation reads: used where it exists) and ``probing_questions.json``
(category -> questions; turn-level evidence in ``source_chat_ids``, a list of turn ids or a dict
of lists).

A turn becomes an :class:`Interaction` with speaker "user" or "assistant" (role USER or
ASSISTANT), its turn id the turn's ``id`` (its position in the whole conversation), its session
the batch. The marker "->-> 1,1" that ends generated user turns (and a few assistant turns) is
an artefact, not text anyone wrote: it is cut. Event times: a turn with a ``time_anchor``
("March-15-2024") starts that day; the turns after it keep the last anchor's day, a minute
apart; before any anchor, ``BASE_TIME`` plus the turn's index in minutes, so the order of the
turns always holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from streams.transport.events import Interaction

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "beam" / "100K"
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
SECONDS_PER_TURN = 60
CHAT = "chat.json"
TRUNCATED = "chat_trunecated.json"  # sic, as BEAM names it
QUESTIONS = "probing_questions.json"
CATEGORIES = (
    "abstention",
    "contradiction_resolution",
    "event_ordering",
    "information_extraction",
    "instruction_following",
    "knowledge_update",
    "multi_session_reasoning",
    "preference_following",
    "summarization",
    "temporal_reasoning",
)
#: "... ->-> 1,1", "->->  3,8", "->-> 2,N/A", "->-> 5,14)": from the marker to the end.
_MARKER = re.compile(r"\s*->->[^\n]*\s*\Z")
_ROLES: dict[str, Literal["USER", "ASSISTANT"]] = {"user": "USER", "assistant": "ASSISTANT"}


@dataclass(frozen=True)
class Turn:
    turn_id: str
    role: Literal["USER", "ASSISTANT"]
    content: str
    batch: int
    event_time: datetime

    @property
    def speaker(self) -> str:
        return self.role.lower()


@dataclass(frozen=True)
class Question:
    category: str
    index: int  # its position within the category
    question: str
    gold: tuple[str, ...]  # evidence turn ids; empty: none (abstention and a few others)
    raw: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.category}/{self.index}"


@dataclass(frozen=True)
class Sample:
    sample_id: str
    turns: list[Turn]
    questions: list[Question]
    chat_file: Path


def default_folder() -> Path:
    return DEFAULT_DATA


def strip_marker(text: str) -> str:
    """``text`` without the trailing generation marker ("->-> 1,1")."""
    return _MARKER.sub("", text)


def parse_anchor(text: str) -> datetime:
    """'March-15-2024' -> an aware UTC datetime at the start of that day."""
    return datetime.strptime(text.strip(), "%B-%d-%Y").replace(tzinfo=UTC)


def chat_file(folder: Path) -> Path:
    """The truncated chat where the conversation has one, else the whole chat."""
    truncated = folder / TRUNCATED
    return truncated if truncated.exists() else folder / CHAT


def flatten(ids: Any) -> list[str]:
    """Turn ids from ``source_chat_ids``: an id, a list, a dict of lists, nested any way;
    each once, in order of appearance."""
    out: dict[str, None] = {}

    def walk(value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, int | str):
            if str(value).strip():
                out.setdefault(str(value).strip())
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(ids)
    return list(out)


def evidence(question: dict[str, Any], known: set[str] | None = None) -> list[str]:
    """The gold turn ids of a question; ids that name no turn are dropped when ``known`` is
    given."""
    return [i for i in flatten(question.get("source_chat_ids")) if known is None or i in known]


def read_turns(path: Path) -> list[Turn]:
    """Every USER / ASSISTANT turn of a chat file, in order, with its event time."""
    turns: list[Turn] = []
    anchor: tuple[datetime, int] | None = None  # the last anchor's day, and its turn's index
    position = 0
    for batch in json.loads(path.read_text()):
        number = int(batch.get("batch_number") or 0)
        if batch.get("time_anchor"):
            anchor = (parse_anchor(batch["time_anchor"]), position)
        for group in batch.get("turns") or []:
            for turn in group:
                role = _ROLES.get(str(turn.get("role", "")).lower())
                if role is None:
                    continue
                if turn.get("time_anchor"):
                    anchor = (parse_anchor(turn["time_anchor"]), position)
                start, first = anchor or (BASE_TIME, 0)
                content = strip_marker(str(turn.get("content") or ""))
                if not content.strip():  # nothing a user or an assistant wrote
                    position += 1
                    continue
                turns.append(Turn(
                    turn_id=str(turn.get("id", position)), role=role, content=content,
                    batch=number, event_time=start + timedelta(
                        seconds=SECONDS_PER_TURN * (position - first)),
                ))  # fmt: skip
                position += 1
    return turns


def read_questions(path: Path, known: set[str] | None = None) -> list[Question]:
    raw = json.loads(path.read_text()) if path.exists() else {}
    out = []
    for category, questions in raw.items():
        for index, q in enumerate(questions):
            out.append(Question(category, index, q["question"], tuple(evidence(q, known)), q))
    return out


def load_one(folder: Path | str, sample_id: str | None = None) -> Sample:
    folder = Path(folder)
    path = chat_file(folder)
    turns = read_turns(path)
    questions = read_questions(folder / QUESTIONS, {t.turn_id for t in turns})
    return Sample(sample_id or f"beam-{folder.name}", turns, questions, path)


def load(path: Path | str | None = None) -> list[Sample]:
    """Every conversation under ``path`` (a folder of ``<n>/`` folders, in numeric order), or
    the one conversation ``path`` is."""
    root = Path(path or default_folder())
    if (root / CHAT).exists() or (root / TRUNCATED).exists():
        return [load_one(root)]
    folders = [p for p in root.iterdir() if p.is_dir() and ((p / CHAT).exists()
               or (p / TRUNCATED).exists())]  # fmt: skip
    folders.sort(key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0,
                                p.name))  # fmt: skip
    return [load_one(p) for p in folders]


def turn_ids(sample: Sample) -> set[str]:
    return {t.turn_id for t in sample.turns}


def interactions(sample: Sample, cube_id: str | None = None) -> Iterator[Interaction]:
    """Every turn of the sample as an Interaction, in order."""
    cube = cube_id or sample.sample_id
    for turn in sample.turns:
        yield Interaction(
            cube_id=cube,
            session_id=f"{sample.sample_id}/batch_{turn.batch}",
            turn_id=turn.turn_id,
            speaker=turn.speaker,
            role=turn.role,
            content=turn.content,
            actor="beam-loader",
            event_time=turn.event_time,
        )

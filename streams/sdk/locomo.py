"""Reading conversations in LoCoMo's format as memstream interactions, with their real times.

LoCoMo (Maharana et al., 2024) stores each sample as ``conversation`` (``session_N`` lists of turns
and ``session_N_date_time`` strings such as "1:56 pm on 8 May, 2023") and ``qa``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.transport.events import Interaction

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "locomo"
SECONDS_PER_TURN = 30
_SESSION = re.compile(r"^session_(\d+)$")


@dataclass(frozen=True)
class Sample:
    sample_id: str
    conversation: dict[str, Any]
    qa: list[dict[str, Any]]


def default_file() -> Path:
    return DEFAULT_DATA / "locomo_dev.json"


def load(path: Path | str | None = None) -> list[Sample]:
    raw = json.loads(Path(path or default_file()).read_text())
    return [Sample(s["sample_id"], s["conversation"], s.get("qa", [])) for s in raw]


def parse_session_time(text: str) -> datetime:
    """'1:56 pm on 8 May, 2023' -> an aware UTC datetime."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def sessions(sample: Sample) -> list[int]:
    numbers = [int(m[1]) for key in sample.conversation if (m := _SESSION.match(key))]
    return sorted(numbers)


def interactions(
    sample: Sample, cube_id: str | None = None, max_sessions: int | None = None
) -> Iterator[Interaction]:
    """Every turn of the sample as an Interaction, in order, ``SECONDS_PER_TURN`` apart."""
    cube = cube_id or f"locomo-{sample.sample_id}"
    for number in sessions(sample)[:max_sessions]:
        start = parse_session_time(sample.conversation[f"session_{number}_date_time"])
        for index, turn in enumerate(sample.conversation[f"session_{number}"]):
            text = turn["text"]
            if turn.get("blip_caption"):
                text = f"{text} [shares a photo: {turn['blip_caption']}]"
            yield Interaction(
                cube_id=cube,
                session_id=f"{sample.sample_id}/session_{number}",
                turn_id=turn["dia_id"],
                speaker=turn["speaker"],
                content=text,
                actor="locomo-loader",
                event_time=start + timedelta(seconds=SECONDS_PER_TURN * index),
            )


CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
_EVIDENCE = re.compile(r"D:?(\d+):0*(\d+)")


def turn_ids(sample: Sample) -> set[str]:
    return {t["dia_id"] for n in sessions(sample) for t in sample.conversation[f"session_{n}"]}


def evidence(qa: dict[str, Any], known: set[str] | None = None) -> list[str]:
    """The gold turn ids of a question, normalised ('D8:6; D9:17', 'D:11:26', 'D30:05');
    ids that name no turn of the conversation are dropped when ``known`` is given."""
    ids: dict[str, None] = {}
    for raw in qa.get("evidence") or []:
        for part in re.split(r"[;,]", str(raw)):
            match = _EVIDENCE.search(part)
            if match:
                ids.setdefault(f"D{match[1]}:{match[2]}")
    return [i for i in ids if known is None or i in known]

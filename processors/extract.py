"""MemReader's extraction step: an interaction in, self-contained memory items out.

Two extractors share one interface. :class:`RuleExtractor` is the fast offline default: sentence
segmentation, the speaker named in every item, relative dates resolved against the event time,
keywords as tags, a subject key for facts that change (where someone lives, works, what they
like). :class:`LLMExtractor` asks any OpenAI-compatible chat endpoint for the same items as JSON,
and falls back to the rules for an interaction when the endpoint fails.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import openai
from openai import OpenAI

from processors.dates import resolve
from schemas.limits import KEY_BYTES, MEMORY_TEXT_BYTES, NAME_BYTES, TAG_BYTES, TAGS, cut_utf8

READER_VERSION = "rules/2"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryItem:
    """One memory a reader found in an interaction."""

    text: str
    tags: tuple[str, ...] = ()
    key: str | None = None
    dates: tuple[str, ...] = field(default=(), compare=False)


class Extractor(Protocol):
    """Turns one interaction (the decoded Interaction record) into memory items."""

    name: str

    def extract(
        self, interaction: dict[str, Any], previous: Turn | None = None
    ) -> list[MemoryItem]:
        """``previous``: the turn before this one in its session, if the reader knows it."""
        ...


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+")
_FILLER = re.compile(
    r"^(?:hey|hi|hello|wow|thanks|thank you|cool|awesome|great|nice|yeah|yes|no|ok|okay|sure|"
    r"haha|lol|bye|see you|take care|totally|absolutely|definitely|same|aw+|oh|omg)\b"
    r"[\s\w,!.']{0,25}$",
    re.IGNORECASE,
)
# A yes or no is filler on its own, and the answer itself after a question.
_ANSWER = re.compile(r"^(?:yes|yeah|yep|no|nope|sure|definitely|absolutely|of course)\b", re.I)
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each even ever every
    few for from further get gets getting go going gone got had has have having he her here hers
    herself him himself his how i i'm i've i'd i'll if in into is it it's its itself just know
    let like made make many me more most much must my myself never new no nor not now of off
    often on once one only or other our ours ourselves out over own really said same say see she
    should so some something still such sure than that that's the their theirs them themselves
    then there these they thing things think this those though through to too under until up
    us very want was we well were what when where which while who whom why will with would yeah
    yes you you're your yours yourself yourselves lot lots way always kind bit pretty gonna
    wanna thanks thank hey hi wow glad happy love great good awesome cool amazing""".split()
)

# Facts that a newer statement replaces, by subject: (attribute, pattern on the sentence).
KEY_PATTERNS: Sequence[tuple[str, re.Pattern[str]]] = [
    ("home", re.compile(r"\b(?:moved|moving|relocat\w*) to\b|\b(?:i|we) (?:now )?live in\b", re.I)),
    (
        "job",
        re.compile(
            r"\b(?:i|i'm|i am) (?:now )?(?:work(?:ing)? (?:as|at|for)|employed)\b|"
            r"\bmy (?:new )?job\b|\bstarted (?:a new job|working)\b",
            re.I,
        ),
    ),
    (
        "relationship",
        re.compile(r"\b(?:i'm|i am|i got) (?:now )?(?:single|married|engaged|divorced)\b", re.I),
    ),
]
_RESOLVED = re.compile(r"\(([^()]*\d{4})\)")
_FAVORITE = re.compile(
    r"\bmy (?:all-time )?fav(?:ou?rite)? (?P<what>[a-z]+(?: [a-z]+)?) is\b", re.I
)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


#: Room in a memory's text for what the rules put around a piece of the turn: the speaker
#: (at most ``NAME_BYTES``) and " asked: ".
_HEAD_BYTES = NAME_BYTES + 16
#: The longest piece of a turn in one memory: with its head it fits Milvus' ``text``.
PIECE_BYTES = MEMORY_TEXT_BYTES - _HEAD_BYTES
_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def cut_text(text: str, max_bytes: int) -> list[str]:
    """``text`` in pieces of at most ``max_bytes`` of UTF-8 each: cut at the last whitespace
    that keeps a piece within the limit, else (one word longer than the limit) at the last
    character boundary within it, never inside a character. A text within the limit is one
    piece, as it is."""
    if max_bytes < 4:
        raise ValueError(f"a piece of {max_bytes} bytes may not hold one character")
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return [text]
    pieces: list[str] = []
    while len(data) > max_bytes:
        end = max_bytes
        while end > 0 and data[end] not in _SPACE and data[end - 1] not in _SPACE:
            end -= 1
        if end == 0:  # no whitespace: the last character boundary
            end = max_bytes
            while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                end -= 1
        piece = data[:end].decode("utf-8").strip()
        if piece:
            pieces.append(piece)
        data = data[end:].lstrip()
    if data:
        pieces.append(data.decode("utf-8"))
    return pieces


def fit(items: list[MemoryItem]) -> list[MemoryItem]:
    """Items within the stores' limits: a text over ``MEMORY_TEXT_BYTES`` becomes items of its
    pieces (:func:`cut_text`; the key stays with the first), tags over ``TAG_BYTES`` are left
    out and at most ``TAGS`` kept, a key is cut to ``KEY_BYTES``."""
    out = []
    for item in items:
        tags = tuple(t for t in item.tags if len(t.encode("utf-8", "replace")) <= TAG_BYTES)
        key = cut_utf8(item.key, KEY_BYTES) if item.key else item.key
        for i, piece in enumerate(cut_text(item.text, MEMORY_TEXT_BYTES)):
            out.append(MemoryItem(piece, tags[:TAGS], key if i == 0 else None, item.dates))
    return out


def keywords(text: str, limit: int = 8) -> list[str]:
    """Distinct content words, proper names first, lower-cased."""
    words = _WORD.findall(text)
    names = [w for i, w in enumerate(words) if w[0].isupper() and i > 0]
    picked: dict[str, None] = {}
    for word in [*names, *words]:
        lowered = word.lower().strip("'-")
        if len(lowered) >= 3 and "'" not in lowered and lowered not in STOPWORDS:
            picked.setdefault(lowered)
    return list(picked)[:limit]


def subject_key(speaker: str, sentence: str) -> str | None:
    """``<speaker>/<attribute>`` for a sentence that states a fact a newer one may replace."""
    base = speaker.strip().lower()
    favorite = _FAVORITE.search(sentence)
    if favorite:
        return f"{base}/favorite/{favorite['what'].lower()}"
    for attribute, pattern in KEY_PATTERNS:
        if pattern.search(sentence):
            return f"{base}/{attribute}"
    return None


@dataclass(frozen=True)
class Turn:
    """The turn before an interaction in its session, as the reader remembers it: who spoke and
    their own words (dates resolved), recovered from that turn's memory by :func:`own_words`."""

    speaker: str
    text: str
    asked: bool = False


_CONTEXT = " (replying to "
_QUESTION = re.compile(r"\?[\"')\]]*$")


def own_words(memory_text: str) -> Turn:
    """The speaker and own words of a memory the rules wrote (its reply context removed)."""
    head, _, _ = memory_text.partition(_CONTEXT)
    speaker, sep, said = head.partition(" said: ")
    if sep:
        return Turn(speaker, said)
    speaker, sep, said = head.partition(" asked: ")
    return Turn(speaker, said, asked=True) if sep else Turn("", head)


def chunks(sentences: list[str], limit: int, max_bytes: int = PIECE_BYTES) -> list[str]:
    """Consecutive sentences joined into pieces of at most ``limit`` words and ``max_bytes`` of
    UTF-8 (a longer sentence is a piece of its own; cut it first with :func:`cut_text`)."""
    pieces: list[list[str]] = [[]]
    size = nbytes = 0
    for sentence in sentences:
        words = len(sentence.split())
        length = len(sentence.encode("utf-8", "replace")) + 1
        if pieces[-1] and (size + words > limit or nbytes + length > max_bytes):
            pieces.append([])
            size = nbytes = 0
        pieces[-1].append(sentence)
        size += words
        nbytes += length
    return [" ".join(p) for p in pieces]


def is_question(text: str) -> bool:
    return bool(_QUESTION.search(text.strip()))


class RuleExtractor:
    """Offline extraction: one memory per turn that says something, told so it stands alone.

    - A turn is one memory, not one per sentence: its sentences explain each other ("I made
      something to catch the eye" is about the pottery named a sentence before), and one text
      per turn is what the embedder pays for.
    - A reply carries the turn it answers (the session's previous turn, by someone else):
      "Melanie said: Yeah, last year! (replying to Caroline: Did you paint that sunrise?)". A
      short answer means nothing without its question, and the question's words are what a later
      search uses. A turn that only asks is stored as asked (search may rank it as context).
    - A sentence of several that states a changing fact (home, job, a favourite) is also a
      memory of its own, with a subject key, so that a newer statement supersedes that fact and
      not the turn; so is one that names a date: "when" questions ask for that one event.
    - A turn longer than ``chunk_words`` (a pasted note, a long story) is cut between sentences
      into memories of up to that many words, the first carrying the reply context: the
      embedder reads 256 tokens of a text, no more.
    - Filler ("Thanks!", "Wow, cool") and turns without words are not memories; a "yes" or
      "no" is kept when it answers a question.
    """

    name = READER_VERSION

    def __init__(self, context_words: int = 60, chunk_words: int = 120) -> None:
        self.context_words = context_words
        self.chunk_words = chunk_words

    def extract(
        self, interaction: dict[str, Any], previous: Turn | None = None
    ) -> list[MemoryItem]:
        speaker = interaction["speaker"].strip()
        content, _ = resolve(interaction["content"], interaction["event_time"])
        answering = previous is not None and previous.asked and previous.speaker != speaker
        sentences = [
            piece
            for s in split_sentences(content)
            if _WORD.search(s) and (not _FILLER.match(s) or (answering and _ANSWER.match(s)))
            for piece in cut_text(s, PIECE_BYTES)  # a memory's text has a limit (Milvus)
        ]
        if not sentences:
            return []
        parts = chunks(sentences, self.chunk_words)
        verb = "asked" if all(is_question(s) for s in sentences) else "said"
        text = f"{speaker} {verb}: {parts[0]}"
        if previous is not None and previous.text and previous.speaker != speaker:
            words = previous.text.split()
            snippet = " ".join(words[: self.context_words])
            # The context fills what the memory's limit leaves (a first part that fills it
            # goes without); a cut snippet ends with " ...", as one of more words does.
            head = f"{_CONTEXT}{previous.speaker}:  ...)"
            room = MEMORY_TEXT_BYTES - len(f"{text}{head}".encode("utf-8", "replace"))
            cut = room >= 16 and len(snippet.encode("utf-8", "replace")) > room
            if cut:
                snippet = cut_text(snippet, room)[0]
            if room >= 16:
                more = " ..." if cut or len(words) > self.context_words else ""
                text += f"{_CONTEXT}{previous.speaker}: {snippet}{more})"
        keys = [subject_key(speaker, s) for s in sentences]
        alone = len(sentences) == 1
        items = [MemoryItem(text=text, tags=tuple(keywords(parts[0])),
                            key=keys[0] if alone else None,
                            dates=tuple(_RESOLVED.findall(parts[0])))]  # fmt: skip
        if alone:
            return fit(items)
        for part in parts[1:]:
            items.append(MemoryItem(text=f"{speaker} said: {part}", tags=tuple(keywords(part)),
                                    dates=tuple(_RESOLVED.findall(part))))  # fmt: skip
        for sentence, key in zip(sentences, keys, strict=True):
            if key is not None or _RESOLVED.search(sentence):
                said = "asked" if is_question(sentence) else "said"
                items.append(
                    MemoryItem(
                        text=f"{speaker} {said}: {sentence}",
                        tags=tuple(keywords(sentence)),
                        key=key,
                        dates=tuple(_RESOLVED.findall(sentence)),
                    )
                )
        return fit(items)


LLM_PROMPT = """You extract long-term memories from one turn of a conversation.
Speaker: {speaker}
Said at: {when}
Text: {content}
{previous}
Return JSON: {{"memories": [{{"text": str, "tags": [str], "key": str or null}}]}}.
Each text is one self-contained fact that names the speaker instead of "I" and writes every
relative time ("yesterday", "last week") as an absolute date. "key" names the subject of a fact a
newer statement could replace, as "<speaker>/<attribute>" (e.g. "caroline/home"), else null.
When the turn answers or refers to the previous one, write each memory so it stands alone.
Return {{"memories": []}} when the turn holds nothing worth remembering."""


class LLMExtractor:
    """Extraction by any OpenAI-compatible chat-completions endpoint (JSON output).

    The ``openai`` client retries what is transient (connection errors, timeouts, 408/409/429,
    5xx) ``max_retries`` times with exponential backoff, honouring ``Retry-After``. What still
    fails does not stop the worker: that interaction is extracted by the offline
    :class:`RuleExtractor` instead, with a warning, and counted in :attr:`fallbacks`.

    Why a fallback rather than raising (which would stall the reader until the endpoint is back,
    the interactions waiting safely in Kafka): the reader is one thread per worker and holds a
    consumer group membership; an outage would stop all memory ingestion, and a batch that
    spends longer than ``max.poll.interval.ms`` in retries gets the worker evicted from its
    group. Rule items are the same format, so search and fusion keep working.

    When the endpoint stays down after the client's retries, it is skipped for ``cooldown``
    seconds (a circuit breaker): every interaction would otherwise pay the full retry time,
    ``(max_retries + 1) * timeout`` plus backoff (a batch of 64: over an hour of timeouts).
    Errors that concern one request (a 400, a 4xx the client does not retry, output that is not
    the memories JSON) fall back for that interaction only and do not open the breaker.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout: float = 30.0,
        max_retries: int = 2,
        cooldown: float = 60.0,
    ) -> None:
        self.name = f"llm/{model}"
        self.model = model
        self.cooldown = cooldown
        self.fallbacks = 0  # interactions extracted by the rules: the LLM failed or was skipped
        self._rules = RuleExtractor()
        self._skip_until = 0.0
        # The client refuses to start without a key; keyless local servers ignore this one.
        self._client = OpenAI(
            base_url=base_url.rstrip("/"),
            api_key=api_key or "no-key",
            timeout=timeout,
            max_retries=max_retries,
        )

    def extract(
        self, interaction: dict[str, Any], previous: Turn | None = None
    ) -> list[MemoryItem]:
        if time.monotonic() < self._skip_until:
            self.fallbacks += 1
            return self._rules.extract(interaction, previous)
        try:
            return self._ask(interaction, previous)
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            down = isinstance(exc, openai.APIConnectionError) or _retried_status(exc.status_code)
            if down:
                self._skip_until = time.monotonic() + self.cooldown
            reason = f"{type(exc).__name__}: {exc}"
        except (openai.APIResponseValidationError, ValueError) as exc:
            down, reason = False, str(exc)
        self.fallbacks += 1
        log.warning(
            "LLM extractor %s failed for event %s (%s); extracted by the rules instead%s",
            self.model,
            interaction.get("event_id"),
            reason[:300],
            f", LLM skipped for {self.cooldown:.0f}s" if down else "",
        )
        return self._rules.extract(interaction, previous)

    def _ask(self, interaction: dict[str, Any], previous: Turn | None) -> list[MemoryItem]:
        when: datetime = interaction["event_time"]
        prompt = LLM_PROMPT.format(
            speaker=interaction["speaker"],
            when=when.strftime("%A %d %B %Y, %H:%M UTC"),
            content=interaction["content"],
            previous=f"Previous turn, by {previous.speaker}: {previous.text}\n" if previous else "",
        )
        completion = self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            response_format={"type": "json_object"},
        )
        content = completion.choices[0].message.content if completion.choices else None
        try:
            memories = json.loads(content or "")["memories"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"LLM extractor returned no memories JSON: {content!r:.200}") from exc
        if not isinstance(memories, list):
            raise ValueError(f"LLM extractor returned memories that are no list: {memories!r:.200}")
        return fit(
            [
                MemoryItem(
                    text=str(m["text"]),
                    tags=tuple(str(t).lower() for t in m.get("tags") or ()),
                    key=m.get("key") or None,
                )
                for m in memories
                if isinstance(m, dict) and m.get("text")
            ]
        )


def _retried_status(status: int) -> bool:
    """The statuses the openai client retries: an endpoint that answers them is down, not us."""
    return status in {408, 409, 429} or status >= 500

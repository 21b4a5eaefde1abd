"""MemReader rules/2, one test per rule, on conversations made up here (none from LoCoMo)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.extract import RuleExtractor, Turn, own_words
from processors.fusion import CubeMemories
from processors.reader import MemReader, Sourced
from streams.query.search import Ranking, rank
from streams.query.working_set import snapshot_of
from tests.test_reader import HashEmbedder


class Embedder(HashEmbedder):
    dim = 384  # the working set's width


MONDAY = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)


def turn(speaker: str, content: str, n: int, session: str = "trip") -> dict:
    return {
        "event_id": f"{session}-{n}",
        "cube_id": "team",
        "session_id": session,
        "turn_id": f"{session}:{n}",
        "actor": "test",
        "speaker": speaker,
        "role": "USER",
        "content": content,
        "event_time": MONDAY + timedelta(seconds=30 * n),
        "metadata": {},
    }


DIALOGUE = [
    ("Ravi", "Did you finish the bookshelf for the hallway?"),
    ("Ines", "Yes, on Sunday. It took four coats of varnish."),
    ("Ravi", "Nice!"),
    ("Ravi", "I moved to Porto last month. The rent is lower and I bike to work."),
    ("Ines", "Tomorrow I start teaching a welding class at the community college."),
]


def test_a_turn_is_one_memory_that_names_its_speaker() -> None:
    items = RuleExtractor().extract(turn("Ines", "It took four coats. The oak was thirsty.", 1))
    assert [i.text for i in items] == ["Ines said: It took four coats. The oak was thirsty."]
    assert {"coats", "oak", "thirsty"} <= set(items[0].tags)


def test_a_reply_carries_the_turn_it_answers() -> None:
    asked = Turn("Ravi", "Did you finish the bookshelf for the hallway?", asked=True)
    items = RuleExtractor().extract(turn("Ines", "Yes, on Sunday.", 1), asked)
    assert items[0].text == (
        "Ines said: Yes, on Sunday. (replying to Ravi: Did you finish the bookshelf for the "
        "hallway?)"
    )
    assert own_words(items[0].text) == Turn("Ines", "Yes, on Sunday.")


def test_the_reply_context_is_capped_and_never_the_speakers_own_turn() -> None:
    long = Turn("Ravi", " ".join(f"word{n}" for n in range(100)))
    text = RuleExtractor(context_words=5).extract(turn("Ines", "I agree with that.", 1), long)[0]
    assert text.text.endswith("(replying to Ravi: word0 word1 word2 word3 word4 ...)")
    mine = RuleExtractor().extract(turn("Ravi", "And another thing.", 1), long)[0]
    assert "replying to" not in mine.text


def test_a_turn_that_only_asks_is_stored_as_asked() -> None:
    items = RuleExtractor().extract(turn("Ravi", "Did you finish it? Was it hard?", 0))
    assert [i.text for i in items] == ["Ravi asked: Did you finish it? Was it hard?"]
    assert own_words(items[0].text).asked


def test_filler_and_wordless_turns_make_no_memory_but_an_answer_is_kept() -> None:
    for content in ("Nice!", "Thanks so much!", "Haha totally", "🙂 ...", "OK", "Yes!"):
        assert RuleExtractor().extract(turn("Ravi", content, 2)) == []
    asked = Turn("Ines", "Are you coming on Friday?", asked=True)
    assert [i.text for i in RuleExtractor().extract(turn("Ravi", "Yes!", 2), asked)] == [
        "Ravi said: Yes! (replying to Ines: Are you coming on Friday?)"
    ]


def test_a_dated_sentence_is_also_a_memory_of_its_own() -> None:
    items = RuleExtractor().extract(
        turn("Ines", "Tomorrow I start teaching a welding class. I am nervous about it.", 4)
    )
    assert [i.text for i in items] == [
        "Ines said: Tomorrow (5 March 2024) I start teaching a welding class. I am nervous "
        "about it.",
        "Ines said: Tomorrow (5 March 2024) I start teaching a welding class.",
    ]
    assert items[1].dates == ("5 March 2024",)


def test_a_changing_fact_in_a_longer_turn_gets_its_own_keyed_memory() -> None:
    items = RuleExtractor().extract(turn("Ravi", DIALOGUE[3][1], 3))
    keyed = [i for i in items if i.key]
    assert [(i.text, i.key) for i in keyed] == [
        ("Ravi said: I moved to Porto last month (February 2024).", "ravi/home")
    ]
    assert items[0].key is None  # the turn itself is not superseded by a newer home


def _read(batches: list[list[int]], memories: CubeMemories | None = None) -> list[dict]:
    reader = MemReader(RuleExtractor(), HashEmbedder(), memories or CubeMemories(64))
    ops: list[dict] = []
    for batch in batches:
        ops += reader.process([Sourced(turn(*DIALOGUE[n], n), "interactions", 0, 10 + n)
                               for n in batch])  # fmt: skip
    return ops


def test_replies_are_the_same_in_any_batching_and_after_a_restart() -> None:
    """The previous turn comes from the batch or from the fold: the ops are identical."""
    whole = _read([[0, 1, 2, 3, 4]])
    assert _read([[0], [1, 2], [3, 4]]) == whole
    refolded = CubeMemories(64)
    for op in _read([[0, 1, 2]]):
        refolded.apply(op)
    assert _read([[0, 1, 2], [3, 4]]) == whole
    # a restart that reprocesses turns 1-4 on the refolded state emits only what was missing
    assert _read([[1, 2, 3, 4]], refolded) == [o for o in whole if o not in _read([[0, 1, 2]])]
    texts = [o["payload"][1]["text"] for o in whole if o.get("payload")]
    assert "Ines said: Yes, on Sunday. It took four coats of varnish. (replying to Ravi: Did " \
           "you finish the bookshelf for the hallway?)" in texts  # fmt: skip
    # turn 4 answers turn 3 (turn 2 was filler and made no memory)
    assert any(t.startswith("Ines said: Tomorrow") and "(replying to Ravi: I moved" in t
               for t in texts)  # fmt: skip


def test_replies_do_not_depend_on_log_positions() -> None:
    """Turns are ordered by event time, not log offset: the same input read outside a log (no
    offsets), in any batching, writes the same ops as from the log."""

    def made(ops: list[dict]) -> list[tuple]:  # what was decided, without the log position
        return sorted((o["event_id"], o["op"], o["payload"][1]["text"] if o.get("payload") else "")
                      for o in ops)  # fmt: skip

    reader = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    alone = [o for n in range(5) for o in reader.process([Sourced(turn(*DIALOGUE[n], n))])]
    assert made(alone) == made(_read([[0, 1, 2, 3, 4]]))
    twos = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    paired = [o for n in (0, 2, 4) for o in twos.process(
        [Sourced(turn(*DIALOGUE[m], m)) for m in (n, n + 1) if m < 5])]  # fmt: skip
    assert made(paired) == made(alone)


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(len(DIALOGUE))))
def test_a_batch_in_any_order_finds_each_turns_previous_as_the_fold_does(order: list[int]) -> None:
    """Turns arriving out of event-time order: in one batch (the previous turn looked up among
    the batch's turns so far) and one by one (looked up in the fold), the same ops."""
    turns = [Sourced(turn(*DIALOGUE[n], n), "interactions", 0, n) for n in order]
    batch = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64)).process(turns)
    reader = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    assert batch == [o for t in turns for o in reader.process([t])]


def _batches(deliveries: list[int], sizes: list[int]) -> list[list[Sourced]]:
    """Deliveries of ten events (each DIALOGUE turn said twice), cut into batches of sizes."""
    events = [turn(*DIALOGUE[n % len(DIALOGUE)], n) for n in range(10)]
    stream = [Sourced(events[n], "interactions", 0, offset) for offset, n in enumerate(deliveries)]
    batches, start = [], 0
    for size in sizes * len(stream):
        if start >= len(stream):
            break
        batches.append(stream[start : start + size])
        start += size
    return batches


def _overlapped(batches: list[list[Sourced]]) -> list[dict]:
    """The writer's way: a batch is extracted while the one before it embeds, then that one is
    fused."""
    reader = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    ops: list[dict] = []
    embedding = None
    for batch in batches:
        extracted = reader.extract(batch, embedding)
        if embedding is not None:
            ops += reader.fuse(embedding)
        embedding = extracted
    return ops + reader.fuse(embedding) if embedding is not None else ops


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=16),
       st.lists(st.integers(1, 5), min_size=1, max_size=16))  # fmt: skip
def test_the_writers_overlapped_batches_write_the_ops_of_batches_one_at_a_time(
    deliveries: list[int], sizes: list[int]
) -> None:
    """Extracting a batch before the one before it is fused (``extract(after=...)``) writes
    the same ops as processing each batch whole in turn, in any order and batching."""
    batches = _batches(deliveries, sizes)
    serial = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    assert _overlapped(batches) == [op for batch in batches for op in serial.process(batch)]


def test_overlapped_batches_merge_repeats_and_skip_an_event_delivered_again() -> None:
    batches = _batches([*range(10), 8, 9], [3])  # events 8 and 9 again, one batch later
    ops = _overlapped(batches)
    once = _overlapped(_batches(list(range(10)), [3]))
    assert ops == once
    assert {op["op"] for op in ops} >= {"ADD", "MERGE"}  # the second saying of a turn merges
    serial = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    assert ops == [op for batch in batches for op in serial.process(batch)]


def test_sessions_do_not_share_context() -> None:
    reader = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    ops = reader.process([
        Sourced(turn("Ravi", "Did you see the eclipse?", 0, "a"), "interactions", 0, 1),
        Sourced(turn("Ines", "I was at work the whole afternoon.", 1, "b"), "interactions", 0, 2),
    ])  # fmt: skip
    assert all("replying to" not in o["payload"][1]["text"] for o in ops if o.get("payload"))


def _ranked(query: str, ranking: Ranking | None = None) -> list:
    memories = CubeMemories(384)
    reader = MemReader(RuleExtractor(), Embedder(), memories)
    reader.process([Sourced(turn(*DIALOGUE[n], n), "interactions", 0, n) for n in range(5)])
    snapshot = snapshot_of(memories.table.memories.values())
    vector = Embedder().encode([query])[0]
    keep = snapshot.mask(None, None, None, False)
    return rank(snapshot, query, vector, keep, 10, ranking or Ranking())


def test_scores_are_readable_and_come_with_cosine_and_keyword() -> None:
    hits = _ranked("bookshelf varnish")
    assert 0 < hits[-1].score <= hits[0].score <= 1.0
    assert "varnish" in hits[0].text
    assert hits[0].keyword > 0 and -1.0 <= hits[0].cosine <= 1.0
    text, query = Embedder().encode([hits[0].text, "bookshelf varnish"])
    assert np.isclose(hits[0].cosine, float(text @ query))


def test_a_named_speakers_own_words_rank_first() -> None:
    plain = _ranked("Who moved to Porto?", Ranking(speaker=0.0))
    named = _ranked("What did Ines say about Porto?", Ranking(speaker=1.0))
    assert own_words(named[0].text).speaker == "Ines"
    assert any(own_words(h.text).speaker == "Ravi" for h in plain[:1])


def test_a_memory_that_only_asks_ranks_below_its_answer() -> None:
    hits = _ranked("finish the bookshelf hallway", Ranking(questions=0.5, speaker=0.0))
    assert own_words(hits[0].text) == Turn("Ines", "Yes, on Sunday. It took four coats of varnish.")


def test_a_dated_question_is_stored_as_asked() -> None:
    items = RuleExtractor().extract(turn("Ravi", "I cooked a lot. Guess what I made yesterday?", 1))
    assert items[1].text == "Ravi asked: Guess what I made yesterday (3 March 2024)?"
    assert own_words(items[1].text).asked


def test_a_turn_is_shown_once_by_its_best_memory() -> None:
    hits = _ranked("welding class tomorrow")
    turns = [h.row["source_event_id"] for h in hits]
    assert len(turns) == len(set(turns))
    assert any("welding" in h.text for h in hits)


def test_a_long_turn_is_cut_between_sentences() -> None:
    story = " ".join(f"On day {n} we walked along the river and counted herons." for n in range(30))
    items = RuleExtractor(chunk_words=40).extract(turn("Ines", story, 1), Turn("Ravi", "And?"))
    assert len(items) == 10  # 30 sentences of 11 words, 3 to a piece of at most 40
    assert items[0].text.endswith("(replying to Ravi: And?)")
    assert all(len(i.text.removeprefix("Ines said: ").split()) <= 40 for i in items[1:])
    assert [i.text.count("herons") for i in items] == [3] * 10


def test_a_turn_delivered_again_is_read_as_the_fold_has_it_by_the_turn_after() -> None:
    """Turn 1 again, with turn 0 now before it, extracts otherwise than the first time; the turn
    after it replies to what the fold kept, whether the repeat is fused yet or not (a case
    hypothesis found: the overlapped writer read the repeat's new extraction)."""
    batches = _batches([1, 0, 1, 8], [1])
    serial = MemReader(RuleExtractor(), HashEmbedder(), CubeMemories(64))
    ops = _overlapped(batches)
    assert ops == [op for batch in batches for op in serial.process(batch)]
    [reply] = [op for op in ops if op["caused_by"] == ["trip-8"]][:1]
    assert reply["payload"][1]["text"].endswith(
        "(replying to Ines: It took four coats of varnish.)"
    )

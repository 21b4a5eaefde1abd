"""MemReader: interactions in, memory ops out (ADD, or MERGE/UPDATE when fusion says so).

Pure with respect to the log: the ops depend only on the interactions and on the fold of the ops
before them, never on the wall clock or on a view, and every id is derived from the source.
Reprocessing an interaction therefore yields byte-identical ops (dropped downstream by event
id), and an item whose memory already exists in the fold is recognised as done.
"""

from __future__ import annotations

import time
from bisect import bisect_left, insort_left
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from processors.embedder import Embedder
from processors.extract import Extractor, MemoryItem, Turn, own_words
from processors.fusion import CubeMemories, TurnKey, decide, turn_key, union
from processors.ops import (
    embedding_bytes,
    make_op,
    memory_id,
    op_event_id,
    plaintext_payload,
)
from schemas.limits import CAUSES, TAGS


@dataclass(frozen=True)
class Sourced:
    """An interaction record and where it sits in the log (its provenance)."""

    interaction: dict[str, Any]
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    def source_ref(self) -> dict[str, Any]:
        i = self.interaction
        return {
            "event_id": i["event_id"],
            "session_id": i.get("session_id"),
            "turn_id": i.get("turn_id"),
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
        }


#: An extracted memory item and where it comes from: (interaction, index in it, the item).
Item = tuple[Sourced, int, MemoryItem]
#: A batch's turns per (cube, session), in turn order: each turn's key and its own words.
Said = dict[tuple[str, str], list[tuple[TurnKey, Turn]]]


@dataclass
class Extracted:
    """A batch extracted, its texts on their way through the embedder: what
    :meth:`MemReader.fuse` makes ops of. ``said``: the batch's own turns per session, in turn
    order (the next batch, extracted before this one is fused, finds its previous turns here)."""

    items: list[Item]
    said: Said
    vectors: Future[np.ndarray]


class MemReader:
    """Extracts, embeds (one batch across all interactions), fuses and emits ops.

    :meth:`process` does all three for a batch. The writer splits them: :meth:`extract` starts
    a batch's embedding in the background and :meth:`fuse` waits for it, so the next batch is
    polled and extracted while this one embeds (the cores would otherwise idle through every
    batch's single-threaded part). The ops are the same either way: extraction reads the
    previous turn from the batch before when that one is not fused yet, and fusion reads the
    fold as it is once every earlier batch is fused.
    """

    def __init__(
        self,
        extractor: Extractor,
        embedder: Embedder,
        memories: CubeMemories,
        merge_threshold: float = 0.95,
        generation: int = 0,
    ) -> None:
        self.extractor = extractor
        self.embedder = embedder
        self.memories = memories
        self.merge_threshold = merge_threshold
        self.generation = generation
        self.actor = f"memreader/{extractor.name}"
        #: What decided the ops, recorded on each: a re-extraction is compared by it.
        self.version = f"{self.actor} {embedder.model_id} merge={merge_threshold:g}"
        #: Seconds spent per stage, for ``/v1/status`` (a measurement: no op depends on it);
        #: ``embed`` is the time fusion waited for the vectors.
        self.seconds = {"extract": 0.0, "embed": 0.0, "fuse": 0.0}
        self._encoding: ThreadPoolExecutor | None = None  # one batch's encode at a time

    def close(self) -> None:
        """End the encoding thread (a batch still embedding finishes; nobody waits for it)."""
        if self._encoding is not None:
            self._encoding.shutdown(wait=False)

    def process(self, batch: list[Sourced]) -> list[dict[str, Any]]:
        """The ops for a batch, in the order they must be published (and already folded)."""
        items, _ = self._extract(batch, None)
        started = time.perf_counter()
        vectors = self.embedder.encode([item.text for _, _, item in items])
        self.seconds["embed"] += time.perf_counter() - started
        return self._fuse_all(items, vectors)

    def extract(self, batch: list[Sourced], after: Extracted | None = None) -> Extracted:
        """Extract a batch and start embedding what it adds, in the background. ``after``: the
        batch before it, if that one is not fused yet (its turns are not in the fold, so they
        are looked up in it)."""
        items, said = self._extract(batch, after)
        if self._encoding is None:
            self._encoding = ThreadPoolExecutor(1, thread_name_prefix="reader-encode")
        texts = [item.text for _, _, item in items]
        return Extracted(items, said, self._encoding.submit(self.embedder.encode, texts))

    def fuse(self, extracted: Extracted) -> list[dict[str, Any]]:
        """The ops of an extracted batch, once its vectors are there (every batch before it
        fused first)."""
        started = time.perf_counter()
        vectors = extracted.vectors.result()
        self.seconds["embed"] += time.perf_counter() - started
        return self._fuse_all(extracted.items, vectors)

    def _extract(self, batch: list[Sourced], after: Extracted | None) -> tuple[list[Item], Said]:
        """The items of a batch that the fold does not hold yet, and the batch's own turns."""
        started = time.perf_counter()
        items: list[Item] = []
        # this batch's turns per session, in turn order (a lookup is a bisection: a batch of a
        # few hundred turns of one session no longer compares each with all before it)
        own: Said = {}
        # where previous turns are looked up: with an unfused batch before, its turns too
        said = {session: list(turns) for session, turns in after.said.items()} if after else own
        for source in batch:
            i = source.interaction
            session = (i["cube_id"], i.get("session_id") or "")
            key = turn_key(i["event_time"], i["event_id"])
            extracted = self.extractor.extract(i, self._previous(i, key, said.get(session, [])))
            if extracted:
                entry = (key, own_words(extracted[0].text))
                insort_left(own.setdefault(session, []), entry, key=itemgetter(0))
                if said is not own:
                    insort_left(said.setdefault(session, []), entry, key=itemgetter(0))
            items.extend((source, index, item) for index, item in enumerate(extracted))
        todo = [
            (source, index, item)
            for source, index, item in items
            if self.memories.get(self._memory_id(source, index)) is None
        ]
        self.seconds["extract"] += time.perf_counter() - started
        return todo, own

    def _fuse_all(self, items: list[Item], vectors: np.ndarray) -> list[dict[str, Any]]:
        """Fuse each item into the fold in order; an item whose memory is in the fold by now
        (the same event again, in this batch or the unfused one before it) is done."""
        started = time.perf_counter()
        ops: list[dict[str, Any]] = []
        for (source, index, item), vector in zip(items, vectors, strict=True):
            if self.memories.get(self._memory_id(source, index)) is None:
                ops.extend(self._fuse(source, index, item, vector))
        self.seconds["fuse"] += time.perf_counter() - started
        return ops

    def _previous(
        self, i: dict[str, Any], key: TurnKey, said: list[tuple[TurnKey, Turn]]
    ) -> Turn | None:
        """The turn before ``i`` in its session (by event time): from this batch, or from the
        fold (the first memory that turn made), so any batching, a restart and a replay agree.
        A turn in both (delivered again) reads as the fold has it: its extraction this time may
        differ (the turn before it is in view now), and the fold's is the one that was kept."""
        before = bisect_left(said, key, key=itemgetter(0))  # said[before - 1]: the last earlier
        earlier = said[before - 1] if before else None
        found = self.memories.turn_before(i["cube_id"], i.get("session_id") or "", key)
        if found is not None and (earlier is None or found >= earlier[0]):
            memory = self.memories.get(memory_id(i["cube_id"], found[1], 0, self.generation))
            if memory is not None:
                return own_words(memory.text)
        return earlier[1] if earlier else None

    def _memory_id(self, source: Sourced, index: int) -> str:
        i = source.interaction
        return memory_id(i["cube_id"], i["event_id"], index, self.generation)

    def _fuse(self, source: Sourced, index: int, item: Any, vector: Any) -> list[dict[str, Any]]:
        i = source.interaction
        cube, event, at = i["cube_id"], i["event_id"], i["event_time"]
        new_id = self._memory_id(source, index)
        verdict = decide(self.memories, cube, item.text, item.key, vector, self.merge_threshold,
                         item.tags)  # fmt: skip
        payload = plaintext_payload(
            item.text,
            embedding_bytes(vector),
            self.embedder.model_id,
            key=item.key,
            tags=item.tags,
            valid_from=at,
            source=source.source_ref(),
        )

        def op(kind: str, target: str, version: int, **fields: Any) -> dict[str, Any]:
            return make_op(
                event_id=op_event_id(event, index, kind, target, self.generation),
                cube_id=cube,
                memory_id=target,
                version=version,
                op=kind,
                event_time=at,
                actor=self.actor,
                generation=self.generation,
                reader_version=self.version,
                **fields,
            )

        ops: list[dict[str, Any]] = []
        old = verdict.target
        if verdict.decision == "MERGE" and old is not None:
            merged = plaintext_payload(
                item.text,
                embedding_bytes(vector),
                self.embedder.model_id,
                key=item.key or old.key,
                tags=_merged_tags(old.tags, item.tags),
                valid_from=old.valid_from,
                source=source.source_ref(),
            )
            reason = f"repeat of {old.memory_id} (cosine {verdict.similarity:.3f})"
            ops.append(
                op("MERGE", old.memory_id, old.version + 1, caused_by=[event],
                   superseded_by=new_id, reason=reason)
            )  # fmt: skip
            ops.append(
                op("MERGE", new_id, 1, caused_by=union(old.caused_by, [event])[-CAUSES:],
                   supersedes=[old.memory_id], reason=reason, payload=merged)
            )  # fmt: skip
        elif verdict.decision == "UPDATE" and old is not None:
            closed = plaintext_payload(
                old.text,
                old.embedding,
                old.embedding_model,
                key=old.key,
                tags=old.tags,
                valid_from=old.valid_from,
                valid_to=at,
                source=old.source,
            )
            reason = f"newer fact about {item.key}"
            ops.append(
                op("UPDATE", old.memory_id, old.version + 1, caused_by=[event],
                   superseded_by=new_id, reason=reason, payload=closed)
            )  # fmt: skip
            ops.append(
                op("ADD", new_id, 1, caused_by=[event], supersedes=[old.memory_id],
                   reason=reason, payload=payload)
            )  # fmt: skip
        else:
            ops.append(op("ADD", new_id, 1, caused_by=[event], reason="extracted", payload=payload))
        # Fold at once: the next item of this batch must see this decision.
        for o in ops:
            self.memories.apply(o)
        return ops


def _merged_tags(old: tuple[str, ...] | list[str], new: list[str]) -> list[str]:
    """Both memories' tags, within the view's limit: the new item's first when they do not fit
    (a fact repeated often would otherwise gather tags until Milvus refused its row)."""
    tags = union(old, new)
    return tags if len(tags) <= TAGS else union(new, old)[:TAGS]

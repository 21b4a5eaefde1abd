"""The prompt of a chat with memory: one definition of the memory prefix, for chat and the cache.

A chat's prompt is, in the model's chat template:

1. the **memory prefix**: the system turn, the system prompt then the cube's activated memories
   (:func:`memory_prefix`). This is the part whose KV cache is activation memory: whoever
   prefills and stores a cube's cache renders it with :func:`memory_prefix` from the texts of
   the memories it names, in the order of the payload's ``memory_ids``, so chat can verify the
   stored cache against the same text (``processors.kv_cache.load(prefix_text=...)``) and reuse
   it instead of recomputing it;
2. the retrieved memories that are not in the prefix, as a second system turn
   (:func:`retrieved_turn`);
3. the conversation, then the generation prompt.

:func:`build_prompt` returns the prefix and the continuation separately; their concatenation is
the rendering of the whole chat (checked), so generating the continuation from the prefix's
cache is the same computation as generating from the whole prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from processors.fold import Memory

SYSTEM = (
    "You are a helpful assistant with a memory of past conversations. "
    "Use the memories below when they are relevant to the user's message."
)
PREFIX_HEADER = "Memories:"
RETRIEVED_HEADER = "Memories relevant to this message:"
ROLES = ("system", "user", "assistant")


class Renders(Protocol):
    """What the prompt needs of a model: its chat template (``processors.lm.LocalLM``)."""

    def render(
        self, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool = True
    ) -> str: ...


def memory_lines(texts: Iterable[str]) -> str:
    return "\n".join(f"- {' '.join(t.split())}" for t in texts)


def system_content(texts: Sequence[str], system: str = SYSTEM) -> str:
    """The system turn's content: the system prompt, then the prefix memories (if any)."""
    if not texts:
        return system
    return f"{system}\n\n{PREFIX_HEADER}\n{memory_lines(texts)}"


def memory_prefix(lm: Renders, texts: Sequence[str], system: str = SYSTEM) -> str:
    """The memory prefix text: the system turn holding ``texts``, as the template renders it.
    The text whose KV cache a cube's ACTIVATION memory stores."""
    return lm.render([{"role": "system", "content": system_content(texts, system)}],
                     generation_prompt=False)  # fmt: skip


def retrieved_turn(texts: Sequence[str]) -> dict[str, str] | None:
    if not texts:
        return None
    return {"role": "system", "content": f"{RETRIEVED_HEADER}\n{memory_lines(texts)}"}


def normalize(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The conversation as (role, content) dicts; ValueError for an unknown role, an empty
    conversation, or one whose last message is not the user's."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be text")
        out.append({"role": role, "content": content})
    if not out:
        raise ValueError("messages is empty: send at least one user message")
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise ValueError("the last message must be a non-empty user message")
    return out


@dataclass(frozen=True)
class Prompt:
    prefix: str  # the memory prefix (cacheable)
    continuation: str  # everything after it, up to the generation prompt
    prefix_texts: tuple[str, ...]
    retrieved_texts: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.prefix + self.continuation


def build_prompt(
    lm: Renders,
    prefix_texts: Sequence[str],
    retrieved_texts: Sequence[str],
    conversation: Sequence[Mapping[str, str]],
    system: str = SYSTEM,
) -> Prompt:
    """Prefix (system turn with the activated memories), then the retrieved memories, then the
    conversation, rendered with the model's chat template and split after the prefix."""
    head = {"role": "system", "content": system_content(prefix_texts, system)}
    extra = retrieved_turn(retrieved_texts)
    messages = [head, *([extra] if extra else []), *normalize(conversation)]
    prefix = memory_prefix(lm, prefix_texts, system)
    whole = lm.render(messages)
    if not whole.startswith(prefix):
        raise ValueError("the chat template does not render the system turn as a prefix")
    return Prompt(prefix, whole[len(prefix) :], tuple(prefix_texts), tuple(retrieved_texts))


def injected_messages(
    prefix_texts: Sequence[str],
    retrieved_texts: Sequence[str],
    conversation: Sequence[Mapping[str, str]],
    system: str = SYSTEM,
) -> list[dict[str, str]]:
    """The conversation for a remote OpenAI-compatible model: one system message with every
    memory (activated and retrieved) first, then the conversation as the client sent it."""
    texts = [*prefix_texts, *(t for t in retrieved_texts if t not in prefix_texts)]
    return [{"role": "system", "content": system_content(texts, system)},
            *normalize(conversation)]  # fmt: skip


def prefix_memories(memories: Iterable[Memory], cube_id: str) -> list[Memory]:
    """A cube's activated plaintext memories in prefix order (oldest valid time first, then id):
    the prefix when the cube has no stored KV cache yet."""
    epoch = datetime.min

    def order(m: Memory) -> tuple[datetime, str]:
        when = m.valid_from or m.created_at or epoch
        return (when.replace(tzinfo=None), m.memory_id)

    chosen = [m for m in memories if m.cube_id == cube_id and m.current and m.activated]
    return sorted(chosen, key=order)

"""The limits of every field a caller or an event can set, in one place.

Avro itself bounds nothing but number widths, so these are the contract: the API checks them at
the door (a clear 4xx), the writer checks them again for events that reach Kafka by another path
(a dead letter), and the stores are created from them (Milvus ``VARCHAR`` lengths, ClickHouse's
``DateTime64`` and ``UInt32`` ranges). A value inside every limit here fits every store; one
outside is refused before anything is accepted.

String limits are in UTF-8 bytes, the unit Milvus counts a ``VARCHAR``'s ``max_length`` in;
a limit in bytes also holds when counted in characters.
"""

from __future__ import annotations

from datetime import UTC, datetime

#: event_id of an interaction; Milvus ``source_event_id`` and ``memory_id`` are this long.
ID_BYTES = 64
#: cube_id (Milvus ``cube_id``), session_id (Milvus ``session_id``).
CUBE_ID_BYTES = 256
SESSION_ID_BYTES = 256
#: turn_id (Milvus ``turn_id``).
TURN_ID_BYTES = 128
#: speaker and actor: names, kept in ClickHouse and in memory texts.
NAME_BYTES = 256
#: A memory's text (Milvus ``text``): the reader cuts longer sentences into pieces this size.
MEMORY_TEXT_BYTES = 65_535
#: A memory's key (Milvus ``key``).
KEY_BYTES = 512
#: Tags of a memory (Milvus ``tags``: an array of at most this many, each at most this long).
TAGS = 64
#: Source events a MERGE carries in ``caused_by``: the latest; a memory merged more often than
#: this reaches the older ones through ``supersedes`` (its history), so an op never grows with
#: the number of times a fact was repeated.
CAUSES = 64
TAG_BYTES = 128
#: An interaction's metadata: entries, and all keys and values together.
METADATA_ENTRIES = 64
METADATA_BYTES = 16 * 1024
#: Interactions in one publish request.
BATCH_ITEMS = 1_000
#: A whole request body (a batch of interactions at their largest content fits).
BODY_BYTES = 8 * 1024 * 1024
#: A dead-letter record stays under the producer's message limit (1 MB): the raw event is cut
#: to this many bytes, the reason to ``REASON_BYTES``; the lengths before cutting are kept.
DEAD_LETTER_VALUE_BYTES = 512 * 1024
REASON_BYTES = 4 * 1024
#: The raw key of a dead-lettered message is cut to this many bytes (key and value together may
#: fill the broker's whole message limit; the record with both cut stays well under it).
DEAD_LETTER_KEY_BYTES = 16 * 1024
#: A search query (``q``); a search or a command names at most ``TAGS`` tags of ``TAG_BYTES``.
QUERY_BYTES = 8 * 1024
#: A chat turn: its messages, and all their texts together (the local LM reads 8,192 tokens;
#: a turn's last message is also published back as an interaction's content).
CHAT_MESSAGES = 256
CHAT_PROMPT_BYTES = 32 * 1024
#: A chat's stop strings (at most 4), a model name of the OpenAI-compatible endpoint.
STOP_BYTES = 256
MODEL_NAME_BYTES = 512
#: A sampling seed, either sign (torch takes 64 bits; JSON keeps integers exact up to 2^53).
SEED_MAX = 2**53 - 1
#: A stream position as an SSE event id: ``<partition>:<offset>``.
POSITION_BYTES = 64
#: Event and query times: the range of ClickHouse's ``DateTime64(3)``.
EARLIEST_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)
#: A memory's version and a command's expected version (ClickHouse ``UInt32``, Avro ``int``).
VERSION_MAX = 2**31 - 1
#: A log offset (Kafka's is a signed 64-bit integer).
OFFSET_MAX = 2**63 - 1


def utf8_size(value: str) -> int:
    """Bytes of ``value`` in UTF-8; raises ``ValueError`` for text that has none (a lone
    surrogate such as ``"\\ud800"``, which JSON can carry and no store can hold)."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (a lone surrogate)") from exc


def check_text(name: str, value: str, max_bytes: int) -> str:
    """``value`` if it is valid Unicode of at most ``max_bytes`` in UTF-8, else ``ValueError``
    naming the field and the limit."""
    size = utf8_size(value)
    if size > max_bytes:
        raise ValueError(f"{name} is {size} bytes in UTF-8, over the limit of {max_bytes}")
    return value


def check_offset(name: str, value: int) -> int:
    """``value`` if it is a log offset (0 .. ``OFFSET_MAX``), else ``ValueError``."""
    if not 0 <= value <= OFFSET_MAX:
        raise ValueError(f"{name} {value} is outside 0 .. {OFFSET_MAX} (a log offset)")
    return value


def check_time(name: str, value: datetime) -> datetime:
    """``value`` if it lies in ``EARLIEST_TIME`` .. ``LATEST_TIME``, else ``ValueError``."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    if not EARLIEST_TIME <= aware <= LATEST_TIME:
        raise ValueError(
            f"{name} {value.isoformat()} is outside {EARLIEST_TIME.date()} .. {LATEST_TIME.date()}"
        )
    return value


def cut_utf8(value: str, max_bytes: int) -> str:
    """``value`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    data = value.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return value
    return data[:max_bytes].decode("utf-8", "ignore")

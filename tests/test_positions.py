"""Positions and starting points of a subscription: anything out of Kafka's range is a clear
ValueError for an SDK user (librdkafka overflowed on 10^30 with an OverflowError)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from processors.fusion import union
from processors.reader import _merged_tags
from schemas.limits import TAGS
from streams.transport.updates import parse_position


def test_a_position_reads_back() -> None:
    assert parse_position(" 3:1042 ") == (3, 1042)
    assert parse_position(f"0:{2**63 - 1}") == (0, 2**63 - 1)


@pytest.mark.parametrize(
    "position", ["3", "a:1", "3:-1", "3:1e3", f"0:{10**30}", f"{2**31}:0", "٣:1", "\ud800:1"]
)
def test_anything_else_is_a_value_error(position: str) -> None:
    with pytest.raises(ValueError):
        parse_position(position)


def test_a_subscription_refuses_a_start_out_of_range_before_it_asks_kafka() -> None:
    from streams.settings import Settings
    from streams.transport.updates import CubeReader

    for since in (10**30, -1, datetime(1, 1, 1, tzinfo=UTC)):
        with pytest.raises(ValueError):
            CubeReader("c", "g", Settings(kafka_bootstrap="127.0.0.1:1"), since=since, timeout=1)


def test_merged_tags_stay_within_the_view_limit_and_keep_the_new_items_first() -> None:
    old = [f"old{i}" for i in range(60)]
    new = [f"new{i}" for i in range(10)]
    tags = _merged_tags(old, new)
    assert len(tags) == TAGS and tags[:10] == new
    assert _merged_tags(old[:5], new) == union(old[:5], new)  # under the limit: as before

"""The tables of the access-statistics agent, declared on an app.

Both are keyed ``"<cube_id>/<memory_id>"`` and written only while the agent handles a QueryEvent,
so Faust sends each change to the changelog partition of the event's own source partition: a key
lives in exactly one partition, which is what lets a value carry "the highest source offset it
has counted" as its guard against redeliveries.
"""

from __future__ import annotations

import faust
from faust.types import TableT
from faust.types.tables import WindowWrapperT

#: Heat is counted in tumbling buckets this long...
HEAT_BUCKET_S = 600.0
#: ...and "recent" means the buckets that end within this horizon; older ones expire.
HEAT_HORIZON_S = 3600.0


def totals_table(app: faust.App) -> TableT:
    """Per-memory totals since the start of the log: ``{"hits", "score", "best_rank",
    "last_hit_ms", "partition", "offset"}`` (``score`` sums 1/rank; ``partition`` and
    ``offset``, of the last event counted, are the dedupe guard).

    Its changelog is compacted, so a restart reads one record per memory.
    """
    return app.Table(
        "access-totals",
        key_type=str,
        default=dict,  # values stay plain JSON objects (a value_type would make them Models)
        help="Access totals per memory: hits, rank-weighted score, best rank, last hit.",
    )


def heat_table(app: faust.App) -> WindowWrapperT:
    """Recent heat per memory: ``{"hits", "score", "partition", "offset"}`` per 10-minute bucket,
    expired an hour after the bucket ends.

    Tumbling buckets summed over the horizon rather than a 1 h hopping window with a 10 min step:
    the same sliding hour at 10-minute resolution, for one changelog write per hit instead of
    six. The changelog keeps only the horizon (``retention.ms``, set by Faust from ``expires``)
    and rolls a segment per horizon, so the broker can actually delete expired buckets (with the
    default 7-day segments it would keep, and a restart would recover, a week of them).
    """
    return app.Table(
        "access-heat",
        key_type=str,
        default=dict,
        extra_topic_configs={"segment.ms": str(int(HEAT_HORIZON_S * 1000))},
        help="Access heat per memory in 10-minute buckets over the last hour.",
    ).tumbling(HEAT_BUCKET_S, expires=HEAT_HORIZON_S)

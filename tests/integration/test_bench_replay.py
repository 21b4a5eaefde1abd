"""The replay benchmark's code path on a small log: every stage runs, and the views rebuilt
from the log hold exactly what the fold says (a count check, never a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.replay import mixed_ops
from processors.fold import MemoryTable
from streams.settings import Settings
from streams.transport.topics import admin_client

ROOT = Path(__file__).resolve().parents[2]


def test_the_synthetic_log_is_a_valid_mix() -> None:
    """Every op applies to the fold (none is refused or waits), and the mix has every kind."""
    table, kinds = MemoryTable(), Counter()
    log = list(mixed_ops(5000, cubes=10))
    for _, op in log:
        kinds[op["op"]] += 1
        assert table.apply(op), op
    assert len(log) == 5000 and not table.pending
    assert set(kinds) == {"ADD", "MERGE", "UPDATE", "ACTIVATE", "DEACTIVATE", "ARCHIVE",
                          "RESTORE", "EXPIRE", "DELETE"}  # fmt: skip
    assert [op["event_id"] for _, op in log] == [op["event_id"] for _, op in mixed_ops(5000, 10)]


@pytest.mark.integration
def test_replay_bench_rebuilds_views_equal_to_the_fold(settings: Settings, tmp_path: Path) -> None:
    # Its own process: the bench opens chdb directories, and chdb allows one per process (this
    # one may hold the session's). It uses the services of the environment, on its own topics.
    subprocess.run([sys.executable, "-m", "bench.replay", "--ops", "2000", "--results-dir",
                    str(tmp_path)], cwd=ROOT, check=True, timeout=300)  # fmt: skip

    document = json.loads((tmp_path / "replay-2000.json").read_text())
    assert document["machine"]["cpu_model"]
    r = document["results"]
    stages = r["stages"]
    for name in ("publish", "kafka_read_decode", "fold", "milvus_sink", "clickhouse_sink",
                 "vault_sink", "working_set", "rebuild"):  # fmt: skip
        assert stages[name]["ops"] == 2000, name
        assert stages[name]["seconds"] > 0, name
    assert set(r["ceilings"]) == {"milvus_insert", "clickhouse_insert", "minio_put"}
    assert sum(r["op_mix"].values()) == 2000 and r["op_mix"]["ARCHIVE"] > 0

    rebuilt = stages["rebuild"]
    assert 0 < r["searchable"] < r["memories"]
    assert rebuilt["milvus_rows"] == r["searchable"]
    assert rebuilt["working_set_memories"] == r["searchable"]
    assert rebuilt["clickhouse_rows"] == 2000
    assert rebuilt["counters"]["dead_lettered"] == 0
    assert stages["milvus_sink"]["upserted"] > 0 and stages["milvus_sink"]["deleted"] > 0
    assert stages["vault_sink"]["objects"] >= r["archived"] > 0
    assert all(r["checks"].values()), r["checks"]

    # It cleans up after itself: none of its topics is left.
    topics = admin_client(settings).list_topics(timeout=30).topics
    assert not [t for t in topics if t.startswith(r["topic_prefix"])]

"""The whole HTTP API under schemathesis, bounded for CI: no 5xx, no schema violation.

A real ``memstream serve`` (fresh topics and data dir, chat through a stand-in LLM: see
``bench/fuzz.py``) gets ~1,000 generated requests over every operation of its OpenAPI (the
examples, coverage and fuzzing phases, positive and negative). ``memstream bench fuzz`` is the
same run at 5,000+ requests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz import fuzz_server, schemathesis, tally
from streams.settings import Settings

pytestmark = pytest.mark.integration


def test_fuzzing_the_api_finds_no_server_error_and_no_schema_violation(
    settings: Settings, tmp_path: Path
) -> None:
    events = tmp_path / "events.ndjson"
    with fuzz_server(settings, tmp_path / "serve") as worker:
        done = schemathesis(worker.settings.api_url, events, max_examples=10, workers=2, seed=29)
        log = worker.log.read_text(errors="replace")
    assert events.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    found = tally(events)
    print(f"fuzz: {found['requests']} requests, {found['responses_5xx']} 5xx, "
          f"{found['schema_violations']} schema violations; {found['statuses']}")  # fmt: skip
    assert found["requests"] >= 500
    assert len(found["operations"]) >= 20  # every operation, chat and the update stream too
    server_errors = [f for f in found["failures"] if f["check"] == "not_a_server_error"]
    assert found["responses_5xx"] == 0, (server_errors, log[-5000:])
    assert not found["failures"], found["failures"]
    assert "Traceback" not in log, log[-5000:]

"""Audit SQL that cannot escape: every attack class refused through the HTTP API and the CLI
(through the API and --direct), and the analytics it is for still answered, on real chdb
behind a real runtime."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from sinks.audit_sql import AuditSQL
from streams.api.app import create_app
from streams.cli.app import app as cli
from streams.pipeline.build import embedder_for
from streams.pipeline.roles import Runtime, build_runtime
from streams.settings import Settings
from streams.transport.topics import ensure_topics

pytestmark = pytest.mark.integration
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
SECRET = "audit-secret-4f1c"

# (attack class, SQL, a fragment of the reason it is refused with); {secret} is a host file.
ATTACKS = [
    ("table-function-file", "SELECT * FROM file('{secret}', 'LineAsString')",
     "table functions are not allowed: file()"),
    ("table-function-url", "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
     "table functions are not allowed: url()"),
    ("table-function-s3", "SELECT * FROM s3('http://127.0.0.1:9000/memstream/x.csv', 'CSV')",
     "table functions are not allowed: s3()"),
    ("table-function-remote", "SELECT * FROM remote('127.0.0.1:9000', system.one)",
     "table functions are not allowed: remote()"),
    ("table-function-in-subquery", "SELECT count() FROM queries WHERE actor IN "
     "(SELECT * FROM executable('cat', 'LineAsString', 'x String', (SELECT 'a')))",
     "table functions are not allowed: executable()"),
    ("table-function-merge", "SELECT count() FROM merge(currentDatabase(), '.*')",
     "table functions are not allowed: merge()"),
    ("scalar-file", "SELECT file('{secret}') AS leaked", "function file() is not allowed"),
    ("into-outfile", "SELECT 1 INTO OUTFILE '{secret}.out'", "INTO OUTFILE"),
    ("settings-readonly", "SELECT count() FROM queries SETTINGS readonly = 0",
     "SETTINGS clauses are not allowed"),
    ("settings-limits", "SELECT count() FROM queries SETTINGS max_result_rows = 0",
     "SETTINGS clauses are not allowed"),
    ("set-statement", "SET readonly = 0", "only SELECT queries are allowed, not SET"),
    ("system-table", "SELECT name FROM system.tables", "table system.tables is not allowed"),
    ("system-processes", "SELECT query FROM system.processes",
     "table system.processes is not allowed"),
    ("information-schema", "SELECT table_name FROM INFORMATION_SCHEMA.TABLES",
     "table INFORMATION_SCHEMA.TABLES is not allowed"),
    ("insert", "INSERT INTO queries (event_id) VALUES ('x')",
     "only SELECT queries are allowed, not INSERT"),
    ("create", "CREATE TABLE pwned (x Int8) ENGINE = Memory",
     "only SELECT queries are allowed, not CREATE"),
    ("drop", "DROP TABLE queries", "only SELECT queries are allowed, not DROP"),
    ("alter", "ALTER TABLE queries DELETE WHERE 1", "only SELECT queries are allowed, not ALTER"),
    ("multi-statement", "SELECT 1; SELECT 2", "only one statement is allowed"),
    ("multi-statement-file", "SELECT 1; SELECT * FROM file('{secret}', 'LineAsString')",
     "only one statement is allowed"),
    ("multi-statement-drop", "SELECT 1; DROP TABLE queries", "only one statement is allowed"),
]  # fmt: skip


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("host") / "secret.txt"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture(scope="module")
def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory, chdb_dsn: str) -> Runtime:
    s = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp("audit"),
                                    "clickhouse_url": chdb_dsn,
                                    "topic_prefix": f"audit-{uuid.uuid4().hex[:8]}."})  # fmt: skip
    ensure_topics(s)
    return build_runtime(s, "all", embedder=embedder_for(s))


@pytest.fixture(scope="module")
def url(runtime: Runtime) -> Iterator[str]:
    """The real app on a real port (the CLI talks HTTP to it), with a cube's ops, a search
    and a command in the audit tables."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(runtime.settings, runtime)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait(lambda: ready(base), 180, "runtime never got ready")
    seed(base)
    yield base
    server.should_exit = True
    thread.join(timeout=60)


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def audit(base: str, sql: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/audit", json={"sql": sql}, timeout=60)


def rows(base: str, sql: str) -> list[dict[str, Any]]:
    response = audit(base, sql)
    assert response.status_code == 200, response.text
    return response.json()


CUBE = f"audit-{uuid.uuid4().hex[:6]}"


def seed(base: str) -> None:
    facts = ["I moved to Boston for my new studio.", "I adopted a cat named Luna.",
             "I moved to Lisbon to be close to the ocean."]  # fmt: skip
    for i, fact in enumerate(facts):
        body = [{"content": fact, "speaker": "Caroline",
                 "event_time": (T0 + timedelta(days=30 * i)).isoformat()}]  # fmt: skip
        assert httpx.post(f"{base}/v1/cubes/{CUBE}/interactions", json=body).status_code == 200
    wait(lambda: len(rows(base, f"SELECT 1 FROM memory_ops WHERE cube_id = '{CUBE}'")) >= 4,
         120, "ops never reached the audit table")  # fmt: skip
    search = httpx.get(f"{base}/v1/cubes/{CUBE}/search", params={"q": "cat Luna", "top_k": 2})
    hit = search.json()["hits"][0]["memory_id"]
    command = {"memory_id": hit, "command": "ACTIVATE", "reason": "audit test"}
    assert httpx.post(f"{base}/v1/cubes/{CUBE}/commands", json=command).status_code == 202
    wait(lambda: rows(base, f"SELECT 1 FROM queries WHERE cube_id = '{CUBE}'")
         and rows(base, f"SELECT 1 FROM command_results WHERE cube_id = '{CUBE}'")
         and rows(base, f"SELECT 1 FROM memory_ops WHERE op = 'ACTIVATE' AND cube_id = '{CUBE}'"),
         60, "the search and the command never reached the audit tables")  # fmt: skip


def run_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, ["audit", *args], env=env)


@pytest.mark.parametrize(("sql", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_an_attack_is_refused_over_http_with_its_reason(
    url: str, secret: Path, sql: str, reason: str
) -> None:
    response = audit(url, sql.format(secret=secret))
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]
    assert SECRET not in response.text
    assert not Path(f"{secret}.out").exists()


@pytest.mark.parametrize(("sql", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_an_attack_is_refused_by_the_cli_through_the_api(
    url: str, secret: Path, sql: str, reason: str
) -> None:
    result = run_cli(sql.format(secret=secret), "--url", url)
    assert result.exit_code == 1, result.output
    assert reason in " ".join(result.output.split())
    assert "Traceback" not in result.output and SECRET not in result.output


@pytest.mark.parametrize(("sql", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_an_attack_is_refused_by_the_cli_direct(
    url: str, runtime: Runtime, secret: Path, sql: str, reason: str
) -> None:
    env = {"MEMSTREAM_CLICKHOUSE_URL": runtime.settings.effective_clickhouse_dsn}
    result = run_cli(sql.format(secret=secret), "--direct", env=env)
    assert result.exit_code == 1, result.output
    assert reason in " ".join(result.output.split())
    assert "Traceback" not in result.output and SECRET not in result.output


def test_the_tables_survive_the_attacks(url: str) -> None:
    [row] = rows(url, f"SELECT count() AS n FROM queries WHERE cube_id = '{CUBE}'")
    assert row["n"] >= 1
    assert rows(url, "SELECT count() AS n FROM queries WHERE event_id = 'x'") == [{"n": 0}]


def test_a_group_by_over_a_view_with_final(url: str) -> None:
    got = rows(url, f"SELECT op, count() AS n FROM memory_ops FINAL WHERE cube_id = '{CUBE}' "
                    "GROUP BY op ORDER BY op")  # fmt: skip
    ops = {r["op"]: r["n"] for r in got}
    assert ops["ADD"] >= 3 and ops["UPDATE"] == 1 and ops["ACTIVATE"] == 1


def test_a_join_between_audit_tables_with_a_cte_and_a_subquery(url: str) -> None:
    sql = f"""
        WITH hits AS (SELECT arrayJoin(memory_ids) AS memory_id, actor FROM queries
                      WHERE cube_id = '{CUBE}')
        SELECT v.memory_id, v.text, count() AS retrieved
        FROM memory_versions AS v INNER JOIN hits AS h ON h.memory_id = v.memory_id
        WHERE v.op = 'ADD'
          AND v.memory_id IN (SELECT memory_id FROM command_results WHERE cube_id = '{CUBE}')
        GROUP BY v.memory_id, v.text"""
    [row] = rows(url, sql)
    assert "Luna" in row["text"] and row["retrieved"] == 1


def test_the_physical_generation_table_is_not_named(url: str) -> None:
    response = audit(url, "SELECT count() FROM memory_ops_g0")
    assert response.status_code == 400
    assert "is not allowed: only the audit tables" in response.json()["detail"]


def test_a_result_over_the_limit_is_refused_not_truncated(url: str) -> None:
    response = audit(url, "SELECT arrayJoin(range(200000)) AS n FROM system.one")
    assert response.status_code == 400
    assert "Limit for result exceeded" in response.json()["detail"]


def test_a_failing_query_is_a_400_with_clickhouse_s_reason(url: str) -> None:
    response = audit(url, "SELECT no_such_column FROM queries")
    assert response.status_code == 400
    assert "no_such_column" in response.json()["detail"]


def test_the_cli_prints_a_table_csv_and_json(url: str) -> None:
    sql = (f"SELECT op, count() AS n FROM memory_ops WHERE cube_id = '{CUBE}' "
           "GROUP BY op ORDER BY op")  # fmt: skip
    table = run_cli(sql, "--url", url)
    assert table.exit_code == 0 and "UPDATE" in table.output and "┃ op" in table.output
    as_csv = list(csv.DictReader(io.StringIO(run_cli(sql, "--url", url, "--format", "csv").output)))
    as_json = json.loads(run_cli(sql, "--url", url, "--format", "json").output)
    assert [r["op"] for r in as_csv] == [r["op"] for r in as_json] == ["ACTIVATE", "ADD", "UPDATE"]
    assert {r["op"]: int(r["n"]) for r in as_csv} == {r["op"]: r["n"] for r in as_json}


def test_the_cli_direct_reads_the_same_rows_as_the_api(url: str, runtime: Runtime) -> None:
    sql = f"SELECT memory_id, version FROM memory_versions WHERE cube_id = '{CUBE}' ORDER BY 1, 2"
    env = {"MEMSTREAM_CLICKHOUSE_URL": runtime.settings.effective_clickhouse_dsn}
    direct = run_cli(sql, "--direct", "--format", "json", env=env)
    assert direct.exit_code == 0, direct.output
    assert json.loads(direct.output) == rows(url, sql)


def test_an_unreachable_api_is_exit_2_without_a_traceback() -> None:
    result = run_cli("SELECT 1", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "cannot reach the API" in result.output and "Traceback" not in result.output


def test_row_filters_restrict_what_a_principal_sees_through_views(
    url: str, runtime: Runtime
) -> None:
    client = clickhouse_connect.get_client(dsn=runtime.settings.effective_clickhouse_dsn)
    try:
        executor = AuditSQL(client)
        sql = "SELECT DISTINCT cube_id FROM memory_ops"
        assert CUBE in {r[0] for r in executor.run(sql).rows}
        only = executor.run(sql, row_filters={"memory_ops": "cube_id = 'nobody'"})
        assert only.rows == []
    finally:
        client.close()

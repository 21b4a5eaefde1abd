"""Audit SQL that cannot escape and never stalls the writer: every attack class refused through
the HTTP API and the CLI (through the API and --direct) before anything of it runs, no engine
text in any error, the analytics it is for still answered, and a new interaction searchable
while a long audit query runs, on real chdb behind a real runtime."""

from __future__ import annotations

import csv
import io
import json
import re
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

from sinks.audit_sql import (
    AGGREGATE_FUNCTIONS,
    ALLOWED_FUNCTIONS,
    ENGINE_ERRORS,
    AuditError,
    AuditRefused,
    AuditSQL,
    function_allowed,
)
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
    assert response.json()["detail"]["error"] == "audit_refused"
    assert reason in response.json()["detail"]["reason"]
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
    assert "is not allowed: only the audit tables" in response.json()["detail"]["reason"]


def test_a_result_over_the_limit_is_refused_not_truncated(url: str) -> None:
    response = audit(url, "SELECT arrayJoin(range(200000)) AS n")
    assert response.status_code == 400
    assert response.json()["detail"]["code"] == "TOO_MANY_ROWS_OR_BYTES"
    assert "Limit for result exceeded" in response.json()["detail"]["reason"]


def test_a_failing_query_is_a_400_with_a_code_and_no_engine_text(url: str) -> None:
    response = audit(url, "SELECT no_such_column FROM queries")
    assert response.status_code == 400
    assert response.json()["detail"] == {
        "error": "audit_failed",
        "code": "UNKNOWN_IDENTIFIER",
        "reason": "the query names a column or alias that does not exist",
    }


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


# -- nothing of a statement runs before the policy allows it ------------------------------------

PASSWD = Path("/etc/passwd").read_text().splitlines()[0]  # what a leak of /etc/passwd shows
FACTS = ("Boston", "Luna", "Lisbon")  # the seeded memories' words: values the engine reads


def refused(base: str, sql: str, code: str) -> dict[str, Any]:
    """The 400 of a statement the policy refuses with ``code``, checked to carry no engine text
    and none of the file it tried to read."""
    response = audit(base, sql)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert (detail["error"], detail["code"]) == ("audit_refused", code), detail
    assert SECRET not in response.text and PASSWD not in response.text
    assert "DB::Exception" not in response.text and "Code:" not in response.text
    return detail


# Scalar file() wherever an expression goes: the analyzer would read the file (and a cast would
# put it in the error text) before a check on the analyzed tree could refuse it.
FILE_ANYWHERE = [
    ("select-list", "SELECT file('{secret}') AS leaked"),
    ("where", "SELECT count() FROM memory_ops WHERE text = file('{secret}')"),
    ("inside-a-cast", "SELECT toUInt8(file('{secret}'))"),
    ("passwd-inside-a-cast", "SELECT toUInt8(file('/etc/passwd'))"),
    ("environ-inside-a-cast", "SELECT toUInt8(file('/proc/self/environ'))"),
    ("cast-operator", "SELECT file('{secret}')::UInt8"),
    ("inside-a-cte", "WITH x AS (SELECT file('{secret}') AS f) SELECT toUInt8(f) FROM x"),
    ("with-expression", "WITH file('{secret}') AS f SELECT toUInt8(f)"),
    ("subquery-in-from", "SELECT * FROM (SELECT toUInt8(file('{secret}')) AS f)"),
    ("scalar-subquery", "SELECT (SELECT toUInt8(file('{secret}')))"),
    ("in-subquery", "SELECT count() FROM queries WHERE actor IN (SELECT file('{secret}'))"),
    ("upper-case", "SELECT toUInt8(FILE('{secret}'))"),
    ("mixed-case", "SELECT toUInt8(File('{secret}'))"),
    ("in-a-lambda", "SELECT arrayMap(p -> toUInt8(file(p)), ['{secret}'])"),
    ("apply-transformer", "SELECT * APPLY(file) FROM (SELECT '{secret}' AS p)"),
    ("order-by", "SELECT op FROM memory_ops ORDER BY file('{secret}')"),
    ("join-on", "SELECT count() FROM memory_ops AS m JOIN queries AS q "
                "ON q.actor = toString(toUInt8(file('{secret}')))"),
    ("union-branch", "SELECT 'x' AS v UNION ALL SELECT toString(toUInt8(file('{secret}')))"),
    ("window-partition", "SELECT count() OVER (PARTITION BY file('{secret}')) FROM queries"),
    ("aggregate-argument", "SELECT max(toUInt8(file('{secret}'))) FROM queries"),
]  # fmt: skip


@pytest.mark.parametrize("sql", [s for _, s in FILE_ANYWHERE], ids=[i for i, _ in FILE_ANYWHERE])
def test_scalar_file_is_refused_in_any_position(url: str, secret: Path, sql: str) -> None:
    detail = refused(url, sql.format(secret=secret), "FUNCTION_NOT_ALLOWED")
    assert "() is not allowed" in detail["reason"]


SYSTEM_TABLES = [
    ("in-a-cast", "SELECT toUInt8((SELECT name FROM system.tables LIMIT 1))"),
    ("scalar-subquery", "SELECT (SELECT groupArray(name) FROM system.tables)"),
    ("with-expression", "WITH (SELECT any(query) FROM system.processes) AS q SELECT q"),
    ("in-subquery", "SELECT count() FROM queries WHERE actor IN "
                    "(SELECT name FROM system.databases)"),
    ("in-a-table", "SELECT count() FROM queries WHERE actor IN system.one"),
    ("in-a-table-parenthesised", "SELECT count() FROM queries WHERE actor IN (system.one)"),
    ("exists", "SELECT exists(SELECT 1 FROM system.settings)"),
    ("inside-a-cte", "WITH t AS (SELECT name FROM system.tables) SELECT toUInt8(name) FROM t"),
    ("cte-named-like-the-table", "WITH tables AS (SELECT 1) SELECT * FROM system.tables"),
    ("join", "SELECT count() FROM memory_ops AS m JOIN system.tables AS t ON t.name = m.cube_id"),
    ("information-schema", "SELECT toUInt8((SELECT table_name FROM information_schema.tables "
                           "LIMIT 1))"),
    ("cte-reading-itself", "WITH memory_ops_g0 AS (SELECT * FROM memory_ops_g0) "
                           "SELECT count() FROM memory_ops_g0"),
    ("another-database", "SELECT count() FROM system.memory_ops"),
]  # fmt: skip


@pytest.mark.parametrize("sql", [s for _, s in SYSTEM_TABLES], ids=[i for i, _ in SYSTEM_TABLES])
def test_a_scalar_subquery_over_system_tables_is_refused(url: str, sql: str) -> None:
    detail = refused(url, sql, "TABLE_NOT_ALLOWED")
    assert "is not allowed: only the audit tables" in detail["reason"]


# Functions that read files, the environment, the server, settings or other tables, or call
# out: refused by name (aliases and other cases included), whatever they would return.
OUTSIDE = [
    "getSetting('readonly')", "getSettingOrDefault('readonly', 0)", "getServerSetting('tcp_port')",
    "getMergeTreeSetting('index_granularity')", "currentUser()", "user()", "current_user()",
    "currentDatabase()", "DATABASE()", "hostName()", "hostname()", "FQDN()", "version()",
    "uptime()", "serverTimezone()", "timezone()", "getMacro('replica')", "filesystemAvailable()",
    "filesystemCapacity()", "getOSKernelVersion()", "buildId()", "showCertificate()",
    "hasColumnInTable('system', 'tables', 'name')", "dictGet('d', 'x', toUInt64(1))",
    "joinGet('j', 'x', 1)", "globalVariable('max_allowed_packet')", "currentQueryID()",
    "getClientHTTPHeader('x')", "arrayReduce('sum', [1])", "initializeAggregation('sum', 1)",
    "formatRow('CSV', 1)", "identity(1)", "throwIf(0)", "logTrace('x')", "aiGenerate('x')",
    "__getScalar('x')", "generateSerialID('x')", "transactionID()", "Sleep(0)",
]  # fmt: skip


@pytest.mark.parametrize("call", OUTSIDE)
def test_a_function_reading_outside_the_tables_is_refused(url: str, call: str) -> None:
    detail = refused(url, f"SELECT {call} AS v", "FUNCTION_NOT_ALLOWED")
    assert f"function {call.split('(')[0]}() is not allowed" in detail["reason"]


SLOW = [
    "SELECT (SELECT sleep(3))",
    "SELECT sleep(3)",
    "WITH (SELECT sleep(3)) AS s SELECT s",
    "SELECT sleepEachRow(3) FROM memory_ops",
    "SELECT count() FROM memory_ops WHERE sleepEachRow(3) = 0",
]


@pytest.mark.parametrize("sql", SLOW)
def test_a_sleeping_query_is_refused_before_it_sleeps(url: str, sql: str) -> None:
    """Nothing of it ran: the refusal comes back before the 3 s one sleep would take (the
    analyzer ran ``SELECT (SELECT sleep(2))`` twice on main: 4 s)."""
    started = time.monotonic()
    refused(url, sql, "FUNCTION_NOT_ALLOWED")
    assert time.monotonic() - started < 3.0


# Failures in the engine: the caller gets ClickHouse's error name and our reason, never its
# message, which quotes values the query computed (a memory's text here, a file on main).
FAILING = [
    ("cast-of-a-row", "SELECT toUInt8(assumeNotNull(text)) FROM memory_ops "
                      "WHERE cube_id = '{cube}'", None),
    ("date-of-a-row", "SELECT toDate(coalesce(text, '')) FROM memory_ops "
                      "WHERE cube_id = '{cube}'", None),
    ("json-of-a-row", "SELECT toUInt8(JSONExtractString(payload, 'text')) "
                      "FROM memory_ops WHERE cube_id = '{cube}'", None),
    ("type-mismatch", "SELECT text + 1 FROM memory_ops WHERE cube_id = '{cube}'", None),
    ("unknown-column", "SELECT no_such_column FROM queries", "UNKNOWN_IDENTIFIER"),
    ("join-using-unknown-column", "SELECT count() FROM memory_ops AS m JOIN queries AS q "
                                  "USING (nothing)", None),
    ("syntax", "SELECT 'Boston' FROM memory_ops WHERE", "SYNTAX_ERROR"),
    ("limit", "SELECT arrayJoin(range(200000)) AS n", "TOO_MANY_ROWS_OR_BYTES"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "code"), [f[1:] for f in FAILING], ids=[f[0] for f in FAILING])
def test_an_error_never_carries_a_value_the_engine_computed(
    url: str, sql: str, code: str | None
) -> None:
    response = audit(url, sql.format(cube=CUBE))
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert set(detail) == {"error", "code", "reason"} and detail["error"] == "audit_failed"
    assert code is None or detail["code"] == code, detail
    assert not any(word in response.text for word in FACTS), response.text
    assert "DB::Exception" not in response.text and "Code:" not in response.text


LEAKS = [
    "SELECT toUInt8(file('/etc/passwd'))",
    "SELECT toUInt8((SELECT name FROM system.tables LIMIT 1))",
    "SELECT toUInt8(assumeNotNull(text)) FROM memory_ops WHERE cube_id = '{cube}'",
]


@pytest.mark.parametrize("sql", LEAKS)
def test_the_cli_prints_a_code_and_no_engine_text(url: str, runtime: Runtime, sql: str) -> None:
    env = {"MEMSTREAM_CLICKHOUSE_URL": runtime.settings.effective_clickhouse_dsn}
    for result in (run_cli(sql.format(cube=CUBE), "--url", url),
                   run_cli(sql.format(cube=CUBE), "--direct", env=env)):  # fmt: skip
        assert result.exit_code == 1, result.output
        assert PASSWD not in result.output and not any(w in result.output for w in FACTS)
        assert "DB::Exception" not in result.output and "Traceback" not in result.output
        assert re.search(
            r"\((FUNCTION_NOT_ALLOWED|TABLE_NOT_ALLOWED|CANNOT_PARSE_TEXT|"
            r"ATTEMPT_TO_READ_AFTER_EOF)\)",
            result.output,
        ), result.output


def test_the_sdk_raises_the_code_and_reason(url: str) -> None:
    from streams.sdk.client import AuditQueryError, MemoryClient

    with MemoryClient(url) as client, pytest.raises(AuditQueryError) as raised:
        client.audit("SELECT toUInt8(file('/etc/passwd'))")
    assert (raised.value.status_code, raised.value.error) == (400, "audit_refused")
    assert raised.value.code == "FUNCTION_NOT_ALLOWED" and PASSWD not in str(raised.value)


# -- what audit SQL is for still works ---------------------------------------------------------

POSITIVE = [
    ("aggregates", "SELECT op, count() AS n, uniqExact(memory_id) AS memories, "
                   "countIf(version > 1) AS later, max(version) AS top, avg(version) AS mean, "
                   "quantile(0.5)(version) AS median, groupArray(memory_type) AS types "
                   "FROM memory_ops WHERE cube_id = '{cube}' GROUP BY op ORDER BY op"),
    ("cte", "WITH latest AS (SELECT memory_id, max(version) AS v FROM memory_ops "
            "WHERE cube_id = '{cube}' GROUP BY memory_id) "
            "SELECT count() AS n, sum(v) AS versions FROM latest"),
    ("join", "SELECT h.actor AS actor, count() AS hits FROM (SELECT actor, "
             "arrayJoin(memory_ids) AS id FROM queries WHERE cube_id = '{cube}') AS h "
             "INNER JOIN memory_ops AS m ON m.memory_id = h.id WHERE m.version = 1 "
             "GROUP BY actor"),
    ("window", "SELECT memory_id, version, row_number() OVER w AS rn, "
               "lagInFrame(op) OVER (PARTITION BY memory_id ORDER BY version "
               "ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS previous, "
               "count() OVER (PARTITION BY memory_id) AS versions "
               "FROM memory_ops WHERE cube_id = '{cube}' "
               "WINDOW w AS (PARTITION BY memory_id ORDER BY version)"),
    ("arrayjoin", "SELECT arrayJoin(memory_ids) AS id, count() AS n FROM queries "
                  "WHERE cube_id = '{cube}' GROUP BY id"),
    ("dates", "SELECT toDate(event_time) AS day, toStartOfMonth(event_time) AS month, "
              "dateDiff('day', min(event_time), max(event_time)) AS span, "
              "formatDateTime(max(event_time), '%F') AS last, now() >= max(event_time) AS past, "
              "today() AS today, toYear(max(event_time)) AS year FROM memory_ops "
              "WHERE cube_id = '{cube}' GROUP BY day, month ORDER BY day"),
    ("strings-json-hashes", "SELECT lower(text) AS t, JSONExtractString(payload, 'text') AS j, "
                            "cityHash64(memory_id) AS h, toString(generateUUIDv4()) AS u, "
                            "round(length(text) / 3, 1) AS r, if(text LIKE '%Luna%', 1, 0) AS cat "
                            "FROM memory_ops WHERE cube_id = '{cube}' AND text IS NOT NULL"),
    ("combinators", "SELECT uniqMerge(s) AS memories, sumIf(n, n > 0) AS ops FROM "
                    "(SELECT uniqState(memory_id) AS s, count() AS n FROM memory_ops "
                    "WHERE cube_id = '{cube}' GROUP BY op)"),
    ("in-an-audit-table", "SELECT count() AS n FROM memory_ops WHERE cube_id = '{cube}' "
                          "AND memory_id IN (SELECT memory_id FROM memory_versions) "
                          "AND op IN ('ADD', 'UPDATE') AND version NOT IN [0]"),
    ("case-cast-lambda-union", "SELECT CASE op WHEN 'ADD' THEN 'added' ELSE lower(op) END AS what, "
                               "CAST(version AS String) AS v, version::UInt64 AS w, "
                               "arrayMap(x -> upper(x), tags) AS t FROM memory_ops "
                               "WHERE cube_id = '{cube}' UNION ALL "
                               "SELECT 'none', '0', 0, [] FROM queries WHERE 0"),
    ("qualified-current-database", "SELECT count() AS n FROM {database}.memory_ops "
                                   "WHERE cube_id = '{cube}'"),
]  # fmt: skip


@pytest.mark.parametrize("sql", [s for _, s in POSITIVE], ids=[i for i, _ in POSITIVE])
def test_ordinary_audit_queries_still_answer(url: str, runtime: Runtime, sql: str) -> None:
    client = clickhouse_connect.get_client(dsn=runtime.settings.effective_clickhouse_dsn)
    try:
        database = client.query("SELECT currentDatabase()").result_rows[0][0]
    finally:
        client.close()
    got = rows(url, sql.format(cube=CUBE, database=database))
    assert got, sql


# -- the allow list, against the engine it runs on ---------------------------------------------

NEVER = ("file", "sleep", "sleepEachRow", "getSetting", "getServerSetting", "getMacro",
         "hasColumnInTable", "joinGet", "dictGet", "currentUser", "getClientHTTPHeader",
         "evalMLMethod", "filesystemAvailable", "identity", "globalVariable")  # fmt: skip


def test_the_allow_list_holds_under_the_engine_s_name_resolution(runtime: Runtime) -> None:
    """Every allowed name is a function of this engine (or one the parser writes); every name
    the engine knows that the policy lets through resolves to an allowed function (an alias
    only where its target is allowed); the case-insensitive marks are the engine's; and what
    reads outside the tables is refused in any case."""
    client = clickhouse_connect.get_client(dsn=runtime.settings.effective_clickhouse_dsn)
    try:
        functions = client.query(
            "SELECT name, alias_to, case_insensitive, is_aggregate FROM system.functions"
        ).result_rows
    finally:
        client.close()
    engine = {name: (alias, bool(ci), bool(agg)) for name, alias, ci, agg in functions}
    written_by_the_parser = {"lambda", "exists", "untuple", "grouping"}
    assert ALLOWED_FUNCTIONS - set(engine) == written_by_the_parser
    for name in ALLOWED_FUNCTIONS - written_by_the_parser:
        alias, case_insensitive, aggregate = engine[name]
        upper = name.upper()
        if upper != name and upper not in engine:  # resolved case-insensitively, or not at all
            assert function_allowed(upper) == case_insensitive, name
        assert (name in AGGREGATE_FUNCTIONS) == aggregate, name
    for name, (alias, _, _) in engine.items():
        if function_allowed(name) and alias:
            assert function_allowed(alias), f"{name} is allowed, its target {alias} is not"
    for name in NEVER:
        for spelling in (name, name.upper(), name.lower(), name.capitalize(), f"{name}If"):
            assert not function_allowed(spelling), spelling


def test_the_error_names_are_the_engine_s(runtime: Runtime) -> None:
    """A failure's code is ClickHouse's own name for the error number."""
    client = clickhouse_connect.get_client(dsn=runtime.settings.effective_clickhouse_dsn)
    try:
        codes = sorted(ENGINE_ERRORS)
        [(names,)] = client.query(
            "SELECT arrayMap(c -> errorCodeToName(c), {codes:Array(UInt32)})",
            parameters={"codes": codes},
        ).result_rows
    finally:
        client.close()
    assert [ENGINE_ERRORS[c][0] for c in codes] == names


def test_the_executor_refuses_on_its_own_connection(runtime: Runtime, secret: Path) -> None:
    """``AuditSQL`` itself (the --direct path): a refusal is an :class:`AuditRefused` with a
    code, and the connection still answers after it."""
    client = clickhouse_connect.get_client(dsn=runtime.settings.effective_clickhouse_dsn)
    try:
        executor = AuditSQL(client)
        with pytest.raises(AuditRefused) as raised:
            executor.run(f"SELECT toUInt8(file('{secret}'))")
        assert raised.value.as_dict()["code"] == "FUNCTION_NOT_ALLOWED"
        with pytest.raises(AuditError) as failed:
            executor.run("SELECT toUInt8(assumeNotNull(text)) FROM memory_ops WHERE text != ''")
        assert failed.value.code in ("CANNOT_PARSE_TEXT", "ATTEMPT_TO_READ_AFTER_EOF")
        assert not any(word in str(failed.value) for word in FACTS)
        assert executor.run("SELECT 1 AS one").records() == [{"one": 1}]
    finally:
        client.close()


# -- audit SQL never stalls the writer ---------------------------------------------------------


def test_audit_and_history_never_wait_for_the_writer_s_lock(url: str, runtime: Runtime) -> None:
    """They read on connections of their own: with the writer's lock held (a batch being
    written), both still answer (on main both waited for the lock, and the writer for them)."""
    [row] = rows(url, f"SELECT memory_id FROM memory_ops WHERE cube_id = '{CUBE}' LIMIT 1")
    assert runtime.stores is not None
    with runtime.stores.locked():
        answer = audit(url, f"SELECT count() AS n FROM memory_ops WHERE cube_id = '{CUBE}'")
        history = httpx.get(f"{url}/v1/memories/{row['memory_id']}/history", timeout=60)
    assert answer.status_code == 200 and answer.json()[0]["n"] >= 4
    assert history.status_code == 200 and history.json()


# A heavy query the policy allows (no table, pure functions): 10^10 hashes, ~20 s on a 2-core
# machine; the audit limit (30 s) stops it if it runs longer.
HEAVY = ("SELECT '{marker}' AS marker, count() AS n "
         "FROM (SELECT arrayJoin(range(100000)) AS a) AS x, "
         "(SELECT arrayJoin(range(100000)) AS b) AS y WHERE cityHash64(a, b) % 7 = 3")  # fmt: skip


def publish(base: str, cube: str, content: str) -> None:
    body = [{"content": content, "speaker": "Caroline"}]
    assert httpx.post(f"{base}/v1/cubes/{cube}/interactions", json=body).status_code == 200


def searchable(base: str, cube: str, query: str, word: str) -> bool:
    found = httpx.get(f"{base}/v1/cubes/{cube}/search", params={"q": query, "top_k": 5})
    return any(word in (hit["text"] or "") for hit in found.json()["hits"])


def test_a_new_interaction_is_searchable_within_1_s_while_an_audit_query_runs(
    url: str, runtime: Runtime
) -> None:
    cube = f"{CUBE}-fresh"
    publish(url, cube, "I keep a red kayak at the marina.")  # the cube is warm before timing
    wait(lambda: searchable(url, cube, "kayak", "kayak"), 120, "the first fact never arrived")
    marker = f"freshness-{uuid.uuid4().hex}"
    answer: dict[str, httpx.Response] = {}
    running_audit = threading.Thread(
        target=lambda: answer.update(r=audit(url, HEAVY.format(marker=marker))), daemon=True
    )
    probe = clickhouse_connect.get_client(dsn=runtime.settings.effective_clickhouse_dsn)

    def running() -> bool:
        found = probe.query(
            "SELECT count() FROM system.processes WHERE query LIKE {m:String} "
            "AND query NOT LIKE '%system.processes%'",
            parameters={"m": f"%{marker}%"},
        )
        return found.result_rows[0][0] > 0

    try:
        running_audit.start()
        wait(running, 30, "the audit query never started")
        started = time.monotonic()
        publish(url, cube, "I started learning the theremin in Oslo.")
        while not searchable(url, cube, "what instrument is she learning", "theremin"):
            assert time.monotonic() - started < 60, "the interaction never became searchable"
            time.sleep(0.02)
        took = time.monotonic() - started
        still = running() and running_audit.is_alive()
        print(f"searchable {took:.3f} s after its publish, the audit query still running: {still}")
        assert still, "the audit query ended first: the measurement proves nothing; make it heavier"
        assert took < 1.0, f"searchable after {took:.2f} s while an audit query ran"
    finally:
        running_audit.join(60)
        probe.close()
    response = answer["r"]
    assert response.status_code == 200 or response.json()["detail"]["code"] == "TIMEOUT_EXCEEDED"

"""User SQL on the audit tables, one executor for the HTTP API and the CLI.

A statement runs only if ClickHouse itself, not a regex, says it is one SELECT over the audit
tables, and then with ClickHouse's own guards on: ``readonly=1`` and fixed limits, passed as
query settings. The steps, each a query of its own:

1. ``SELECT formatQuerySingleLine({sql:String})``: the SQL travels as a bound string, so it is
   parsed, never run; a syntax error or a second statement fails here. The canonical text it
   returns is what the next steps check and what finally runs.
2. ``EXPLAIN AST`` of that text (parsing only): the statement must be a SELECT (a UNION,
   INTERSECT or EXCEPT of SELECTs), with no ``SETTINGS``, ``INTO OUTFILE`` or ``FORMAT`` clause
   and no table function anywhere.
3. ``EXPLAIN QUERY TREE`` under the same settings as the run: the analyzer resolves every
   name (CTEs, aliases, ``db.table``), and every table read must be one of ``AUDIT_TABLES`` in
   the current database; views count as themselves, so a view over an allowed table works and
   its physical table need not be allowed. Functions that read outside the query's tables
   (``file``, dictionaries, ``joinGet`` ...) are refused by name.
4. The canonical statement runs with ``AUDIT_LIMITS`` plus ``readonly=1``.

What chdb 4.4 (engine 26.9.2) does with each attack class, found by experiment with
clickhouse-connect 1.12 (which sends query settings to chdb as a trailing ``SETTINGS`` clause):

- Table functions: ``readonly=1`` refuses ``file``, ``url``, ``s3``, ``remote``,
  ``executable``, ``mysql``, ``postgresql``, ``sqlite``, ``hdfs``, ``format`` and ``zeros``
  ("Cannot execute query in readonly mode"); ``input`` fails outside INSERT; but ``numbers``,
  ``values``, ``generateRandom``, ``view(SELECT ...)`` and ``merge(db, regexp)`` run, and
  ``merge``/``view`` reach any table. Step 2 refuses every table function.
- Host files without a table function: ``readonly=1`` lets the scalar function
  ``file('/path')`` read any file the process can, and ``SELECT ... INTO OUTFILE '/path'``
  write one. Steps 2 and 3 refuse both.
- ``SETTINGS`` in the query: ``readonly=1`` refuses changing any setting, ``readonly`` itself
  included ("Cannot modify 'readonly' setting in readonly mode"), and ``SET`` too; the limits
  of ``AUDIT_LIMITS`` are set in the same clause as ``readonly`` and so still apply. Step 2
  refuses the clause first, with a clearer reason.
- System tables: ``readonly=1`` leaves ``system.*`` and ``INFORMATION_SCHEMA`` readable
  (``system.tables``, ``system.processes`` with other sessions' query text, ``system.settings``;
  ``system.users`` needs a grant). Step 3 refuses every database but the current one, except
  ``system.one``, the table the analyzer reads for a SELECT without FROM.
- Writes and DDL: ``readonly=1`` refuses ``INSERT``, ``CREATE``, ``DROP``, ``ALTER``; step 2
  refuses them before anything runs.
- Limits: ``max_execution_time``, ``max_memory_usage`` and ``max_rows_to_read`` stop a query
  (TIMEOUT_EXCEEDED, MEMORY_LIMIT_EXCEEDED, TOO_MANY_ROWS), and a query cannot raise them
  (readonly); ``max_result_rows`` with ``result_overflow_mode='throw'`` is checked between
  blocks, so one block over it (``arrayJoin(range(200000))``) still came back: the executor
  counts the rows itself.
- Multi-statements: chdb runs them (``SELECT 1; SELECT 2`` returns both), and the trailing
  settings bind to the last statement only: ``SELECT * FROM file(...); SELECT 1`` returned the
  file's contents in a fresh session despite ``readonly=1``; ``CREATE ...; SELECT 1`` left the
  client's session readonly afterwards (a shared client's writes would fail). A server refuses
  them over HTTP. Step 1 refuses them before the engine sees the statement.

Row restrictions (governance) pass as ``row_filters``: table name -> SQL condition, applied by
ClickHouse's ``additional_table_filters`` to every read of that table, views included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from sinks.clickhouse import AUDIT_TABLES

# Fixed per query; readonly=1 (added last) keeps a query from raising them.
AUDIT_LIMITS: dict[str, int | str] = {
    "max_execution_time": 30,
    "timeout_overflow_mode": "throw",
    "max_memory_usage": 2_000_000_000,
    "max_rows_to_read": 100_000_000,
    "read_overflow_mode": "throw",
    "max_result_rows": 100_000,
    "result_overflow_mode": "throw",
}
# Scalar functions that read outside the query's tables (files, dictionaries, Join tables,
# server configuration); "dict" covers the dictGet*/dictHas family.
DENIED_FUNCTIONS = frozenset({
    "file", "joinGet", "joinGetOrNull", "hasColumnInTable", "getMacro", "getServerSetting",
    "getMergeTreeSetting", "getClientHTTPHeader", "filesystemAvailable", "filesystemCapacity",
    "filesystemUnreserved", "evalMLMethod",
})  # fmt: skip
DENIED_PREFIXES = ("dict",)
# Read by the analyzer for a SELECT without FROM: one row, one constant column.
IMPLICIT_TABLES = frozenset({"system.one"})

_TABLE = re.compile(r"^\s*TABLE id: \d+,.*\btable_name: ([^,\s]+)")
_TABLE_FUNCTION = re.compile(r"^\s*TABLE_FUNCTION id: \d+,.*\btable_function_name: ([^,\s]+)")
_FUNCTION = re.compile(r"^\s*FUNCTION id: \d+, function_name: ([^,\s]+)")
_MESSAGE = re.compile(
    r"DB::Exception: (?:Code: \d+\. DB::Exception: )?(.+?)(?: In scope | \(version |$)"
)


class AuditError(Exception):
    """A statement that did not run; ``reason`` says why, in words for the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuditRefused(AuditError):
    """Refused by the audit policy before it ran."""


class AuditFailed(AuditError):
    """ClickHouse refused or stopped it: syntax, an unknown column, a limit."""


class AuditUnavailable(AuditError):
    """The engine or server could not be reached."""


@dataclass(frozen=True)
class AuditResult:
    columns: list[str]
    rows: list[Sequence[Any]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


@dataclass(frozen=True)
class _Node:
    label: str
    children: list[_Node]


class AuditSQL:
    """Runs one user SELECT on the audit tables of a clickhouse-connect client (chdb or a
    server). Not thread-safe on an embedded client: callers serialise it with their writes."""

    def __init__(
        self,
        client: Any,
        tables: frozenset[str] = AUDIT_TABLES,
        limits: Mapping[str, int | str] = AUDIT_LIMITS,
    ) -> None:
        self.client = client
        self.tables = tables
        self.limits = dict(limits)
        self.database = self._query("SELECT currentDatabase()").result_rows[0][0]

    def run(self, sql: str, row_filters: Mapping[str, str] | None = None) -> AuditResult:
        """Check and run ``sql``. ``row_filters`` (table -> condition) narrows what a principal
        may see; none today. Raises :class:`AuditError` when it does not run."""
        settings: dict[str, Any] = dict(self.limits)
        if row_filters:
            settings["additional_table_filters"] = dict(row_filters)
        settings["readonly"] = 1
        statement = self._single_statement(sql)
        self._check_syntax(statement)
        self._check_names(statement, settings)
        result = self._query(statement, settings)
        limit = int(self.limits["max_result_rows"])
        if len(result.result_rows) > limit:  # the engine checks between blocks only
            raise AuditFailed(
                f"Limit for result exceeded: more than {limit} rows; aggregate or add a LIMIT"
            )
        return AuditResult(list(result.column_names), list(result.result_rows))

    def _single_statement(self, sql: str) -> str:
        try:
            rows = self._query(
                "SELECT formatQuerySingleLine({sql:String})", {"readonly": 1}, {"sql": sql}
            ).result_rows
        except AuditFailed as exc:
            if "Multi-statements are not allowed" in exc.reason:
                raise AuditRefused("only one statement is allowed") from exc
            raise
        return rows[0][0]

    def _check_syntax(self, statement: str) -> None:
        root = _parse_ast([r[0] for r in self._query(f"EXPLAIN AST {statement}").result_rows])
        kind = root.label.split()[0]
        if kind != "SelectWithUnionQuery":
            name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", kind.removesuffix("Query")).upper()
            raise AuditRefused(f"only SELECT queries are allowed, not {name}")
        for node in _walk(root):
            if node.label == "Set":
                raise AuditRefused("SETTINGS clauses are not allowed: the audit limits are fixed")
            if node.label.startswith("TableExpression") and node.children:
                inner = node.children[0].label
                if inner.startswith("Function "):
                    raise AuditRefused(
                        f"table functions are not allowed: {inner.split()[1]}(); "
                        f"query the audit tables {self._names()}"
                    )
        # After the SELECTs the root holds only the transport's FORMAT identifier; a literal
        # there is INTO OUTFILE.
        if any(not c.label.startswith("Identifier") for c in root.children[1:]):
            raise AuditRefused("INTO OUTFILE and FORMAT clauses are not allowed")

    def _check_names(self, statement: str, settings: Mapping[str, Any]) -> None:
        tree = self._query(f"EXPLAIN QUERY TREE {statement}", settings).result_rows
        for (line,) in tree:
            if m := _TABLE_FUNCTION.match(line):
                raise AuditRefused(f"table functions are not allowed: {m.group(1)}()")
            if m := _TABLE.match(line):
                self._check_table(m.group(1))
            elif m := _FUNCTION.match(line):
                name = m.group(1)
                if name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES):
                    raise AuditRefused(
                        f"function {name}() is not allowed: it reads outside the audit tables"
                    )

    def _check_table(self, qualified: str) -> None:
        database, _, table = qualified.partition(".")
        if qualified in IMPLICIT_TABLES:
            return
        if database != self.database or table not in self.tables:
            raise AuditRefused(
                f"table {qualified} is not allowed: only the audit tables {self._names()}"
            )

    def _names(self) -> str:
        return ", ".join(sorted(self.tables))

    def _query(
        self,
        sql: str,
        settings: Mapping[str, Any] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            return self.client.query(sql, parameters=parameters, settings=settings)
        except OperationalError as exc:
            if "DB::Exception" in str(exc):
                raise AuditFailed(_reason(exc)) from exc
            raise AuditUnavailable(f"ClickHouse is unreachable: {_first_line(exc)}") from exc
        except DatabaseError as exc:
            raise AuditFailed(_reason(exc)) from exc


def _parse_ast(lines: list[str]) -> _Node:
    """``EXPLAIN AST`` prints one node a line, indented one space per level."""
    root = _Node(lines[0].strip(), [])
    stack: list[tuple[int, _Node]] = [(0, root)]
    for line in lines[1:]:
        depth = len(line) - len(line.lstrip(" "))
        node = _Node(line.strip(), [])
        while stack[-1][0] >= depth:
            stack.pop()
        stack[-1][1].children.append(node)
        stack.append((depth, node))
    return root


def _walk(node: _Node) -> list[_Node]:
    return [node, *(n for child in node.children for n in _walk(child))]


def _reason(exc: Exception) -> str:
    """ClickHouse's message without the code prefix and the echoed query."""
    text = " ".join(str(exc).split())
    match = _MESSAGE.search(text)
    return match.group(1).strip() if match else _first_line(exc)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

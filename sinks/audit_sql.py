"""User SQL on the audit tables, one executor for the HTTP API and the CLI.

A statement is decided from its parsed form alone: nothing of it is evaluated, folded or run
until every check has passed. ClickHouse's analyzer is no checker: ``EXPLAIN QUERY TREE`` (and
any analysis) constant-folds scalar functions and runs scalar subqueries, so ``file('/etc/passwd')``
is read, ``sleep(2)`` sleeps, and ``SELECT toUInt8(file('/etc/passwd'))`` fails with the file in
the error text before a deny list could read the tree. The steps, each a query of its own on a
connection the caller gives (a read connection, never a writer's):

1. ``SELECT formatQuerySingleLine({sql:String})``: the SQL travels as a bound string, so it is
   parsed, never run; a syntax error or a second statement fails here. The canonical text it
   returns is what the next step checks and what finally runs.
2. ``SELECT parseQueryToJSON({sql:String})`` of that text: the parser's own tree as JSON, bound
   the same way (parse-only, like ``EXPLAIN AST``, whose text form does not name a CTE and prints
   a quoted name's line break as a new line of the tree).
3. :class:`Policy` walks the tree: one SELECT (a UNION, INTERSECT or EXCEPT of SELECTs); every
   node of a kind it knows; no ``SETTINGS``, ``INTO OUTFILE``, ``FORMAT``, query parameters or
   table functions; every table (in ``FROM``/``JOIN`` and on the right of ``IN``) one of the audit
   tables of the current database, or a CTE of an enclosing ``WITH``; every function on an allow
   list of ordinary pure functions (:data:`ALLOWED_FUNCTIONS`, aggregates with their combinators).
4. The canonical statement runs with ``AUDIT_LIMITS`` plus ``readonly=1``.

Errors never carry ClickHouse's text back: a refusal says why in this module's words, a failure
is a stable code (ClickHouse's error name, mapped from its number) with a reason of ours, and the
engine's message goes to the server log (``memstream.audit``). A value the engine computed (a
file's line, a cast that failed on it) cannot reach the caller through an error.

What chdb 4.4 (engine 26.9.2) does with each attack class, found by experiment with
clickhouse-connect 1.12 (which sends query settings to chdb as a trailing ``SETTINGS`` clause):

- Scalar functions run at analysis, before any check on the analyzed tree could refuse them:
  ``file()`` reads any file the process can (``/proc/self/environ`` too), ``sleep``/``sleepEachRow``
  sleep, a scalar subquery over ``system.tables`` runs; ``readonly=1`` stops none of these. Hence
  the allow list, checked on the parsed tree. Function names resolve exactly, then
  case-insensitively for the functions ClickHouse registers so (``file`` is not one of them:
  ``FILE('x')`` is an unknown function), and aliases (``system.functions.alias_to``) are allowed
  only where their target is: the policy mirrors that resolution.
- Table functions: ``readonly=1`` refuses ``file``, ``url``, ``s3``, ``remote``,
  ``executable``, ``mysql``, ``postgresql``, ``sqlite``, ``hdfs``, ``format`` and ``zeros``;
  but ``numbers``, ``values``, ``generateRandom``, ``view(SELECT ...)`` and ``merge(db, regexp)``
  run, and ``merge``/``view`` reach any table. The policy refuses every table function.
- Tables without ``FROM``: ``x IN name`` reads table ``name`` (``x IN system.one`` too); an
  identifier elsewhere in an expression never names a table. A CTE shadows a table of its name
  in its own query, its subqueries and the other CTEs of its ``WITH``, but not inside its own
  body (``WITH t AS (SELECT * FROM t)`` reads the real ``t``): the policy lets a CTE name stand
  for a table only where ClickHouse resolves it so, and a little less (its own body and later
  CTEs of the same ``WITH`` do not see it; nor does another SELECT of a UNION).
- ``INTO OUTFILE '/path'`` writes a file under ``readonly=1``: refused.
- ``SETTINGS`` in the query: ``readonly=1`` refuses changing any setting, ``readonly`` itself
  included, and ``SET`` too; refused first anyway, with a clearer reason.
- System tables: ``readonly=1`` leaves ``system.*`` and ``INFORMATION_SCHEMA`` readable; the
  policy refuses every database but the current one.
- Writes and DDL: ``readonly=1`` refuses them; the policy refuses them before anything runs.
- Limits: ``max_execution_time``, ``max_memory_usage`` and ``max_rows_to_read`` stop a query
  (TIMEOUT_EXCEEDED, MEMORY_LIMIT_EXCEEDED, TOO_MANY_ROWS) in every SELECT of a UNION and in
  its subqueries, and a query cannot raise them (readonly); ``max_result_rows`` with
  ``result_overflow_mode='throw'`` is checked between blocks, so one block over it
  (``arrayJoin(range(200000))``) still came back: the executor counts the rows itself.
- Multi-statements: chdb runs them (``SELECT 1; SELECT 2`` returns both), and the trailing
  settings bind to the last statement only. Step 1 refuses them before the engine sees them.

Row restrictions (governance) pass as ``row_filters``: table name -> SQL condition, applied by
ClickHouse's ``additional_table_filters`` to every read of that table, views included.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from sinks.clickhouse import AUDIT_TABLES

log = logging.getLogger("memstream.audit")

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


class AuditError(Exception):
    """A statement that did not run. ``code`` is stable (a policy code, or ClickHouse's error
    name), ``reason`` says why in words for the caller; neither carries ClickHouse's message."""

    error = "audit_error"

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def as_dict(self) -> dict[str, str]:
        return {"error": self.error, "code": self.code, "reason": self.reason}


class AuditRefused(AuditError):
    """Refused by the audit policy before anything of it ran."""

    error = "audit_refused"


class AuditFailed(AuditError):
    """ClickHouse refused or stopped it: syntax, an unknown column, a limit."""

    error = "audit_failed"


class AuditUnavailable(AuditError):
    """The engine or server could not be reached."""

    error = "audit_unavailable"


@dataclass(frozen=True)
class AuditResult:
    columns: list[str]
    rows: list[Sequence[Any]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class AuditSQL:
    """Runs one user SELECT on the audit tables of a clickhouse-connect client (chdb or a
    server). Give it a connection of its own (``Stores.audit`` opens one per statement): a
    query may run for ``max_execution_time``, and nothing else should wait for it."""

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
        statement = self._single_statement(sql)
        try:
            Policy(self.database, self.tables).check(self._tree(statement))
        except RecursionError:  # json.loads and the walk recurse once per level of the tree
            raise AuditRefused(
                "TOO_DEEP", "the query nests too deeply for the audit policy to inspect"
            ) from None
        settings: dict[str, Any] = dict(self.limits)
        if row_filters:
            settings["additional_table_filters"] = dict(row_filters)
        settings["readonly"] = 1
        result = self._query(statement, settings)
        limit = int(self.limits["max_result_rows"])
        if len(result.result_rows) > limit:  # the engine checks between blocks only
            raise AuditFailed(
                "TOO_MANY_ROWS_OR_BYTES",
                f"Limit for result exceeded: more than {limit} rows; aggregate or add a LIMIT",
            )
        return AuditResult(list(result.column_names), list(result.result_rows))

    def _single_statement(self, sql: str) -> str:
        return self._parse_only("formatQuerySingleLine", sql)

    def _tree(self, statement: str) -> dict[str, Any]:
        try:
            return json.loads(self._parse_only("parseQueryToJSON", statement))
        except AuditFailed as exc:
            if exc.code == "UNKNOWN_FUNCTION":  # a server older than 26.8
                raise AuditUnavailable(
                    "UNSUPPORTED_SERVER",
                    "audit SQL needs ClickHouse 26.8 or later (its parser's parseQueryToJSON)",
                ) from None
            if exc.code != "BAD_ARGUMENTS":
                raise
            # A statement kind without a JSON form (DESCRIBE, ...) is not a SELECT either.
            word = statement.split(maxsplit=1)[0].upper() if statement.split() else ""
            if re.fullmatch(r"[A-Z]+", word) and word not in ("SELECT", "WITH"):
                raise AuditRefused(
                    "NOT_SELECT", f"only SELECT queries are allowed, not {word}"
                ) from None
            raise AuditRefused(
                "UNSUPPORTED_SYNTAX", "the query uses syntax the audit policy cannot inspect"
            ) from None

    def _parse_only(self, function: str, sql: str) -> str:
        """``function`` (a parser: nothing in its argument is evaluated) of ``sql`` bound as a
        string."""
        query = f"SELECT {function}({{sql:String}})"
        return self._query(query, {"readonly": 1}, {"sql": sql}).result_rows[0][0]

    def _query(
        self,
        sql: str,
        settings: Mapping[str, Any] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            return self.client.query(sql, parameters=parameters, settings=settings)
        except RecursionError:  # clickhouse-connect parses a result type's nesting recursively
            raise AuditFailed("TOO_DEEP", "the result's type nests too deeply") from None
        except DatabaseError as exc:
            code = getattr(exc, "code", None)
            if (
                isinstance(exc, OperationalError)
                and code is None
                and "DB::Exception" not in str(exc)
            ):
                log.warning("audit SQL: ClickHouse unreachable: %s", exc)
                raise AuditUnavailable("UNAVAILABLE", "ClickHouse could not be reached") from None
            # The engine's words go to the log only, and the exception is not chained: its text
            # can hold what the query computed.
            log.info("audit SQL failed in ClickHouse (code %s): %s", code, exc)
            if code == 62 and "Multi-statements are not allowed" in str(exc):
                raise AuditRefused("MULTIPLE_STATEMENTS", "only one statement is allowed") from None
            raise engine_error(code) from None


def engine_error(code: int | None) -> AuditFailed:
    """The caller's view of a ClickHouse error: its name and a reason of ours, from its number
    alone (the message may hold values the engine computed)."""
    name, reason = ENGINE_ERRORS.get(code or 0, ("", ""))
    if not name:
        return AuditFailed(
            "ENGINE_ERROR", f"ClickHouse could not run the query (error {code or '?'})"
        )
    return AuditFailed(name, reason)


ENGINE_ERRORS: dict[int, tuple[str, str]] = {
    6: ("CANNOT_PARSE_TEXT", "a value could not be parsed as the type asked for"),
    27: ("CANNOT_PARSE_INPUT_ASSERTION_FAILED", "a value could not be parsed as asked for"),
    32: ("ATTEMPT_TO_READ_AFTER_EOF", "a value could not be parsed as the type asked for"),
    10: ("NOT_FOUND_COLUMN_IN_BLOCK", "the query names a column that does not exist there"),
    16: ("NO_SUCH_COLUMN_IN_TABLE", "the query names a column that does not exist"),
    20: ("NUMBER_OF_COLUMNS_DOESNT_MATCH", "the two sides of a comparison have different sizes"),
    35: ("TOO_FEW_ARGUMENTS_FOR_FUNCTION", "a function got too few arguments"),
    36: ("BAD_ARGUMENTS", "a function or clause got an argument it does not take"),
    38: ("CANNOT_PARSE_DATE", "a value could not be parsed as a date"),
    41: ("CANNOT_PARSE_DATETIME", "a value could not be parsed as a date and time"),
    42: ("NUMBER_OF_ARGUMENTS_DOESNT_MATCH", "a function got the wrong number of arguments"),
    43: ("ILLEGAL_TYPE_OF_ARGUMENT", "a function got an argument of a type it does not take"),
    44: ("ILLEGAL_COLUMN", "a function got a column it does not take"),
    46: ("UNKNOWN_FUNCTION", "the query calls a function that does not exist"),
    47: ("UNKNOWN_IDENTIFIER", "the query names a column or alias that does not exist"),
    48: ("NOT_IMPLEMENTED", "ClickHouse does not support this combination"),
    53: ("TYPE_MISMATCH", "a value does not match the type it is used as"),
    50: ("UNKNOWN_TYPE", "the query names a data type that does not exist"),
    59: ("ILLEGAL_TYPE_OF_COLUMN_FOR_FILTER", "a WHERE or HAVING condition is not a boolean"),
    60: ("UNKNOWN_TABLE", "the query names a table that does not exist"),
    62: ("SYNTAX_ERROR", "the query is not valid ClickHouse SQL"),
    63: ("UNKNOWN_AGGREGATE_FUNCTION", "the query calls an aggregate function that does not exist"),
    69: ("ARGUMENT_OUT_OF_BOUND", "an argument is out of the range a function takes"),
    70: ("CANNOT_CONVERT_TYPE", "a value could not be converted to the type asked for"),
    72: ("CANNOT_PARSE_NUMBER", "a value could not be parsed as a number"),
    81: ("UNKNOWN_DATABASE", "the query names a database that does not exist"),
    125: ("INCORRECT_RESULT_OF_SCALAR_SUBQUERY", "a scalar subquery returned more than one row"),
    128: ("TOO_LARGE_ARRAY_SIZE", "an array would be larger than ClickHouse allows"),
    131: ("TOO_LARGE_STRING_SIZE", "a string would be larger than ClickHouse allows"),
    153: ("ILLEGAL_DIVISION", "the query divides an integer by zero"),
    158: ("TOO_MANY_ROWS", "the query reads more rows than the audit limit allows"),
    159: ("TIMEOUT_EXCEEDED", "the query ran longer than the audit time limit"),
    160: ("TOO_SLOW", "the query would run longer than the audit time limit"),
    164: ("READONLY", "audit SQL is read-only and cannot change settings"),
    179: ("MULTIPLE_EXPRESSIONS_FOR_ALIAS", "one alias names two different expressions"),
    184: ("ILLEGAL_AGGREGATION", "an aggregate function is used where it cannot be"),
    190: ("SIZES_OF_ARRAYS_DONT_MATCH", "arrays of different sizes are combined element-wise"),
    215: ("NOT_AN_AGGREGATE", "a column is neither aggregated nor in GROUP BY"),
    241: ("MEMORY_LIMIT_EXCEEDED", "the query needs more memory than the audit limit allows"),
    258: ("UNION_ALL_RESULT_STRUCTURES_MISMATCH", "the SELECTs of a UNION differ in columns"),
    306: ("TOO_DEEP_RECURSION", "the query nests too deeply"),
    321: ("VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE", "a value is out of the range of its type"),
    352: ("AMBIGUOUS_COLUMN_NAME", "a column name matches more than one table; qualify it"),
    386: ("NO_COMMON_TYPE", "values of types with no common type are combined"),
    394: ("QUERY_WAS_CANCELLED", "the query was cancelled"),
    396: ("TOO_MANY_ROWS_OR_BYTES", "the result is over the audit limit; aggregate or add a LIMIT"),
    403: ("INVALID_JOIN_ON_EXPRESSION", "a JOIN's ON condition is not one ClickHouse can use"),
    407: ("DECIMAL_OVERFLOW", "a decimal value overflowed its type"),
}  # fmt: skip


# -- the policy ------------------------------------------------------------------------------

#: Kinds of node the policy knows what to do with; any other refuses the statement.
NODE_TYPES = frozenset({
    "SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "ExpressionList",
    "TablesInSelectQuery", "TablesInSelectQueryElement", "TableExpression", "TableIdentifier",
    "TableJoin", "ArrayJoin", "Subquery", "WithElement", "Function", "Identifier", "Literal",
    "Asterisk", "QualifiedAsterisk", "ColumnsRegexpMatcher", "ColumnsListMatcher",
    "QualifiedColumnsRegexpMatcher", "QualifiedColumnsListMatcher", "ColumnsTransformerList",
    "ColumnsExceptTransformer", "ColumnsReplaceTransformer", "ColumnsReplaceTransformerReplacement",
    "ColumnsApplyTransformer", "OrderByElement", "WindowDefinition", "WindowListElement",
    "SampleRatio", "InterpolateElement",
})  # fmt: skip
#: The keys a SELECT's root (and a subquery's) may have; INTO OUTFILE, FORMAT, COMPRESSION and
#: anything new refuse it.
UNION_KEYS = frozenset({
    "type", "union_mode", "list_of_modes", "list_of_selects", "is_outfile_append",
    "is_outfile_truncate", "is_into_outfile_with_stdout",
})  # fmt: skip
#: ``x IN <table>`` reads the table: the right side of these is checked as a table.
IN_FUNCTIONS = frozenset({
    "in", "notIn", "globalIn", "globalNotIn", "nullIn", "notNullIn", "globalNullIn",
    "globalNotNullIn",
})  # fmt: skip
#: Suffixes that make an aggregate function of an aggregate (``countIf``, ``sumArray``,
#: ``uniqMerge``, ``avgState``...): ClickHouse's combinators but its internal ``Null``.
COMBINATORS = ("SimpleState", "OrDefault", "Distinct", "Resample", "ForEach", "ArgMax", "ArgMin",
               "OrNull", "Merge", "State", "Array", "Tuple", "Map", "If")  # fmt: skip


class Policy:
    """What audit SQL may be, decided on the parser's tree (``parseQueryToJSON``) alone."""

    def __init__(self, database: str, tables: frozenset[str] = AUDIT_TABLES) -> None:
        self.database = database
        self.tables = tables

    def check(self, tree: Mapping[str, Any]) -> None:
        """Raise :class:`AuditRefused` unless ``tree`` is one SELECT the policy allows."""
        kind = str(tree.get("type", ""))
        if kind != "SelectWithUnionQuery":
            name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", kind.removesuffix("Query")).upper()
            raise AuditRefused("NOT_SELECT", f"only SELECT queries are allowed, not {name}")
        self._node(tree, frozenset())

    def _node(self, node: Any, ctes: frozenset[str]) -> None:
        """Check ``node`` and what is under it; ``ctes``: the CTE names a table may name here."""
        if isinstance(node, list):
            for item in node:
                self._node(item, ctes)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind == "SetQuery":
            raise AuditRefused(
                "SETTINGS", "SETTINGS clauses are not allowed: the audit limits are fixed"
            )
        if kind == "QueryParameter":
            raise AuditRefused(
                "QUERY_PARAMETER", "query parameters ({name:Type}) are not supported"
            )
        if kind not in NODE_TYPES:
            raise AuditRefused(
                "UNSUPPORTED_SYNTAX",
                f"the query uses syntax the audit policy does not allow ({_shown(kind)})",
            )
        if kind == "Literal":
            return  # data, never evaluated as a name or a call
        if kind in ("SelectWithUnionQuery", "SelectIntersectExceptQuery"):
            self._select_root(node)
        elif kind == "SelectQuery":
            self._select(node, ctes)
            return
        elif kind == "TableExpression" and node.get("table_function") is not None:
            function = node["table_function"]
            name = _shown(function.get("name") if isinstance(function, dict) else function)
            raise AuditRefused(
                "TABLE_FUNCTION",
                f"table functions are not allowed: {name}(); "
                f"query the audit tables {self._names()}",
            )
        elif kind == "TableIdentifier":
            self._table(node, ctes)
        elif kind == "Function":
            self._function(node, ctes)
        elif kind == "ColumnsApplyTransformer" and node.get("func_name"):
            self._function_name(str(node["func_name"]))
        for key, value in node.items():
            if key != "type":
                self._node(value, ctes)

    def _select_root(self, node: Mapping[str, Any]) -> None:
        extra = set(node) - UNION_KEYS
        if node.get("type") == "SelectIntersectExceptQuery":
            extra -= {"final_operator", "children", "list_of_modes", "selects"}
        flags = ("is_outfile_append", "is_outfile_truncate", "is_into_outfile_with_stdout")
        if extra & {"out_file", "format_ast", "compression", "compression_level"} or any(
            node.get(f) for f in flags
        ):
            raise AuditRefused("OUTPUT_CLAUSE", "INTO OUTFILE and FORMAT clauses are not allowed")
        if extra:
            raise AuditRefused(
                "UNSUPPORTED_SYNTAX",
                f"the query uses a clause the audit policy does not allow ({_shown(min(extra))})",
            )

    def _select(self, node: Mapping[str, Any], ctes: frozenset[str]) -> None:
        """A SELECT: its ``WITH`` defines CTEs for its other clauses and their subqueries. A
        CTE's body (and any ``WITH`` expression) sees only the CTEs before it, never itself."""
        items = (node.get("with") or {}).get("children") or []
        names = [
            str(i.get("name"))
            for i in items
            if isinstance(i, dict) and i.get("type") == "WithElement"
        ]
        before: list[str] = []
        for item in items:
            if isinstance(item, dict) and item.get("type") == "WithElement":
                own = str(item.get("name"))
                self._node(item.get("subquery"), (ctes | frozenset(before)) - {own})
                before.append(own)
            else:
                self._node(item, ctes | frozenset(before))
        inner = ctes | frozenset(names)
        for key, value in node.items():
            if key not in ("type", "with"):
                self._node(value, inner)

    def _table(self, node: Mapping[str, Any], ctes: frozenset[str]) -> None:
        parts = [str(p) for p in node.get("name_parts") or [node.get("name", "")]]
        if len(parts) == 1 and parts[0] in ctes:
            return
        if len(parts) == 2 and parts[0] == self.database:
            parts = parts[1:]
        if len(parts) != 1 or parts[0] not in self.tables:
            shown = _shown(".".join(str(p) for p in node.get("name_parts") or [node.get("name")]))
            raise AuditRefused(
                "TABLE_NOT_ALLOWED",
                f"table {shown} is not allowed: only the audit tables {self._names()}",
            )

    def _function(self, node: Mapping[str, Any], ctes: frozenset[str]) -> None:
        name = str(node.get("name", ""))
        self._function_name(name)
        if name in IN_FUNCTIONS:
            args = (node.get("arguments") or {}).get("children") or []
            right = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
            if right.get("type") == "Identifier":
                self._table(right, ctes)
            elif right.get("type") == "Function" and right.get("name") not in ("tuple", "array"):
                raise AuditRefused(
                    "IN_EXPRESSION",
                    f"the right side of {name} must be a list, a subquery or an audit table",
                )

    def _function_name(self, name: str) -> None:
        if not function_allowed(name):
            raise AuditRefused(
                "FUNCTION_NOT_ALLOWED",
                f"function {_shown(name)}() is not allowed: audit SQL calls ordinary pure "
                "functions only (nothing that reads files, settings, the server, dictionaries or "
                "other tables, or sleeps)",
            )

    def _names(self) -> str:
        return ", ".join(sorted(self.tables))


def _shown(name: Any, limit: int = 64) -> str:
    text = str(name)
    return text if len(text) <= limit else text[:limit] + "..."


def function_allowed(name: str) -> bool:
    """Whether ``name`` resolves, as ClickHouse resolves function names, to an allowed function:
    exactly, or case-insensitively where ClickHouse registers it so, or an allowed aggregate
    with combinator suffixes."""
    return _plain_allowed(name, ALLOWED_FUNCTIONS, _CASE_INSENSITIVE) or _combined(name)


def _plain_allowed(name: str, exact: frozenset[str], folded: frozenset[str]) -> bool:
    return name in exact or name.lower() in folded


def _combined(name: str) -> bool:
    for suffix in COMBINATORS:
        base = name.removesuffix(suffix)
        if (
            base != name
            and base
            and (
                _plain_allowed(base, AGGREGATE_FUNCTIONS, _CASE_INSENSITIVE_AGGREGATES)
                or _combined(base)
            )
        ):
            return True
    return False


def _names(text: str) -> Iterator[tuple[str, bool]]:
    """``(name, case_insensitive)`` of each word of a list below: ``*`` marks the functions
    ClickHouse also resolves in any case (``system.functions.case_insensitive``)."""
    for line in text.splitlines():
        if not line.startswith("#"):
            for word in line.split():
                yield word.rstrip("*"), word.endswith("*")


# The allow list, from chdb 4.4's system.functions (engine 26.9.2): every function of the
# categories below, and the aliases of those, but for the exclusions listed; a function an
# engine upgrade adds is refused until it is added here. Left out on purpose: what reads files
# (file), the environment or the server (getSetting, getServerSetting, getMacro, hostName,
# currentUser, serverTimezone, timezone, version, uptime, filesystem*, showCertificate,
# getClientHTTPHeader, the Introspection and Internal categories), dictionaries and other tables
# (dict*, joinGet*, hasColumnInTable, region*, the Dictionary categories), what sleeps (sleep,
# sleepEachRow) or calls out (the AI functions), what takes a function or format by name as a
# string (arrayReduce, initializeAggregation, formatRow, groupFormat), query parsers and
# fuzzers, the ML, encryption, geo, bitmap and time-series families, random strings, and the
# URL functions reading the server's domain lists (*Custom*).
_SCALAR_TEXT = """
# Arithmetic
abs* avg2* byteSwap* divide divideDecimal divideOrNull gcd ifNotFinite intDiv intDivOrNull
intDivOrZero isFinite isInfinite isNaN lcm max2* midpoint* min2* minus mod* modOrNull* modulo
moduloLegacy moduloOrNull moduloOrZero multiply multiplyDecimal negate plus pmod* pmodOrNull*
positive_modulo* positive_modulo_or_null* positiveModulo* positiveModuloOrNull* sqr*
# Comparison
equals globalIn globalNotIn globalNotNullIn globalNullIn greater greaterOrEquals in isDistinctFrom
isNotDistinctFrom less lessOrEquals notEquals notIn notNullIn nullIn
# Logical
and not* or xor
# Conditional
caseWithoutExpr caseWithoutExpression clamp greatest* if* least* multiIf
# Null
assumeNotNull coalesce* firstNonDefault* ifNull* isNotNull isNull* isNullable isZeroOrNull nullIf*
toNullable
# Rounding
ceil* ceiling* floor* round* roundAge roundBankers roundDown roundDuration roundToExp2 trunc*
truncate*
# Mathematical
acos* acosh asin* asinh atan* atan2* atanh cbrt cos* cosh degrees* e erf erfc exp* exp10 exp2
factorial* hypot* intExp10 intExp2 isPrime isProbablePrime lgamma ln* log* log10* log1p log2* pi*
pow* power* proportionsZTest radians* sigmoid sign* sin* sinh sqrt* tan* tanh* tgamma width_bucket*
widthBucket
# Bit
bitAnd bitCount bitHammingDistance bitNot bitOr bitRotateLeft bitRotateRight bitShiftLeft
bitShiftRight bitSlice bitTest bitTestAll bitTestAny bitXor
# Encoding
bin* bitmaskToArray bitmaskToList bitPositionsToArray char* hex* hilbertDecode hilbertEncode
mortonDecode mortonEncode sqid sqidDecode sqidEncode unbin* unhex*
# String
appendTrailingCharIfAbsent ascii* base32Decode base32Encode base58Decode base58Encode base64Decode
base64Encode base64URLDecode base64URLEncode basename byteHammingDistance byteSlice* caseFoldUTF8
CHAR_LENGTH* CHARACTER_LENGTH* compareSubstrings concat* concat_ws* concatAssumeInjective
concatWithSeparator concatWithSeparatorAssumeInjective conv convertCharset CRC32* CRC32IEEE* CRC64*
damerauLevenshteinDistance decodeHTMLComponent decodeXMLComponent editDistance editDistanceUTF8
encodeXMLComponent endsWith endsWithCaseInsensitive endsWithCaseInsensitiveUTF8 endsWithUTF8
extractTextFromHTML firstLine FROM_BASE64* initcap* initcapUTF8 isASCII isValidASCII isValidUTF8
jaroSimilarity jaroWinklerSimilarity lcase* left* leftPad leftPadUTF8 leftUTF8 lengthUTF8
levenshteinDistance levenshteinDistanceUTF8 lower* lowerUTF8 lpad* ltrim mid* mismatches
NATURAL_SORT_KEY* naturalSortKey normalizeUTF8NFC normalizeUTF8NFD normalizeUTF8NFKC
normalizeUTF8NFKCCasefold normalizeUTF8NFKD REGEXP_EXTRACT* regexp_instr* REGEXP_SUBSTR*
regexpExtract regexpInstr* regexpPosition removeAccentsUTF8 removeDiacriticsUTF8 repeat*
reverseUTF8 right* rightPad rightPadUTF8 rightUTF8 rpad* rtrim soundex* space* sparseGrams
sparseGramsHashes sparseGramsHashesUTF8 sparseGramsUTF8 startsWith startsWithCaseInsensitive
startsWithCaseInsensitiveUTF8 startsWithUTF8 stringBytesEntropy stringBytesUniq stringJaccardIndex
stringJaccardIndexUTF8 substr* substring* SUBSTRING_INDEX* substringIndex substringIndexUTF8
substringUTF8 TO_BASE64* toValidUTF8 trim trimBoth trimLeft trimRight tryBase32Decode
tryBase58Decode tryBase64Decode tryBase64URLDecode ucase* upper* upperUTF8
# String Search
countMatches countMatchesCaseInsensitive countSubstrings* countSubstringsCaseInsensitive
countSubstringsCaseInsensitiveUTF8 extract extractAll extractAllGroupsHorizontal extractGroups
hasAllToken hasAllTokens hasAnyToken hasAnyTokens hasPhrase hasSubsequence*
hasSubsequenceCaseInsensitive* hasSubsequenceCaseInsensitiveUTF8* hasSubsequenceUTF8* hasToken
hasTokenCaseInsensitive* hasTokenCaseInsensitiveOrNull* hasTokenOrNull highlight ilike instr* like
locate* match matchCaseInsensitive matchPhrase multiFuzzyMatchAllIndices multiFuzzyMatchAny
multiFuzzyMatchAnyIndex multiMatchAllIndices multiMatchAny multiMatchAnyIndex
multiSearchAllPositions multiSearchAllPositionsCaseInsensitive
multiSearchAllPositionsCaseInsensitiveUTF8 multiSearchAllPositionsUTF8 multiSearchAny
multiSearchAnyCaseInsensitive multiSearchAnyCaseInsensitiveUTF8 multiSearchAnyUTF8
multiSearchFirstIndex multiSearchFirstIndexCaseInsensitive multiSearchFirstIndexCaseInsensitiveUTF8
multiSearchFirstIndexUTF8 multiSearchFirstPosition multiSearchFirstPositionCaseInsensitive
multiSearchFirstPositionCaseInsensitiveUTF8 multiSearchFirstPositionUTF8 ngramDistance
ngramDistanceCaseInsensitive ngramDistanceCaseInsensitiveUTF8 ngramDistanceUTF8 ngramSearch
ngramSearchCaseInsensitive ngramSearchCaseInsensitiveUTF8 ngramSearchUTF8 notILike notLike notMatch
notMatchCaseInsensitive position* positionCaseInsensitive positionCaseInsensitiveUTF8 positionUTF8
REGEXP_MATCHES*
# String Replacement
format overlay* overlayUTF8 printf REGEXP_REPLACE* regexpQuoteMeta replace* replaceAll replaceOne
replaceRegexpAll replaceRegexpOne translate translateUTF8
# String Splitting
alphaTokens array_to_string* arrayStringConcat extractAllGroups extractAllGroupsVertical
naiveBayesNgrams ngrams reverseBySeparator splitByAlpha splitByChar splitByNonAlpha splitByRegexp
splitByString splitByWhitespace tokens tokensForLikePattern
# Dates and Times
addDate* addDays addHours addInterval addMicroseconds addMilliseconds addMinutes addMonths
addNanoseconds addQuarters addSeconds addTupleOfIntervals addWeeks addYears age* changeDay
changeHour changeMinute changeMonth changeSecond changeYear curdate* current_date*
current_timestamp* date_bin* DATE_DIFF date_diff DATE_FORMAT* DATE_TRUNC* dateDiff* dateName*
dateTrunc DAY* DAYOFMONTH* DAYOFWEEK* DAYOFYEAR* formatDateTime formatDateTimeInJodaSyntax
FROM_DAYS* FROM_UNIXTIME* from_utc_timestamp* fromDaysSinceYearZero fromDaysSinceYearZero32
fromModifiedJulianDay fromModifiedJulianDayOrNull fromUnixTimestamp fromUnixTimestampInJodaSyntax
fromUTCTimestamp HOUR* LAST_DAY* localtime* localtimestamp* makeDate* makeDate32* makeDateTime*
makeDateTime64* MICROSECOND* MILLISECOND* MINUTE* MONTH* monthName* NANOSECOND* now* now64*
nowInBlock nowInBlock64 QUARTER* SECOND* subDate* subtractDays subtractHours subtractInterval
subtractMicroseconds subtractMilliseconds subtractMinutes subtractMonths subtractNanoseconds
subtractQuarters subtractSeconds subtractTupleOfIntervals subtractWeeks subtractYears time_bucket*
timeDiff* timeSlot timeSlots timestamp* TIMESTAMP_DIFF timestamp_diff timestampDiff timeZoneOf
timezoneOf timeZoneOffset timezoneOffset TO_DAYS* to_utc_timestamp* today* toDayOfMonth toDayOfWeek
toDayOfYear toDaysInMonth toDaysSinceYearZero toHour toISOWeek toISOYear toLastDayOfMonth
toLastDayOfWeek toMicrosecond toMillisecond toMinute toModifiedJulianDay toModifiedJulianDayOrNull
toMonday toMonth toMonthNumSinceEpoch toNanosecond toQuarter toRelativeDayNum toRelativeHourNum
toRelativeMinuteNum toRelativeMonthNum toRelativeQuarterNum toRelativeSecondNum toRelativeWeekNum
toRelativeYearNum toSecond toStartOfDay toStartOfFifteenMinutes toStartOfFiveMinute
toStartOfFiveMinutes toStartOfHour toStartOfInterval toStartOfISOYear toStartOfMicrosecond
toStartOfMillisecond toStartOfMinute toStartOfMonth toStartOfNanosecond toStartOfQuarter
toStartOfSecond toStartOfTenMinutes toStartOfWeek toStartOfYear toTimeWithFixedDate toTimeZone
toTimezone toUnixTimestamp toUTCTimestamp toWeek toYear toYearNumSinceEpoch toYearWeek toYYYYMM
toYYYYMMDD toYYYYMMDDhhmmss UTC_timestamp* UTCTimestamp* week* YEAR* yearweek* yesterday
YYYYMMDDhhmmssToDateTime* YYYYMMDDhhmmssToDateTime64 YYYYMMDDToDate* YYYYMMDDToDate32*
# Arrays
array array_remove* arrayAll arrayAUC arrayAUCPR arrayAutocorrelation arrayAvg arrayBottomK
arrayCompact arrayConcat arrayCount arrayCumSum arrayCumSumNonNegative arrayDifference
arrayDistinct arrayDotProduct arrayElement arrayElementOrNull arrayEnumerate arrayEnumerateDense
arrayEnumerateDenseRanked arrayEnumerateUniq arrayEnumerateUniqRanked arrayExcept arrayExists
arrayFill arrayFilter arrayFirst arrayFirstIndex arrayFirstOrNull arrayFlatten arrayFlattenedLength
arrayFold arrayIntersect arrayJaccardIndex arrayJoin arrayLast arrayLastIndex arrayLastOrNull
arrayLevenshteinDistance arrayLevenshteinDistanceWeighted arrayMap arrayMax arrayMin
arrayNormalizedGini arrayPartialReverseSort arrayPartialShuffle* arrayPartialSort arrayPopBack
arrayPopFront arrayPRAUC arrayProduct arrayPushBack arrayPushFront arrayRandomSample arrayRemove
arrayResize arrayReverse arrayReverseFill arrayReverseSort arrayReverseSplit arrayROCAUC
arrayRotateLeft arrayRotateRight arrayShiftLeft arrayShiftRight arrayShingles arrayShuffle*
arraySimilarity arraySlice arraySort arraySplit arraySum arraySymmetricDifference arrayTopK
arrayTranspose arrayUnion arrayUniq arrayWithConstant arrayZip arrayZipUnaligned CARDINALITY*
countEqual empty emptyArrayDate emptyArrayDateTime emptyArrayFloat32 emptyArrayFloat64
emptyArrayInt16 emptyArrayInt32 emptyArrayInt64 emptyArrayInt8 emptyArrayString emptyArrayToSingle
emptyArrayUInt16 emptyArrayUInt32 emptyArrayUInt64 emptyArrayUInt8 flatten* has hasAll hasAny
hasSubstr indexOf indexOfAssumeSorted length* notEmpty notHas OCTET_LENGTH* randomHadamardTransform
range replicate reverse* unnest*
# Tuple
dotProduct flattenTuple scalarProduct* tuple tupleConcat tupleDivide tupleDivideByNumber
tupleElement tupleHammingDistance tupleIntDiv tupleIntDivByNumber tupleIntDivOrZero
tupleIntDivOrZeroByNumber tupleMinus tupleModulo tupleModuloByNumber tupleMultiply
tupleMultiplyByNumber tupleNames tupleNegate tuplePlus tuplePositiveModuloByNumber
tupleToNameValuePairs vectorDifference* vectorSum*
# Map
extractKeyValuePairs extractKeyValuePairsWithEscaping map MAP_FROM_ARRAYS mapAdd mapAll mapApply
mapConcat mapContains mapContainsKey mapContainsKeyLike mapContainsValue mapContainsValueLike
mapExists mapExtractKeyLike mapExtractValueLike mapFilter mapFromArrays mapFromString mapKeys
mapPartialReverseSort mapPartialSort mapPopulateSeries mapReverseSort mapSort mapSubtract mapUpdate
mapValues str_to_map*
# JSON
dynamicElement dynamicType isDynamicElementInSharedData isValidJSON JSON_ARRAY_LENGTH* JSON_EXISTS
JSON_QUERY JSON_VALUE JSONAllPaths JSONAllPathsWithTypes JSONAllValues JSONArrayLength
JSONDynamicPaths JSONDynamicPathsWithTypes JSONExtract JSONExtractArrayRaw
JSONExtractArrayRawCaseInsensitive JSONExtractBool JSONExtractBoolCaseInsensitive
JSONExtractCaseInsensitive JSONExtractFloat JSONExtractFloatCaseInsensitive JSONExtractInt
JSONExtractIntCaseInsensitive JSONExtractKeys JSONExtractKeysAndValues
JSONExtractKeysAndValuesCaseInsensitive JSONExtractKeysAndValuesRaw
JSONExtractKeysAndValuesRawCaseInsensitive JSONExtractKeysCaseInsensitive JSONExtractRaw
JSONExtractRawCaseInsensitive JSONExtractString JSONExtractStringCaseInsensitive JSONExtractUInt
JSONExtractUIntCaseInsensitive JSONHas JSONKey JSONLength JSONMergePatch jsonMergePatch
JSONSharedDataPaths JSONSharedDataPathsWithTypes JSONType prettyPrintJSON simpleJSONExtractBool
simpleJSONExtractFloat simpleJSONExtractInt simpleJSONExtractRaw simpleJSONExtractString
simpleJSONExtractUInt simpleJSONHas toJSONString visitParamExtractBool visitParamExtractFloat
visitParamExtractInt visitParamExtractRaw visitParamExtractString visitParamExtractUInt
visitParamHas
# Hash
cityHash64 farmFingerprint64 farmHash64 gccMurmurHash halfMD5 hiveHash icebergHash intHash32
intHash64 javaHash javaHashUTF16LE jumpConsistentHash kafkaMurmurHash keccak256
kostikConsistentHash MD4 MD5 metroHash64 murmurHash2_32 murmurHash2_64 murmurHash3_128
murmurHash3_32 murmurHash3_64 ngramMinHash ngramMinHashArg ngramMinHashArgCaseInsensitive
ngramMinHashArgCaseInsensitiveUTF8 ngramMinHashArgUTF8 ngramMinHashCaseInsensitive
ngramMinHashCaseInsensitiveUTF8 ngramMinHashUTF8 ngramSimHash ngramSimHashCaseInsensitive
ngramSimHashCaseInsensitiveUTF8 ngramSimHashUTF8 RIPEMD160 SHA1 SHA224 SHA256 SHA384 SHA512
SHA512_256 sipHash128 sipHash128Keyed sipHash128Reference sipHash128ReferenceKeyed sipHash64
sipHash64Keyed URLHash wordShingleMinHash wordShingleMinHashArg
wordShingleMinHashArgCaseInsensitive wordShingleMinHashArgCaseInsensitiveUTF8
wordShingleMinHashArgUTF8 wordShingleMinHashCaseInsensitive wordShingleMinHashCaseInsensitiveUTF8
wordShingleMinHashUTF8 wordShingleSimHash wordShingleSimHashCaseInsensitive
wordShingleSimHashCaseInsensitiveUTF8 wordShingleSimHashUTF8 wyHash64 xxh3 xxh3_128 xxHash32
xxHash64 xxHash64Spark yandexConsistentHash
# UUID
dateTime64ToSnowflakeID dateTimeToSnowflakeID dateTimeToUUIDv7 generateSnowflakeID generateUUIDv4
generateUUIDv7 snowflakeIDToDateTime snowflakeIDToDateTime64 toUUIDOrDefault toUUIDOrNull
UUIDNumToString UUIDStringToNum UUIDToNum UUIDv7ToDateTime
# Type Conversion
accurateCast accurateCastOrDefault accurateCastOrNull CAST* DATE* fromUnixTimestamp64Micro
fromUnixTimestamp64Milli fromUnixTimestamp64Nano fromUnixTimestamp64Second parseDateTime
parseDateTime32BestEffort parseDateTime32BestEffortOrNull parseDateTime32BestEffortOrZero
parseDateTime64 parseDateTime64BestEffort parseDateTime64BestEffortOrNull
parseDateTime64BestEffortOrZero parseDateTime64BestEffortUS parseDateTime64BestEffortUSOrNull
parseDateTime64BestEffortUSOrZero parseDateTime64InJodaSyntax parseDateTime64InJodaSyntaxOrNull
parseDateTime64InJodaSyntaxOrZero parseDateTime64OrNull parseDateTime64OrZero
parseDateTimeBestEffort parseDateTimeBestEffortOrNull parseDateTimeBestEffortOrZero
parseDateTimeBestEffortUS parseDateTimeBestEffortUSOrNull parseDateTimeBestEffortUSOrZero
parseDateTimeInJodaSyntax parseDateTimeInJodaSyntaxOrNull parseDateTimeInJodaSyntaxOrZero
parseDateTimeOrNull parseDateTimeOrZero reinterpret reinterpretAsDate reinterpretAsDateTime
reinterpretAsFixedString reinterpretAsFloat32 reinterpretAsFloat64 reinterpretAsInt128
reinterpretAsInt16 reinterpretAsInt256 reinterpretAsInt32 reinterpretAsInt64 reinterpretAsInt8
reinterpretAsString reinterpretAsUInt128 reinterpretAsUInt16 reinterpretAsUInt256
reinterpretAsUInt32 reinterpretAsUInt64 reinterpretAsUInt8 reinterpretAsUUID str_to_date*
TO_UNIXTIME* toBFloat16 toBFloat16OrNull toBFloat16OrZero toBool toDate toDate32 toDate32OrDefault
toDate32OrNull toDate32OrZero toDateOrDefault toDateOrNull toDateOrZero toDateTime toDateTime32
toDateTime64 toDateTime64OrDefault toDateTime64OrNull toDateTime64OrZero toDateTimeOrDefault
toDateTimeOrNull toDateTimeOrZero toDecimal128 toDecimal128OrDefault toDecimal128OrNull
toDecimal128OrZero toDecimal256 toDecimal256OrDefault toDecimal256OrNull toDecimal256OrZero
toDecimal32 toDecimal32OrDefault toDecimal32OrNull toDecimal32OrZero toDecimal64
toDecimal64OrDefault toDecimal64OrNull toDecimal64OrZero toDecimalString* toFixedString toFloat32
toFloat32OrDefault toFloat32OrNull toFloat32OrZero toFloat64 toFloat64OrDefault toFloat64OrNull
toFloat64OrZero toInt128 toInt128OrDefault toInt128OrNull toInt128OrZero toInt16 toInt16OrDefault
toInt16OrNull toInt16OrZero toInt256 toInt256OrDefault toInt256OrNull toInt256OrZero toInt32
toInt32OrDefault toInt32OrNull toInt32OrZero toInt64 toInt64OrDefault toInt64OrNull toInt64OrZero
toInt8 toInt8OrDefault toInt8OrNull toInt8OrZero toInterval toIntervalDay toIntervalHour
toIntervalMicrosecond toIntervalMillisecond toIntervalMinute toIntervalMonth toIntervalNanosecond
toIntervalQuarter toIntervalSecond toIntervalWeek toIntervalYear toLowCardinality toString
toStringCutToZero toTime toTime64 toTime64OrNull toTime64OrZero toTimeOrNull toTimeOrZero toUInt128
toUInt128OrDefault toUInt128OrNull toUInt128OrZero toUInt16 toUInt16OrDefault toUInt16OrNull
toUInt16OrZero toUInt256 toUInt256OrDefault toUInt256OrNull toUInt256OrZero toUInt32
toUInt32OrDefault toUInt32OrNull toUInt32OrZero toUInt64 toUInt64OrDefault toUInt64OrNull
toUInt64OrZero toUInt8 toUInt8OrDefault toUInt8OrNull toUInt8OrZero toUnixTimestamp64Micro
toUnixTimestamp64Milli toUnixTimestamp64Nano toUnixTimestamp64Second toUUID toUUIDOrZero
# URL
cutFragment cutQueryString cutQueryStringAndFragment cutToFirstSignificantSubdomain
cutToFirstSignificantSubdomainRFC cutToFirstSignificantSubdomainWithWWW
cutToFirstSignificantSubdomainWithWWWRFC cutURLParameter cutWWW decodeURLComponent
decodeURLFormComponent domain domainRFC domainWithoutWWW domainWithoutWWWRFC encodeURLComponent
encodeURLFormComponent extractURLParameter extractURLParameterNames extractURLParameters
firstSignificantSubdomain firstSignificantSubdomainRFC fragment netloc path pathFull port portRFC
protocol queryString queryStringAndFragment topLevelDomain topLevelDomainRFC URLHierarchy
URLPathHierarchy
# IP Address
cutIPv6 INET6_ATON* INET6_NTOA* INET_ATON* INET_NTOA* IPv4CIDRToRange IPv4NumToString
IPv4NumToStringClassC IPv4StringToNum IPv4StringToNumOrDefault IPv4StringToNumOrNull IPv4ToIPv6
IPv6CIDRToRange IPv6NumToString IPv6StringToNum IPv6StringToNumOrDefault IPv6StringToNumOrNull
isIPAddressInRange isIPv4String isIPv6String toIPv4 toIPv4OrDefault toIPv4OrNull toIPv4OrZero
toIPv6 toIPv6OrDefault toIPv6OrNull toIPv6OrZero
# Other
bar byteSize countDigits defaultValueOfArgumentType defaultValueOfTypeName FORMAT_BYTES*
formatReadableDecimalSize formatReadableQuantity formatReadableSize formatReadableTimeDelta
getSizeOfEnumType getSubcolumn ignore indexHint isConstant isDecimalOverflow MACNumToString
MACStringToNum MACStringToOUI materialize neighbor parseISO8601Duration parseReadableSize
parseReadableSizeOrNull parseReadableSizeOrZero parseTimeDelta rand* rand32 rand64 randBernoulli
randBinomial randCanonical randChiSquared randConstant randExponential randFisherF randLogNormal
randNegativeBinomial randNormal randPoisson randStudentT randUniform runningDifference
runningDifferenceStartingWithFirstValue toColumnTypeName toTypeName transform variantElement
variantType visibleWidth
# Written by the parser (CASE x WHEN ..., x -> ..., EXISTS, GROUPING); all but the first are
# not in system.functions
caseWithExpression lambda exists untuple grouping
"""
_AGGREGATE_TEXT = """
# Aggregate and window functions (and their aliases)
analysisOfVariance* anova* any any_respect_nulls any_value* any_value_respect_nulls* anyHeavy
anyLast anyLast_respect_nulls anyLastRespectNulls anyRespectNulls anyValueRespectNulls
approx_top_count* approx_top_k* approx_top_sum* argAndMax argAndMin argMax argMin array_agg* avg*
avgWeighted BIT_AND* BIT_OR* BIT_XOR* boundingRatio categoricalInformationValue contingency corr*
corrMatrix corrStable count* COVAR_POP* COVAR_SAMP* covarPop covarPopMatrix covarPopStable
covarSamp covarSampMatrix covarSampStable cramersV cramersVBiasCorrected cume_dist deltaSum
deltaSumTimestamp dense_rank* denseRank distinctDynamicTypes distinctJSONPaths
distinctJSONPathsAndTypes entropy exponentialMovingAverage exponentialTimeDecayedAvg
exponentialTimeDecayedCount exponentialTimeDecayedMax exponentialTimeDecayedSum first_value*
first_value_respect_nulls* firstValueRespectNulls gini group_concat* groupArray groupArrayInsertAt
groupArrayIntersect groupArrayLast groupArrayMovingAvg groupArrayMovingSum groupArraySample
groupArraySorted groupBitAnd groupBitmap groupBitmapAnd groupBitmapOr groupBitmapXor groupBitOr
groupBitXor groupConcat groupUniqArray histogram intervalLengthSum kolmogorovSmirnovTest* kurtPop
kurtSamp lag* lagInFrame largestTriangleThreeBuckets last_value* last_value_respect_nulls*
lastValueRespectNulls lead* leadInFrame lttb mannWhitneyUTest max* max_by* maxIntersections
maxIntersectionsPosition maxMappedArrays meanZTest median medianBFloat16 medianBFloat16Weighted
medianDD medianDeterministic medianExact medianExactHigh medianExactLow medianExactWeighted
medianExactWeightedInterpolated medianGK medianInterpolatedWeighted medianTDigest
medianTDigestWeighted medianTiming medianTimingWeighted mergedJSONPatch min* min_by*
minMappedArrays nonNegativeDerivative nth_value* ntile* percent_rank* percentRank quantile
quantileBFloat16 quantileBFloat16Weighted quantileDD quantileDeterministic quantileExact
quantileExactExclusive quantileExactHigh quantileExactInclusive quantileExactLow
quantileExactWeighted quantileExactWeightedInterpolated quantileGK quantileInterpolatedWeighted
quantilePrometheusHistogram quantiles quantilesBFloat16 quantilesBFloat16Weighted quantilesDD
quantilesDeterministic quantilesExact quantilesExactExclusive quantilesExactHigh
quantilesExactInclusive quantilesExactLow quantilesExactWeighted quantilesExactWeightedInterpolated
quantilesGK quantilesInterpolatedWeighted quantilesPrometheusHistogram quantilesTDigest
quantilesTDigestWeighted quantilesTiming quantilesTimingWeighted quantileTDigest
quantileTDigestWeighted quantileTiming quantileTimingWeighted rank* rankCorr regr_avgx* regr_avgy*
regr_count* regr_intercept* regr_r2* regr_slope* regr_sxx* regr_sxy* regr_syy* retention
row_number* sequenceCount sequenceMatch sequenceMatchEvents sequenceNextNode simpleLinearRegression
singleValueOrNull skewPop skewSamp sparkBar sparkbar STD* STDDEV* STDDEV_POP* STDDEV_SAMP*
stddevPop stddevPopStable stddevSamp stddevSampStable string_agg* studentTTest
studentTTestOneSample sum* sumCount sumKahan sumMapFiltered sumMapFilteredWithOverflow
sumMappedArrays sumMapWithOverflow sumWithOverflow theilsU topK topKWeighted uniq uniqCombined
uniqCombined64 uniqExact uniqHLL12 uniqUpTo VAR_POP* VAR_SAMP* varPop varPopStable varSamp
varSampStable welchTTest windowFunnel
"""
AGGREGATE_FUNCTIONS = frozenset(n for n, _ in _names(_AGGREGATE_TEXT))
ALLOWED_FUNCTIONS = frozenset(n for n, _ in _names(_SCALAR_TEXT)) | AGGREGATE_FUNCTIONS
_CASE_INSENSITIVE_AGGREGATES = frozenset(n.lower() for n, ci in _names(_AGGREGATE_TEXT) if ci)
_CASE_INSENSITIVE = (
    frozenset(n.lower() for n, ci in _names(_SCALAR_TEXT) if ci) | _CASE_INSENSITIVE_AGGREGATES
)

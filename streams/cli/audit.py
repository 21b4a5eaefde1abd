"""``memstream audit "<SQL>"``: one read-only SELECT on the audit tables, printed.

By default through the running API (``POST /v1/audit``): an embedded chdb directory belongs to
the process that serves it. ``--direct`` opens ClickHouse from the settings instead, for a
ClickHouse server or a chdb directory no process holds. Either way the statement goes through
the same checks (:mod:`sinks.audit_sql`).

Exit codes: 0 printed, 1 the query was refused or failed (the reason and its code on stderr;
never ClickHouse's own message, which can hold what the query computed), 2 the API or
ClickHouse could not be reached.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from sinks.audit_sql import AuditError, AuditSQL, AuditUnavailable
from sinks.stores import clickhouse_client
from streams.sdk.client import AuditQueryError, MemoryClient
from streams.sdk.http import APIError, APIUnavailable
from streams.settings import Settings

FORMATS = ("table", "csv", "json")
REFUSED, UNREACHABLE = 1, 2


class AuditCommandError(Exception):
    """What the command prints on stderr, and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def fetch(sql: str, settings: Settings, url: str | None, direct: bool) -> list[dict[str, Any]]:
    """The rows of ``sql``, from the API at ``url`` or, with ``direct``, from ClickHouse."""
    return _direct(sql, settings) if direct else _through_api(sql, url or settings.api_url)


def _through_api(sql: str, url: str) -> list[dict[str, Any]]:
    try:
        with MemoryClient(url) as client:
            return client.audit(sql)
    except AuditQueryError as exc:
        code = REFUSED if exc.status_code == 400 else UNREACHABLE
        raise AuditCommandError(_said(exc.error, exc.code, exc.reason), code) from None
    except APIError as exc:
        if exc.status_code == 400:
            raise AuditCommandError(f"refused: {exc.detail}", REFUSED) from None
        raise AuditCommandError(f"the API at {url} answered {exc.status_code}: {exc.detail}",
                                UNREACHABLE) from None  # fmt: skip
    except APIUnavailable as exc:
        raise AuditCommandError(
            f"cannot reach the API at {url} ({exc.__class__.__name__}): start `memstream serve`,"
            " pass --url, or use --direct when no process holds the ClickHouse data",
            UNREACHABLE,
        ) from None


def _direct(sql: str, settings: Settings) -> list[dict[str, Any]]:
    try:
        client = clickhouse_client(settings)
    except Exception as exc:  # chdb and clickhouse-connect raise their own kinds when opening
        raise AuditCommandError(
            f"cannot open ClickHouse at {settings.effective_clickhouse_dsn}: {exc}; "
            "if `memstream serve` holds it, drop --direct",
            UNREACHABLE,
        ) from None
    try:
        return AuditSQL(client).run(sql).records()
    except AuditUnavailable as exc:
        raise AuditCommandError(exc.reason, UNREACHABLE) from None
    except AuditError as exc:
        raise AuditCommandError(_said(exc.error, exc.code, exc.reason), REFUSED) from None
    finally:
        client.close()


def _said(error: str, code: str, reason: str) -> str:
    """``refused: <reason> (<CODE>)``: the policy's or ClickHouse's verdict in our words."""
    verb = {"audit_refused": "refused", "audit_failed": "failed"}.get(error, "unavailable")
    return f"{verb}: {reason} ({code})"


def render(rows: list[dict[str, Any]], fmt: str, title: str | None = None) -> None:
    """Print ``rows`` on stdout as a rich table, CSV or JSON."""
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2, default=_jsonable) + "\n")
        return
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(row[c]) for c in columns] for row in rows)
        return
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    console = Console()
    console.print(table if rows else "(no rows)")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return json.dumps(list(value), default=_jsonable)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)

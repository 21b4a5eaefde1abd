"""Fuzz the whole HTTP API with schemathesis against a real server: no 5xx, no schema violation.

Starts ``memstream serve`` on fresh topics and a fresh data dir against the running Kafka and
MinIO (as ``bench ingest`` does) and runs schemathesis (``st run``) over every operation of its
``/openapi.json``: the schema's examples, the coverage phase (boundaries, types, every
documented value and what lies just outside) and random fuzzing, positive and negative. Every
response is checked for:

- ``not_a_server_error``: no 5xx;
- ``status_code_conformance``, ``content_type_conformance``, ``response_headers_conformance``,
  ``response_schema_conformance``: the status, media type, headers and body are documented;
- ``negative_data_rejection``: a request the schema forbids is refused (4xx).

Chat answers through a stand-in for an OpenAI-compatible endpoint in this process (proxy mode,
``MEMSTREAM_LLM_BASE_URL``): the route's validation, retrieval and publishing run for real, the
answer costs nothing (the local LM would take seconds per fuzzed turn on a CPU). The stand-in
refuses extraction requests (a 400: the writer extracts that interaction by its rules, as it
does when an endpoint refuses one). Update streams end after ``MEMSTREAM_SSE_MAX_STREAM_S``
(1 s) so that a fuzzed ``GET .../updates`` gets a complete response.

The numbers are counted from schemathesis' own NDJSON event log: each request sent, its status,
and each failed check (with the operation and a one-line reason), written to
``bench/results/fuzz.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.report import write
from streams.sdk.local import ServeProcess
from streams.settings import Settings

#: What every response is checked for (schemathesis check names).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
#: The checks whose failure is a schema violation (the rest: a 5xx, or a forbidden request
#: that was accepted).
SCHEMA_CHECKS = {
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
}
#: The server's settings for a fuzz run (environment of ``memstream serve``).
SERVER_ENV = {
    "MEMSTREAM_SSE_MAX_STREAM_S": "1",
    "MEMSTREAM_SCHEDULER_TOP_N": "0",
    "MEMSTREAM_ACTIVATION_MEMORY": "false",
    "MEMSTREAM_PARAMETER_MEMORY": "false",
}


class FakeLLM:
    """A stand-in for an OpenAI-compatible endpoint, in a thread: a chat turn (streamed) is
    answered with one word at once; anything else (an extraction) gets a 400."""

    def __init__(self) -> None:
        self.turns = 0
        self.refused = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                if not body.get("stream"):
                    owner.refused += 1
                    self._send(400, "application/json", json.dumps(
                        {"error": {"message": "this stand-in only chats", "type": "invalid",
                                   "param": None, "code": "stand_in"}}).encode())  # fmt: skip
                    return
                owner.turns += 1
                chunk = {"id": "fake", "object": "chat.completion.chunk", "created": 0,
                         "model": "fake", "choices": [{"index": 0, "delta": {"content": "ok"},
                                                       "finish_reason": "stop"}]}  # fmt: skip
                usage = {**chunk, "choices": [],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                   "total_tokens": 2}}  # fmt: skip
                events = [json.dumps(chunk), json.dumps(usage), "[DONE]"]
                self._send(200, "text/event-stream",
                           "".join(f"data: {e}\n\n" for e in events).encode())  # fmt: skip

            def _send(self, status: int, kind: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-llm",
                                        daemon=True)  # fmt: skip

    def __enter__(self) -> FakeLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def fuzz_server(base: Settings | None = None, data: Path | None = None) -> Iterator[ServeProcess]:
    """A ``memstream serve`` on fresh topics and data dir, set up for fuzzing (see the module
    doc), with its stand-in LLM; its topics are deleted afterwards."""
    base = base or Settings()
    data = data or Path(tempfile.mkdtemp(prefix="memstream-fuzz-"))
    with FakeLLM() as llm:
        env = {**SERVER_ENV, "MEMSTREAM_LLM_BASE_URL": llm.url}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # ServeProcess hands its own environment to the server
        try:
            worker = ServeProcess(base, data)
            worker.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        try:
            yield worker
        finally:
            worker.discard()


def schemathesis(
    url: str,
    out: Path,
    max_examples: int,
    workers: int = 2,
    seed: int | None = None,
    max_time: float | None = None,
    phases: str = "examples,coverage,fuzzing",
) -> subprocess.CompletedProcess[str]:
    """``st run`` against the server's ``/openapi.json``; its NDJSON events go to ``out``."""
    st = Path(sys.executable).with_name("st")
    command = [
        str(st), "run", f"{url}/openapi.json",
        "--checks", ",".join(CHECKS),
        "--phases", phases,
        "--max-examples", str(max_examples),
        "--workers", str(workers),
        "--request-timeout", "60",
        "--suppress-health-check", "all",
        "--no-shrink",
        "--continue-on-failure",
        "--report", "ndjson",
        "--report-ndjson-path", str(out),
        "--warnings", "off",
    ]  # fmt: skip
    if seed is not None:
        command += ["--seed", str(seed)]
    if max_time is not None:
        command += ["--max-time", str(int(max_time))]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"}
    # In the report's folder: schemathesis keeps a cache (.schemathesis/) where it runs.
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                          cwd=out.parent)  # fmt: skip


def tally(events_path: Path) -> dict[str, Any]:
    """Requests, statuses and failed checks from schemathesis' NDJSON event log (its
    ``ScenarioFinished`` events record each case's request, response and checks)."""
    requests = 0
    statuses: Counter[int] = Counter()
    by_operation: dict[str, Counter[str]] = defaultdict(Counter)
    failures: Counter[tuple[str, str, str]] = Counter()
    errors: list[str] = []
    with events_path.open() as lines:
        for line in lines:
            event = json.loads(line)
            if "NonFatalError" in event:
                errors.append(str(event["NonFatalError"].get("info", event))[:300])
            recorder = event.get("ScenarioFinished", {}).get("recorder", {})
            label = recorder.get("label", "?")
            for interaction in (recorder.get("interactions") or {}).values():
                response = interaction.get("response")
                status = response["status_code"] if response else 0
                requests += 1
                statuses[status] += 1
                by_operation[label][f"{status // 100}xx" if status else "no answer"] += 1
            for checks in (recorder.get("checks") or {}).values():
                for check in checks:
                    if check.get("status") == "failure":
                        failures[(label, check["name"], _reason(check))] += 1
    return {
        "requests": requests,
        "responses_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "no_answer": statuses.get(0, 0),
        "schema_violations": sum(n for (_, c, _), n in failures.items() if c in SCHEMA_CHECKS),
        "accepted_forbidden": sum(
            n for (_, c, _), n in failures.items() if c == "negative_data_rejection"
        ),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "operations": {k: dict(v) for k, v in sorted(by_operation.items())},
        "failures": [
            {"operation": op, "check": check, "reason": reason, "count": n}
            for (op, check, reason), n in sorted(failures.items())
        ],
        "errors": errors[:20],
    }


def _reason(check: dict[str, Any]) -> str:
    info = (check.get("failure_info") or {}).get("failure") or {}
    title = info.get("title") or check.get("name", "")
    message = (info.get("message") or "").strip().splitlines()
    return f"{title}: {message[0]}"[:200] if message else str(title)[:200]


def run(max_examples: int = 400, workers: int = 2, seed: int | None = None,
        max_time: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The fuzz bench: start a server, run schemathesis, print and write the numbers."""
    console = Console()
    started = time.perf_counter()
    with fuzz_server() as worker:
        console.print(f"fuzzing {worker.settings.api_url} (schemathesis, {workers} workers, "
                      f"{max_examples} examples per operation and phase)...")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="memstream-fuzz-report-") as out:
            events = Path(out) / "events.ndjson"
            done = schemathesis(worker.settings.api_url, events, max_examples, workers, seed,
                                max_time)  # fmt: skip
            if not events.exists():
                raise RuntimeError(f"schemathesis wrote no events:\n{done.stdout[-3000:]}"
                                   f"{done.stderr[-3000:]}")  # fmt: skip
            found = tally(events)
        status = worker.client.status(lag=False)
    results = {
        "requests": found["requests"],
        "responses_5xx": found["responses_5xx"],
        "schema_violations": found["schema_violations"],
        "accepted_forbidden": found["accepted_forbidden"],
        "violations_by_operation": dict(
            Counter(f["operation"] for f in found["failures"] for _ in range(f["count"]))
        ),
        # schemathesis' own errors (not responses), e.g. CPython 3.11's "AST constructor
        # recursion depth mismatch" when two workers' threads describe a strategy at once
        "tool_errors": len(found["errors"]),
        "operations": len(found["operations"]),
        "seconds": round(time.perf_counter() - started, 1),
        "command": f"memstream bench fuzz --examples {max_examples}",
        "server_failure": status["failure"],
        "statuses": found["statuses"],
        "per_operation": found["operations"],
        "failures": found["failures"],
        "errors": found["errors"],
    }
    _print(console, results)
    write("fuzz", results, console, show=False)
    return results


def _print(console: Console, results: dict[str, Any]) -> None:
    """Two tables of at most 80 columns: the totals, then the requests per operation."""
    totals = Table(title="memstream bench fuzz", width=80)
    totals.add_column("metric", no_wrap=True)
    totals.add_column("value", overflow="fold", justify="right")
    for key in ("requests", "responses_5xx", "schema_violations", "accepted_forbidden",
                "tool_errors", "operations", "seconds"):  # fmt: skip
        totals.add_row(key, f"{results[key]:,}" if isinstance(results[key], int)
                       else str(results[key]))  # fmt: skip
    statuses = ", ".join(f"{k}: {v:,}" for k, v in results["statuses"].items())
    totals.add_row("statuses", statuses)
    where = ", ".join(f"{k}: {v:,}" for k, v in results["violations_by_operation"].items())
    totals.add_row("failed checks in", where or "-")
    console.print(totals)
    table = Table(title="requests per operation", width=80)
    table.add_column("operation", no_wrap=True, overflow="ellipsis", max_width=52)
    for column in ("2xx", "4xx", "5xx"):
        table.add_column(column, justify="right", no_wrap=True)
    for operation, counts in results["per_operation"].items():
        table.add_row(operation, *(f"{counts.get(c, 0):,}" for c in ("2xx", "4xx", "5xx")))
    console.print(table)
    for failure in results["failures"][:20]:
        console.print(f"[red]{failure['check']}[/] {failure['operation']}: {failure['reason']} "
                      f"(x{failure['count']})", overflow="fold")  # fmt: skip


if __name__ == "__main__":
    run()

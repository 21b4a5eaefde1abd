"""The ``memstream`` command line: configuration, local infrastructure and the demo."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra import services
from infra.process import InfraError
from streams.cli import chat as chat_cli
from streams.cli import replay as replay_cli
from streams.cli.cube import cube_app
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.sdk.client import MemoryClient

app = typer.Typer(help="memstream: a memory operating system for LLM agents, on Kafka.")
infra_app = typer.Typer(help="Start, stop and inspect the local services.")
app.add_typer(infra_app, name="infra")
app.add_typer(cube_app, name="cube")
app.command("replay")(replay_cli.replay)
app.command("chat")(chat_cli.chat)
cube_app.command("show")(replay_cli.show)
console = Console()


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=1)


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the effective settings (environment MEMSTREAM_*), secrets masked, and the CPU the
    embedder runs on (its int8 kernels are several times faster with AVX-512 VNNI)."""
    from processors.embedder import cpu

    machine = cpu()
    values = Settings().masked() | {
        "cpu": f"{machine['cpu_model']} ({', '.join(machine['cpu_flags']) or 'no AVX2'})"
    }
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    table = Table("setting", "value", title="memstream settings")
    for key, value in values.items():
        table.add_row(key, str(value))
    console.print(table)


@infra_app.command("up")
def infra_up() -> None:
    """Start Kafka and MinIO (building them once), create topics and bucket. Idempotent."""
    settings = Settings()
    try:
        with console.status("starting local services (the first run builds them)..."):
            statuses = services.up(settings)
    except InfraError as exc:
        raise _fail(str(exc)) from None
    _print_status(statuses)


@infra_app.command("down")
def infra_down() -> None:
    """Stop the local services memstream started."""
    stopped = services.down(Settings())
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@infra_app.command("status")
def infra_status() -> None:
    """Show each service: running or not, where it listens, where its data lives."""
    _print_status(services.status(Settings()))


def _print_processors(status: dict) -> None:
    """The processors a process hosts: what each reads and writes, its state and counters."""
    table = Table("processor", "state", "reads -> writes", "restarts", "counters",
                  title=f"processors (role {status['role']})")  # fmt: skip
    for name, p in status["processors"].items():
        counters = ", ".join(f"{k}={v}" for k, v in p["stats"].items()
                             if isinstance(v, int) and not isinstance(v, bool) and v)  # fmt: skip
        flow = f"{', '.join(p['inputs'])} -> {', '.join(p['outputs'])}"
        table.add_row(name, p["state"], flow, str(p["restarts"]), counters)
    console.print(table)


def _print_status(statuses: list[services.ServiceStatus]) -> None:
    table = Table("service", "kind", "state", "pid", "where")
    for s in statuses:
        color = "green" if s.running else "yellow" if s.state == "foreign" else "red"
        state = f"[{color}]{s.state}[/]"
        table.add_row(s.name, s.kind, state, str(s.pid or ""), s.detail)
    console.print(table)


@app.command()
def audit(
    sql: Annotated[
        str,
        typer.Argument(help="One SELECT on memory_ops, memory_versions, queries, command_results."),
    ],
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    url: Annotated[str | None, typer.Option(help="The API (default MEMSTREAM_API_URL).")] = None,
    direct: Annotated[
        bool, typer.Option("--direct", help="Query ClickHouse itself, not the API.")
    ] = False,
) -> None:
    """Read-only SQL on the audit tables, through the running API or --direct (exit 1: refused
    or failed, 2: unreachable)."""
    from streams.cli.audit import FORMATS, AuditCommandError, fetch, render

    if fmt not in FORMATS:
        raise _fail(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    try:
        rows = fetch(sql, Settings(), url, direct)
    except AuditCommandError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=exc.code) from None
    render(rows, fmt)


@app.command()
def mcp(
    url: Annotated[str | None, typer.Option(help="The API (default MEMSTREAM_API_URL).")] = None,
    transport: Annotated[str, typer.Option(help="stdio or streamable-http.")] = "stdio",
    host: Annotated[str, typer.Option(help="Bind address (streamable-http).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (streamable-http).")] = 8765,
) -> None:
    """An MCP server (tools add, search, get, history; resource
    memstream://cubes/{cube}/updates) in front of a running memstream API."""
    from streams.mcp.server import run

    if transport not in ("stdio", "streamable-http"):
        raise _fail(f"unknown transport {transport!r} (known: stdio, streamable-http)")
    run(url, transport, host, port)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (MEMSTREAM_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MEMSTREAM_API_PORT).")] = None,
    role: Annotated[
        str | None,
        typer.Option(help="reader, views or all (MEMSTREAM_ROLE); see the README's roles."),
    ] = None,
) -> None:
    """Run this process's processors (by role) and the HTTP API. Creates the topics of its
    prefix that do not exist yet (when it cannot, the log and /readyz say why). Exits non-zero
    when a processor keeps failing (after its restarts), so a supervisor starts a clean process.
    On SIGTERM/Ctrl-C a KV-cache build in flight is cancelled, not waited for."""
    import logging
    import threading

    import uvicorn

    from streams.api.app import create_app
    from streams.pipeline.roles import ROLES, build_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # milvus-lite's embedded gRPC server logs a harmless NotImplemented for a newer client call.
    for noisy in ("grpc._server", "faiss.loader", "bm25s", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    settings = Settings()
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    if role is not None:
        if role not in ROLES:
            raise _fail(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        settings = settings.model_copy(update={"role": role})
    runtime = build_runtime(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, runtime),
            host=host or settings.api_host,
            port=port or settings.api_port,
            log_level="warning",
        )
    )

    def watch() -> None:
        runtime.host.failed.wait()
        server.should_exit = True  # lifespan stops the host: a bounded drain of the others

    threading.Thread(target=watch, name="failure-watch", daemon=True).start()
    server.run()
    if runtime.host.failed.is_set():
        raise _fail("a processor kept failing; see the log above (exit 1)")


@app.command()
def bench(
    name: Annotated[
        str,
        typer.Argument(
            help="ingest, search, quality, restart, profile, replay, kv, embedder or fuzz."
        ),
    ],
    interactions: Annotated[
        int | None,
        typer.Option(help="ingest / profile: interactions to ingest (20,000 / 5,000)."),
    ] = None,
    sizes: Annotated[
        list[int] | None,
        typer.Option("--size", help="search: memories in the store; kv: prefix tokens (repeat)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="quality: a LoCoMo-format file, or a folder of BEAM conversations."),
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(help="quality: locomo, beam or both (both: each dev set, no --data)."),
    ] = "locomo",
    run_out: Annotated[
        Path | None, typer.Option(help="quality: write the ranked turn ids per question here.")
    ] = None,
    no_peer: Annotated[bool, typer.Option("--no-peer", help="Leave mem0 out.")] = False,
    cv: Annotated[
        bool,
        typer.Option("--cv", help="quality: cross-validate in process, no services needed."),
    ] = False,
    readers: Annotated[
        int, typer.Option(help="ingest: reader processes (N > 1: N readers + 1 views process).")
    ] = 1,
    split: Annotated[
        bool,
        typer.Option("--split", help="ingest: with 1 reader, run it beside a views process."),
    ] = False,
    ops: Annotated[
        int | None,
        typer.Option(help="restart / replay: ops in the log (1,000,000 / 100,000)."),
    ] = None,
    ops_per_memory: Annotated[
        int, typer.Option(help="restart: ops per memory (the log / state ratio).")
    ] = 4,
    examples: Annotated[
        int, typer.Option(help="fuzz: schemathesis examples per operation and phase.")
    ] = 400,
) -> None:
    """Run a benchmark against the running services; prints a table, writes bench/results."""
    if name == "ingest":
        from bench import ingest

        ingest.run(n=interactions or 20_000, peers=() if no_peer else ("mem0",), readers=readers,
                   split=split)  # fmt: skip
    elif name == "search":
        from bench import search

        search.run(tuple(sizes or search.SIZES), peers=() if no_peer else ("mem0",))
    elif name == "quality":
        from bench import quality

        if dataset not in (*quality.DATASETS, "both"):
            raise _fail(f"unknown dataset {dataset!r} (known: locomo, beam, both)")
        if dataset == "both" and data is not None:
            raise _fail("--data names one benchmark's data; --dataset both reads each dev set")
        if cv:
            quality.cross_validated(data, dataset, run_out)
        else:
            quality.run(data, run_out, peers=() if no_peer else ("mem0",), dataset=dataset)
    elif name == "restart":
        from bench import restart

        restart.run(ops=ops or 1_000_000, ops_per_memory=ops_per_memory)
    elif name == "profile":
        from bench import profile

        profile.run(n=interactions or 5_000)
    elif name == "replay":
        from bench import replay

        replay.run(ops=ops or 100_000)
    elif name == "kv":
        from bench import kv

        kv.run(tuple(sizes or kv.SIZES))
    elif name == "embedder":
        from bench import embedder

        embedder.run()
    elif name == "fuzz":
        from bench import fuzz

        fuzz.run(max_examples=examples)
    else:
        raise _fail(
            f"unknown benchmark {name!r} "
            "(known: ingest, search, quality, restart, profile, replay, kv, embedder, fuzz)"
        )


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="A LoCoMo-format file (default: the dev conversations).")
    ] = None,
) -> None:
    """Start everything, ingest a real conversation, then search it, show a fact's history and
    query the audit log."""
    import time
    from datetime import UTC, datetime, timedelta

    from rich.progress import Progress

    from streams.sdk import locomo
    from streams.sdk.local import ServeProcess

    settings = Settings()
    try:
        with console.status("starting Kafka and MinIO (the first run builds them)..."):
            _print_status(services.up(settings))
    except InfraError as exc:
        raise _fail(str(exc)) from None

    worker = ServeProcess(settings, settings.data_dir / "demo-worker", prefix="demo.")
    with console.status("starting the worker (MemReader, sinks, API)..."):
        worker.start()
    client = worker.client
    try:
        sample = locomo.load(data)[0]
        cube = f"{sample.sample_id}-{uuid.uuid4().hex[:6]}"
        turns = [i.model_dump(exclude={"cube_id"}) for i in locomo.interactions(sample, cube)]
        with Progress(console=console) as progress:
            task = progress.add_task(f"ingesting LoCoMo {sample.sample_id}", total=len(turns))
            for start in range(0, len(turns), 100):
                client.publish(cube, turns[start : start + 100])
            while True:
                status = client.status()
                read = status["counters"].get("reader", {}).get("interactions", 0)
                progress.update(task, completed=min(len(turns), read))
                if status["caught_up"] and not any(status["lag"].values()):
                    break
        console.print(
            f"[bold]{len(turns)} turns -> {len(client.memories(cube, 16384))} memories[/]"
        )
        _print_processors(client.status())

        for qa in [q for q in sample.qa if q.get("category") in (1, 2, 4)][:3]:
            table = Table("turn", "score", "cosine", "bm25", "memory",
                          title=f"search: {qa['question']}")  # fmt: skip
            for hit in client.search(cube, qa["question"], top_k=3)["hits"]:
                mark = " [green](evidence)[/]" if hit["turn_id"] in qa["evidence"] else ""
                table.add_row(hit["turn_id"] + mark, f"{hit['score']:.2f}", f"{hit['cosine']:.2f}",
                              f"{hit['keyword']:.1f}", hit["text"])  # fmt: skip
            console.print(table)

        # The access-stats agent (Faust) counted those searches from memstream.queries, in
        # batches of half a second: once the first shows, one more batch for the rest.
        deadline = time.monotonic() + 30
        while not client.access(cube, 5) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        hot = client.access(cube, 5)
        table = Table("hits", "best rank", "score", "memory", title="hottest memories (Faust)")
        texts = {m["memory_id"]: m["text"] for m in client.memories(cube, 16384)}
        for row in hot:
            table.add_row(str(row["hits"]), str(row["best_rank"]), f"{row['score']:.2f}",
                          texts.get(row["memory_id"], row["memory_id"])[:60])  # fmt: skip
        console.print(table)

        speaker = sample.conversation["speaker_a"]
        last = max(t["event_time"] for t in turns)
        # A subscriber (the SDK's async iterator) that another agent would run: it sees each
        # memory update of the cube once, in order, as the writer logs it.
        updates = _Updates(worker.settings, cube, until_text="Lisbon")
        client.publish(
            cube,
            [
                {
                    "content": "I moved to Boston for my new studio.",
                    "speaker": speaker,
                    "event_time": last + timedelta(days=1),
                }
            ],
        )
        client.wait_drained()
        between = datetime.now(UTC)
        client.publish(
            cube,
            [
                {
                    "content": "I moved to Lisbon to be close to the ocean.",
                    "speaker": speaker,
                    "event_time": last + timedelta(days=60),
                }
            ],
        )
        client.wait_drained()
        hit = client.search(cube, f"{speaker} moved to Lisbon", top_k=1)["hits"][0]
        table = Table(
            "memory",
            "v",
            "op",
            "valid from",
            "valid to",
            "text",
            title=f"history of: {hit['text']}",
        )
        for row in client.history(hit["memory_id"]):
            table.add_row(
                row["memory_id"][:8],
                str(row["version"]),
                row["op"],
                str(row["valid_from"] or "")[:10],
                str(row["valid_to"] or "")[:10],
                (row["text"] or "")[:60],
            )
        console.print(table)

        # Another processor asks the one writer to archive the old fact, twice, and to delete a
        # memory that does not exist: applied once, repeated, refused, all on record.
        old = next(r for r in client.history(hit["memory_id"]) if "Boston" in (r["text"] or ""))
        asked = "demo-archive-" + uuid.uuid4().hex[:6]
        for memory_id, kind, command_id in (
            (old["memory_id"], "ARCHIVE", asked),
            (old["memory_id"], "ARCHIVE", asked),
            ("no-such-memory", "DELETE", None),
        ):
            sent = client.command(cube, memory_id, kind, reason="demo: cooled down",
                                  **({"command_id": command_id} if command_id else {}))  # fmt: skip
            client.command_result(sent["command_id"])
        table = Table("command", "memory", "status", "reason", title="commands to the writer")
        for row in client.audit(
            "SELECT command, memory_id, status, reason FROM command_results FINAL "
            f"WHERE cube_id = '{cube}' ORDER BY source_offset"
        ):
            table.add_row(row["command"], row["memory_id"][:8], row["status"], row["reason"])
        console.print(table)

        # Time travel: the cube as memstream had it before the move, folded from the log.
        question = f"{speaker} moved to"
        table = Table("as of", "top memory", title=f"time travel: {question}")
        for label, at in ((f"{between:%H:%M:%S} (before the move)", between), ("now", None)):
            found = client.search(cube, question, top_k=1, **({"as_of": at} if at else {}))
            table.add_row(label, found["hits"][0]["text"] if found["hits"] else "-")
        console.print(table)

        updates.join(60)
        table = Table("op", "v", "position", "memory", title="subscription: live updates")
        for u in updates.received[-8:]:
            table.add_row(u.op, str(u.version), u.position, (u.text or u.memory_id)[:60])
        console.print(table)

        sql = (
            f"SELECT op, count() AS ops FROM memory_ops FINAL WHERE cube_id = '{cube}' "
            "GROUP BY op ORDER BY ops DESC"
        )
        console.print(f"[bold]audit:[/] {sql}", highlight=False)
        table = Table("op", "count")
        for row in client.audit(sql):
            table.add_row(row["op"], str(row["ops"]))
        console.print(table)
        _demo_rebuild(client, cube, [qa["question"] for qa in sample.qa[:3]])
        _demo_chat(client, cube, f"Where does {speaker} live now?")
    finally:
        worker.stop()


def _demo_chat(client: MemoryClient, cube: str, question: str) -> None:
    """A chat turn answered by the local LM with the cube's memories (streamed)."""
    import itertools

    console.print(f"[bold]chat:[/] {question}")
    with console.status("the local LM loads on the first chat (the first run converts it)..."):
        events = client.chat(cube, question, stream=True, max_new_tokens=40)
        first = next(events, None)
    done = None
    for event, data in itertools.chain([first] if first else [], events):
        if event == "token":
            console.print(data.get("text", ""), end="", highlight=False)
        elif event == "done":
            done = data
    console.print()
    if done:
        used = ", ".join(m[:40] for m in done.get("memories", [])[:3])
        console.print(f"[dim]memories used: {used} ... (prefix: {done['prefix']['source']}; "
                      "the turn is published back as interactions)[/]")  # fmt: skip


class _Updates:
    """A subscription run on its own thread and event loop, collecting what it receives."""

    def __init__(self, settings: Settings, cube: str, until_text: str) -> None:
        import asyncio
        import threading

        from streams.sdk.subscribe import subscribe

        self.received: list = []
        started = threading.Event()

        async def follow() -> None:
            async with asyncio.timeout(300), subscribe(cube, settings=settings) as updates:
                started.set()
                async for update in updates:
                    self.received.append(update)
                    if until_text in (update.text or ""):
                        return

        self._thread = threading.Thread(target=lambda: asyncio.run(follow()), daemon=True)
        self._thread.start()
        started.wait(60)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _demo_rebuild(client: MemoryClient, cube: str, questions: list[str]) -> None:
    """Rebuild the views from the log beside the live ones, and show they agree."""
    import time

    from rich.progress import Progress

    before = {m["memory_id"]: m["version"] for m in client.memories(cube, 16384)}
    answers = [[h["memory_id"] for h in client.search(cube, q)["hits"]] for q in questions]
    target = client.replay("rebuild")["next"]["id"]
    with Progress(console=console) as progress:
        task = progress.add_task(f"replay --rebuild: generation {target}", total=None)
        while (state := client.replay_status())["current"]["id"] < target:
            views = state.get("views-next") or {}
            if views:
                progress.update(task, completed=views["offset"], total=views["end_offset"])
            time.sleep(0.3)
        progress.update(task, completed=1, total=1)
    after = {m["memory_id"]: m["version"] for m in client.memories(cube, 16384)}
    same = [[h["memory_id"] for h in client.search(cube, q)["hits"]] for q in questions]
    console.print(
        f"[bold]rebuilt from the log:[/] generation {target}, {len(after)} memories "
        f"({'the same ids and versions' if after == before else 'DIFFERENT'}), "
        f"search answers {'identical' if same == answers else 'DIFFERENT'}"
    )


if __name__ == "__main__":
    app()

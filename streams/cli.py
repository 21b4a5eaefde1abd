"""The ``memstream`` command line: configuration, local infrastructure and the demo."""

from __future__ import annotations

import json
import uuid
from itertools import islice
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra import services
from infra.process import InfraError
from streams.settings import Settings

app = typer.Typer(help="memstream: a memory operating system for LLM agents, on Kafka.")
infra_app = typer.Typer(help="Start, stop and inspect the local services.")
app.add_typer(infra_app, name="infra")
console = Console()


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=1)


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the effective settings (environment MEMSTREAM_*), secrets masked."""
    values = Settings().masked()
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


def _print_status(statuses: list[services.ServiceStatus]) -> None:
    table = Table("service", "kind", "state", "pid", "where")
    for s in statuses:
        state = "[green]running[/]" if s.running else "[red]stopped[/]"
        table.add_row(s.name, s.kind, state, str(s.pid or ""), s.detail)
    console.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (MEMSTREAM_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MEMSTREAM_API_PORT).")] = None,
) -> None:
    """Run the worker (MemReader, sinks, query audit) and the HTTP API in one process."""
    import logging

    import uvicorn

    from streams.api import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # milvus-lite's embedded gRPC server logs a harmless NotImplemented for a newer client call.
    for noisy in ("grpc._server", "faiss.loader", "bm25s", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level="warning",
    )


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Which benchmark: pipeline.")] = "pipeline",
    interactions: Annotated[int, typer.Option(help="Interactions to ingest.")] = 5000,
) -> None:
    """Run a benchmark against the running services; prints a table, writes bench/results."""
    if name != "pipeline":
        raise _fail(f"unknown benchmark {name!r} (known: pipeline)")
    from bench import pipeline

    pipeline.run(n=interactions)


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="A LoCoMo-format file (default: the dev conversations).")
    ] = None,
    turns: Annotated[int, typer.Option(help="How many turns of the first sample to publish.")] = 12,
) -> None:
    """Start the services, publish a real conversation, and read it back from the log."""
    from streams import locomo
    from streams.consumer import EventConsumer
    from streams.producer import EventProducer
    from streams.topics import INTERACTIONS

    settings = Settings()
    try:
        with console.status("starting local services (the first run builds them)..."):
            _print_status(services.up(settings))
    except InfraError as exc:
        raise _fail(str(exc)) from None

    sample = locomo.load(data)[0]
    run = uuid.uuid4().hex[:8]
    batch = list(islice(locomo.interactions(sample, f"demo-{sample.sample_id}-{run}"), turns))
    with EventProducer(settings) as producer:
        delivered = producer.publish_interactions(batch)
    console.print(
        f"published {len(delivered)} interactions of LoCoMo {sample.sample_id} to "
        f"{delivered[0].topic} (partition {delivered[0].partition}, offsets "
        f"{delivered[0].offset}..{delivered[-1].offset})"
    )

    cube = batch[0].cube_id
    table = Table("offset", "event time", "speaker", "content", title=f"read back: cube {cube}")
    with EventConsumer([settings.topic(INTERACTIONS.name)], f"demo-{run}", settings) as consumer:
        seen = 0
        for event in iter(lambda: consumer.poll(10.0), None):
            if event.key != cube.encode():
                continue
            value = event.value
            table.add_row(
                str(event.offset),
                value["event_time"].strftime("%Y-%m-%d %H:%M"),
                value["speaker"],
                value["content"][:80],
            )
            seen += 1
            if seen == len(batch):
                break
    console.print(table)
    if seen != len(batch):
        raise _fail(f"read back {seen} of {len(batch)} interactions")


if __name__ == "__main__":
    app()

"""``memstream cube export`` / ``memstream cube import``: move a cube between cubes and
deployments as one file (local or ``s3://`` in MinIO), replayed through the one writer."""

from __future__ import annotations

from typing import Annotated

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streams.sdk import cube_archive
from streams.sdk.cube_archive import CubeArchiveError
from streams.settings import Settings

cube_app = typer.Typer(help="Export a cube's history (ops and blobs) to a file, import it.")
console = Console()
errors = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


class _Bars:
    """One progress bar per stage of the sdk's progress reports."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)  # fmt: skip


@cube_app.command("export")
def export(
    cube: Annotated[str, typer.Argument(help="The cube to export.")],
    target: Annotated[str, typer.Argument(help="A file path, or s3://bucket/key in MinIO.")],
    generation: Annotated[
        int | None, typer.Option(help="Only the ops of this generation (default: all).")
    ] = None,
) -> None:
    """Write the cube's op history (log order, committed ops) and its blobs to one Avro file."""
    settings = Settings()
    try:
        with _progress() as progress:
            done = cube_archive.export_cube(settings, cube, target, generation, _Bars(progress))
    except (CubeArchiveError, KafkaException) as exc:
        raise _fail(str(exc)) from None
    console.print(f"exported cube {cube}: {done.ops} ops, {done.blobs} blobs, "
                  f"{done.bytes:,} bytes -> {target}", highlight=False)  # fmt: skip


@cube_app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="An export file, or s3://bucket/key in MinIO.")],
    into: Annotated[
        str | None, typer.Option("--into", help="Target cube (default: the source cube's name).")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the writer's next answer.")
    ] = 120.0,
) -> None:
    """Check the whole file, then replay every op into the target cube through the writer (IMPORT
    commands) and wait for its answers. Importing the same file again changes nothing."""
    settings = Settings()
    try:
        with _progress() as progress:
            bars = _Bars(progress)
            archive = cube_archive.read_archive(settings, source, bars)
            done = cube_archive.import_archive(settings, archive, into, bars, timeout)
    except (CubeArchiveError, KafkaException) as exc:
        raise _fail(str(exc)) from None
    counts = ", ".join(f"{done.statuses.get(s, 0)} {s.lower()}"
                       for s in ("APPLIED", "DUPLICATE", "REJECTED"))  # fmt: skip
    console.print(f"imported cube {done.source_cube} into {done.cube}: {counts} "
                  f"({done.commands} ops)", highlight=False)  # fmt: skip
    if done.rejected:
        for memory_id, reason in done.rejected[:10]:
            console.print(f"  rejected {memory_id}: {reason}", highlight=False)
        raise _fail(f"{len(done.rejected)} of {done.commands} ops were refused by the writer")

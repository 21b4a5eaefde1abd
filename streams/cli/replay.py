"""``memstream replay`` and ``memstream cube show``: rebuild, re-extract, look into the past.

``--rebuild`` and ``--reextract`` ask the running views process to build the next generation
(it owns the embedded stores) and follow it with a progress bar until the views switch.
``--until``, ``--compare`` and ``cube show --as-of`` fold the log here: they need Kafka and
MinIO only, no server.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from processors.fold import Memory
from sinks.milvus import row_fields
from streams.pipeline.build import generation_store, snapshot_store
from streams.query.time_travel import PastView, Point, fold_until, parse_point
from streams.runtime.generations import READER_SETTINGS, InvalidReaderSettings, validate_reader
from streams.settings import Settings
from streams.transport.follower import OpReader, read_partitions
from streams.transport.topics import MEMORY_OPS, partition_for

console = Console()


def _fail(message: str, code: int = 1) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=code)


def _point(value: str) -> Point:
    try:
        return parse_point(value)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _past(settings: Settings, at: Point, cube: str | None) -> PastView:
    state = generation_store(settings).read()
    generation = state.at(at) if isinstance(at, datetime) else state.current
    return fold_until(settings, snapshot_store(settings), at, generation, cube)


def _memories_json(memories: list[Memory]) -> list[dict[str, Any]]:
    return [row_fields(m) for m in memories if m.searchable]


def _print_memories(title: str, memories: list[Memory]) -> None:
    table = Table("memory", "v", "valid from", "valid to", "text", title=title)
    for m in memories:
        if m.searchable:
            table.add_row(m.memory_id[:8], str(m.version), str(m.valid_from or "")[:10],
                          str(m.valid_to or "")[:10], m.text[:60])  # fmt: skip
    console.print(table)


def show(
    cube: Annotated[str, typer.Argument(help="The cube.")],
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="An ISO 8601 time or an offset of the cube's partition."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The cube's memories (active, with their versions), now or as of a past point, folded
    from the log."""
    settings = Settings()
    at: Point = _point(as_of) if as_of else 2**62
    past = _past(settings, at, cube)
    _emit(past, cube, as_of or "now", as_json)


def _emit(past: PastView, cube: str, label: str, as_json: bool) -> None:
    memories = past.in_cube(cube)
    if as_json:
        typer.echo(json.dumps({"cube": cube, "as_of": label, "offsets": past.offsets,
                               "memories": _memories_json(memories)}))  # fmt: skip
        return
    _print_memories(f"{cube} as of {label} (log offsets {past.offsets})", memories)


def replay(
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Refold memory-ops from 0 into fresh views.")
    ] = False,
    reextract: Annotated[
        bool, typer.Option("--reextract", help="Rerun MemReader over interactions from 0.")
    ] = False,
    until: Annotated[
        str | None, typer.Option(help="Show the view as of an ISO 8601 time or an offset.")
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Memories and ops per generation in the log.")
    ] = False,
    reader: Annotated[
        list[str] | None,
        typer.Option("--set", help=f"--reextract: KEY=VALUE ({', '.join(READER_SETTINGS)})."),
    ] = None,
    cube: Annotated[str | None, typer.Option(help="--until / --compare: one cube.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: Annotated[str | None, typer.Option(help="The API (default MEMSTREAM_API_URL).")] = None,
) -> None:
    """Rebuild the views from the log, re-extract the interactions into a new generation, or
    look at the log as it was (--until) or per generation (--compare)."""
    chosen = [name for name, on in (("--rebuild", rebuild), ("--reextract", reextract),
              ("--until", until is not None), ("--compare", compare)) if on]  # fmt: skip
    if len(chosen) != 1:
        raise _fail("choose one of --rebuild, --reextract, --until, --compare")
    settings = Settings()
    if until is not None:
        at = _point(until)
        past = _past(settings, at, cube)
        if cube is not None:
            _emit(past, cube, until, as_json)
        else:
            _summary(past, until, as_json)
        return
    if compare:
        _compare(settings, cube, as_json)
        return
    overrides = _overrides(reader or [])
    if rebuild and overrides:
        raise _fail("--set changes the reader: it needs --reextract", 2)
    if overrides:
        try:  # refused here already, with the same check as the server's
            validate_reader(overrides, settings)
        except InvalidReaderSettings as exc:
            raise _fail(_refused(exc.errors), 2) from None
    _start_and_follow(url or settings.api_url, "rebuild" if rebuild else "reextract", overrides)


def _refused(errors: list[dict[str, Any]]) -> str:
    """Each refused setting and why (the value given, where known: the server does not echo
    it back)."""
    said = [f"--set {e['field']}" + (f"={e['input']!r}" if e.get("input") is not None else "")
            + f": {e['msg']}" for e in errors]  # fmt: skip
    return "refused: " + "; ".join(said)


def _detail(response: httpx.Response) -> str:
    """What the API said about a refused replay (its 422 lists each setting and why)."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    detail = body.get("detail", response.text) if isinstance(body, dict) else body
    if isinstance(detail, list):
        return _refused([{"field": ".".join(str(x) for x in d.get("loc", [])[2:]) or "reader",
                          "input": d.get("input"), "msg": d.get("msg", "")}
                         for d in detail if isinstance(d, dict)])  # fmt: skip
    return str(detail)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise _fail(f"--set {pair!r}: expected KEY=VALUE", 2)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _summary(past: PastView, label: str, as_json: bool) -> None:
    per_cube = Counter(m.cube_id for m in past.memories if m.searchable)
    if as_json:
        typer.echo(json.dumps({"as_of": label, "offsets": past.offsets, "cubes": per_cube}))
        return
    table = Table("cube", "memories", title=f"the view as of {label}")
    for cube, n in sorted(per_cube.items()):
        table.add_row(cube, str(n))
    console.print(table)


def _start_and_follow(url: str, mode: str, reader: dict[str, Any]) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        try:
            r = http.post("/v1/replay", json={"mode": mode, "reader": reader})
        except httpx.TransportError as exc:
            raise _fail(f"no memstream API at {url} ({exc}); start `memstream serve`", 2) from None
        if r.status_code != 202:
            # A request the server refuses is a usage error (2); anything else failed (1).
            raise _fail(f"{r.status_code}: {_detail(r)}", 2 if r.status_code < 500 else 1)
        target = r.json()["next"]["id"]
        console.print(f"building generation {target} ({mode}); the live views serve meanwhile")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} ops/s"), TimeElapsedColumn(),
                   TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("refolding memory-ops", total=None, rate="-")
            began, first = time.monotonic(), None
            while True:
                state = http.get("/v1/replay").json()
                if state["current"]["id"] >= target:
                    break
                for failed in state.get("failed") or ():
                    generation = failed.get("generation")
                    if isinstance(generation, dict) and generation.get("id") == target:
                        raise _fail(f"generation {target} was abandoned: {failed.get('reason')}"
                                    "; the views still show the current one")  # fmt: skip
                views = state.get("views-next") or {}
                if views:
                    done, total = views["offset"], max(views["end_offset"], views["offset"])
                    first = first if first is not None else done
                    elapsed = max(time.monotonic() - began, 1e-3)
                    rate = f"{(done - first) / elapsed:,.0f}"
                    progress.update(task, completed=done, total=total or None, rate=rate)
                time.sleep(0.5)
            progress.update(task, completed=progress.tasks[0].total or 0)
    console.print(f"[green]the views now show generation {target}[/]")


def _compare(settings: Settings, cube: str | None, as_json: bool) -> None:
    """Every generation of ops in the log side by side: ops, kinds, memories, reader."""
    state = generation_store(settings).read()
    topic = settings.topic(MEMORY_OPS.name)
    partitions = (
        [partition_for(cube, settings.partitions)] if cube else list(range(settings.partitions))
    )
    ops = OpReader(settings, cube=cube)  # every generation; poison skipped and counted
    stats: dict[int, dict[str, Any]] = {}

    def handle(msg: Any) -> None:
        event = ops.event(msg)
        if event is None:
            return
        op = event.value
        g = stats.setdefault(op["generation"], {"ops": 0, "kinds": Counter(), "memories": set(),
                                                "readers": set()})  # fmt: skip
        g["ops"] += 1
        g["kinds"][op["op"]] += 1
        g["memories"].add(op["memory_id"])
        if op["reader_version"]:
            g["readers"].add(op["reader_version"])

    read_partitions(settings, topic, dict.fromkeys(partitions, 0), handle)
    report = []
    for ops_generation, g in sorted(stats.items()):
        views = [x.id for x in (*state.retired, state.current) if x.ops == ops_generation]
        report.append({
            "ops_generation": ops_generation, "views": views,
            "current": state.current.ops == ops_generation, "ops": g["ops"],
            "memories": len(g["memories"]), "adds": g["kinds"]["ADD"],
            "merges": g["kinds"]["MERGE"], "updates": g["kinds"]["UPDATE"],
            "readers": sorted(g["readers"]),
        })  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"cube": cube, "generations": report}))
        return
    table = Table("ops gen", "ops", "memories", "ADD", "MERGE", "UPDATE", "reader",
                  title=f"generations in the log{f' of {cube}' if cube else ''}")  # fmt: skip
    for g in report:
        mark = " (current)" if g["current"] else ""
        table.add_row(f"{g['ops_generation']}{mark}", str(g["ops"]), str(g["memories"]),
                      str(g["adds"]), str(g["merges"]), str(g["updates"]),
                      "; ".join(g["readers"]))  # fmt: skip
    console.print(table)

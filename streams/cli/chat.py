"""``memstream chat <cube>``: chat with a cube's memory through the running API.

An interactive REPL (the conversation is kept and sent with every turn; ``/reset`` forgets it,
``/memories`` shows what the last answer used, ``/quit`` or Ctrl-D leaves) or one turn with
``--message``. Tokens are printed as they stream; each turn is published back to the cube.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from streams.settings import Settings


def _show_memories(console: Console, done: dict[str, Any]) -> None:
    table = Table("memory", "from", "text", title="memories in the prompt", title_justify="left")
    prefix = set(done["prefix"].get("memory_ids", []))
    texts = dict(zip(done["memory_ids"], done["memories"], strict=False))
    for memory_id in done["memory_ids"]:
        where = "prefix" if memory_id in prefix else "retrieved"
        table.add_row(memory_id[:8], where, texts.get(memory_id, ""))
    console.print(table)


def _footer(done: dict[str, Any]) -> str:
    t = done["timings_ms"]
    prefix = done["prefix"]
    source = prefix.get("source", "?")
    adapter = " + adapter" if (done.get("adapter") or {}).get("applied") else ""
    return (f"[dim]{len(done['memory_ids'])} memories, prefix {source} "
            f"({prefix.get('tokens') or 0} tokens){adapter}, {done['prompt_tokens']} prompt + "
            f"{done['completion_tokens']} tokens, first token {t.get('ttft_ms', 0):.0f} ms, "
            f"total {t.get('total_ms', 0):.0f} ms[/dim]")  # fmt: skip


def chat(
    cube: Annotated[str, typer.Argument(help="The cube whose memory answers.")],
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="One turn, then exit.")
    ] = None,
    url: Annotated[str | None, typer.Option(help="The API (default: MEMSTREAM_API_*).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 128,
    top_k: Annotated[int, typer.Option(help="Memories retrieved per turn.")] = 5,
    user: Annotated[str, typer.Option(help="Your name as the speaker of your messages.")] = "user",
    session: Annotated[str, typer.Option(help="Session id of the published turns.")] = "chat",
    publish: Annotated[
        bool, typer.Option(help="Publish each turn back as interactions of the cube.")
    ] = True,
    memories: Annotated[
        bool, typer.Option("--memories", help="Print the memories each answer used.")
    ] = False,
) -> None:
    """Chat with a cube's memory (streamed). Without --message: a REPL."""
    from streams.sdk.chat import ChatFailed, chat_body, chat_events
    from streams.sdk.http import APIUnavailable, Http

    console = Console(highlight=False)
    history: list[dict[str, str]] = []
    last: dict[str, Any] | None = None
    options = {"max_new_tokens": max_new_tokens, "top_k": top_k, "user": user,
               "session_id": session, "publish": publish}  # fmt: skip

    def turn(text: str) -> None:
        nonlocal last
        body = chat_body(text, history, **options)
        answer: list[str] = []
        for kind, data in chat_events(http, cube, body):
            if kind == "token":
                answer.append(data["text"])
                console.print(data["text"], end="", markup=False, soft_wrap=True)
            elif kind == "done":
                last = data
                console.print()
                console.print(_footer(data))
                if memories:
                    _show_memories(console, data)
                history.extend([{"role": "user", "content": text},
                                {"role": "assistant", "content": data["answer"]}])  # fmt: skip

    http = Http(url or Settings().api_url, timeout=600)
    try:
        try:
            if message is not None:
                turn(message)
                return
            console.print(f"[bold]chat with cube {cube}[/bold] [dim](/reset, /memories, "
                          "/quit)[/dim]")  # fmt: skip
            while True:
                try:
                    text = console.input("[bold cyan]> [/bold cyan]").strip()
                except (EOFError, KeyboardInterrupt):
                    console.print()
                    return
                if not text:
                    continue
                if text in ("/quit", "/exit"):
                    return
                if text == "/reset":
                    history.clear()
                    console.print("[dim]conversation forgotten (the cube's memory stays)[/dim]")
                    continue
                if text == "/memories":
                    if last:
                        _show_memories(console, last)
                    continue
                try:
                    turn(text)
                except ChatFailed as exc:
                    console.print(f"[red]{exc}[/red]")
        except ChatFailed as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
        except APIUnavailable as exc:
            console.print(f"[red]{exc}: is `memstream serve` running?[/red]")
            raise typer.Exit(1) from None
    finally:
        http.close()

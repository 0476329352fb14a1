"""``prefix-serve push | pull | ls | rm``: a tenant's prefixes on a server, through the SDK."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC
from typing import TYPE_CHECKING

from server.cli.remote import print_json, remote_options, with_client

if TYPE_CHECKING:
    from prefix_client import Client, PrefixInfo


def register(commands: argparse._SubParsersAction) -> None:
    remote = [remote_options()]
    push = commands.add_parser(
        "push", parents=remote, help="upload a prefix: a native .safetensors file or a PEFT adapter folder"
    )
    push.add_argument("task_id", metavar="TASK_ID")
    push.add_argument(
        "path", metavar="PATH", help="a native .safetensors file or a PEFT PREFIX_TUNING folder"
    )
    push.add_argument(
        "--if-match",
        metavar="VERSION",
        help="replace only if the current version is VERSION (default: whatever version is there)",
    )
    push.set_defaults(handler=with_client(_push))

    pull = commands.add_parser(
        "pull",
        parents=remote,
        help="download a task as a native .safetensors file, or as a PEFT adapter folder",
    )
    pull.add_argument("task_id", metavar="TASK_ID")
    pull.add_argument(
        "path",
        metavar="PATH",
        help="the file to write; an existing folder, or a path ending in '/', is a folder (created if "
        "needed) that gets TASK_ID.safetensors; with --peft, the adapter folder to write",
    )
    pull.add_argument(
        "--peft",
        action="store_true",
        help="write a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) instead "
        "(default: a native .safetensors file)",
    )
    pull.set_defaults(handler=with_client(_pull))

    ls = commands.add_parser(
        "ls", parents=remote, help="list the tenant's prefixes, a page at a time as the server sends them"
    )
    ls.add_argument(
        "--page-size", type=int, metavar="N", help="prefixes per request (default: the server's, 100)"
    )
    ls.set_defaults(handler=with_client(_ls))

    rm = commands.add_parser("rm", parents=remote, help="delete a prefix")
    rm.add_argument("task_id", metavar="TASK_ID")
    rm.add_argument(
        "--if-match",
        metavar="VERSION",
        help="delete only if the current version is VERSION (default: whatever version is there)",
    )
    rm.set_defaults(handler=with_client(_rm))


def _push(client: Client, args: argparse.Namespace) -> int:
    result = client.upload_prefix(args.task_id, args.path, if_match=args.if_match)
    if args.json:
        print_json(result)
    else:
        source = "a PEFT adapter" if result.source_format == "peft" else "a native file"
        print(
            f"{'created' if result.created else 'replaced'} {result.task_id}: version {result.version}, "
            f"{'a soft prompt of ' if result.kind == 'soft_prompt' else ''}"
            f"{result.num_virtual_tokens} virtual tokens, {human_bytes(result.bytes)} (from {source})"
        )
    return 0


def _pull(client: Client, args: argparse.Namespace) -> int:
    written = client.download_prefix(args.task_id, args.path, peft=args.peft)
    if args.json:
        print_json({"task_id": args.task_id, "path": str(written)})
    else:
        print(f"saved {args.task_id} to {written}")
    return 0


def _ls(client: Client, args: argparse.Namespace) -> int:
    """Each page is printed as it arrives (a tenant may hold thousands of tasks): table rows, or with
    ``--json`` one document ``{"prefixes": [...]}`` written item by item."""
    cursor: str | None = None
    shown = 0
    if args.json:
        sys.stdout.write('{"prefixes": [')
    while True:
        page = client.list_prefixes_page(limit=args.page_size, cursor=cursor)
        if args.json:
            for prefix in page.prefixes:
                sys.stdout.write(("" if shown == 0 else ", ") + prefix.model_dump_json())
                shown += 1
        elif page.prefixes:
            _print_table(page.prefixes, header=shown == 0)
            shown += len(page.prefixes)
        sys.stdout.flush()
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    if args.json:
        print("]}")
    elif shown == 0:
        print("no prefixes")
    return 0


def _rm(client: Client, args: argparse.Namespace) -> int:
    client.delete_prefix(args.task_id, if_match=args.if_match)
    if args.json:
        print_json({"task_id": args.task_id, "deleted": True})
    else:
        print(f"deleted {args.task_id}")
    return 0


def _print_table(prefixes: list[PrefixInfo], *, header: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", show_header=header)
    table.add_column("task", overflow="fold")
    table.add_column("version", no_wrap=True)
    table.add_column("kind")
    table.add_column("virtual tokens", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("resident")
    table.add_column("created", no_wrap=True)
    for p in prefixes:
        table.add_row(
            p.task_id,
            p.version,
            p.kind,
            str(p.num_virtual_tokens),
            human_bytes(p.bytes),
            "yes" if p.resident else "no",
            p.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),  # as --json, to the second
        )
    # a terminal folds a long task id to fit; a pipe gets whole lines for scripts to read
    Console(width=None if sys.stdout.isatty() else 10_000).print(table)


def human_bytes(count: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")

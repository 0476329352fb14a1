"""``prefix-serve generate [--task TASK_ID] PROMPT``: tokens printed as they are generated, through the SDK."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from server.cli.remote import EXIT_ERROR, fail, print_json, remote_options, with_client

if TYPE_CHECKING:
    from prefix_client import Client

_SERVER_ENDED = ("deadline", "error")  # finish reasons of a stream the server had to cut short


def register(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate", parents=[remote_options()], help="generate text, printing tokens as they come"
    )
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt ('-' reads it from stdin)")
    generate.add_argument(
        "--task", metavar="TASK_ID", help="the task whose prefix to use (default: none, the base model alone)"
    )
    generate.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="tokens to generate at most (default: the server's, 64 or its limit if lower)",
    )
    generate.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature; 0 = greedy (default: 0)"
    )
    generate.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help="nucleus sampling: the smallest set of tokens holding probability P (default: 1.0, off)",
    )
    generate.add_argument(
        "--top-k", type=int, metavar="K", help="sample among the K likeliest tokens (default: 0, off)"
    )
    generate.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="the same seed and parameters give the same text (default: none, a fresh draw each time)",
    )
    generate.add_argument(
        "--stop", action="append", metavar="TEXT", help="a stop sequence, repeatable (default: none)"
    )
    generate.add_argument(
        "--cache-salt",
        metavar="SALT",
        help="only requests with the same salt share cached prompt blocks (default: none)",
    )
    generate.set_defaults(handler=with_client(_generate))


def _generate(client: Client, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params: dict[str, Any] = {
        name: value
        for name, value in (
            ("max_new_tokens", args.max_new_tokens),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("top_k", args.top_k),
            ("seed", args.seed),
            ("stop", args.stop),
            ("cache_salt", args.cache_salt),
        )
        if value is not None
    }
    if args.json:
        print_json(client.generate(prompt, task_id=args.task, **params))
        return 0
    with client.stream(prompt, task_id=args.task, **params) as tokens:
        for token in tokens:
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if tokens.finish_reason in _SERVER_ENDED:
        fail(f"the server ended the generation early ({tokens.finish_reason})")
        return EXIT_ERROR
    return 0

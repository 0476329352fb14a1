"""What the commands that call a server share: ``--server``/``--api-key``/``--timeout``/``--json``,
building the SDK client, and turning its errors into one line and a non-zero exit.

These commands use the SDK (``prefix_client``) only, never the server's internals, and import it when
they run, so ``prefix-serve --help`` stays fast and nothing here needs torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefix_client import Client

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def remote_options() -> argparse.ArgumentParser:
    """The options of every command that talks to a server (a parent parser)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("server")
    group.add_argument(
        "--server", metavar="URL", help="the server (default: $PREFIX_SERVE_URL or http://127.0.0.1:8000)"
    )
    group.add_argument(
        "--api-key", metavar="KEY", help="the API key (default: $PREFIX_SERVE_API_KEY, else none)"
    )
    group.add_argument(
        "--timeout",
        type=_positive(float),
        default=300.0,
        metavar="SECONDS",
        help="per request (default: %(default)g)",
    )
    group.add_argument(
        "--max-retries",
        type=_positive(int, zero_ok=True),
        default=2,
        metavar="N",
        help="retries of connection errors, 429 and 503 (default: %(default)s)",
    )
    group.add_argument(
        "--json", action="store_true", help="print JSON for scripts (default: text for people)"
    )
    return options


def _positive(kind: type[int] | type[float], *, zero_ok: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero_ok else 'more than 0'}")
        return value

    return parse


def with_client(command: Callable[[Client, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A handler that runs ``command`` with a client for ``args``; an SDK error exits 1 with one line."""

    def handler(args: argparse.Namespace) -> int:
        from prefix_client import Client, PrefixServeError

        try:
            with Client(
                args.server, args.api_key, timeout=args.timeout, max_retries=args.max_retries
            ) as client:
                return command(client, args)
        except PrefixServeError as exc:
            fail(str(exc))
            return EXIT_ERROR
        except OSError as exc:  # writing a pulled prefix, reading stdin
            fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
            return EXIT_ERROR
        except KeyboardInterrupt:
            fail("interrupted")
            return EXIT_INTERRUPTED

    return handler


def fail(message: str) -> None:
    """One line on stderr."""
    print(f"prefix-serve: error: {' '.join(message.split())}", file=sys.stderr)


def print_json(data: Any) -> None:
    """``data`` (a pydantic model, a list of them, or plain JSON data) as one JSON document on stdout."""
    print(json.dumps(_plain(data), ensure_ascii=False))


def _plain(data: Any) -> Any:
    if hasattr(data, "model_dump"):
        return data.model_dump(mode="json")
    if isinstance(data, list):
        return [_plain(item) for item in data]
    if isinstance(data, dict):
        return {key: _plain(value) for key, value in data.items()}
    return data

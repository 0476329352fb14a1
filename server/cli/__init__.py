"""The ``prefix-serve`` command line: one module per command (group), each with a ``register`` function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from server.cli import bench, generate, keys, models, prefixes, serve, train
from server.version import package_version

COMMAND_MODULES = (serve, models, keys, prefixes, generate, train, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-serve", description="Serve many prefix-tuned tasks on one model."
    )
    parser.add_argument("--version", action="version", version=f"prefix-serve {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

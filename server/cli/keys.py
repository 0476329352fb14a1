"""``prefix-serve keys create``: API keys (only their hashes are stored)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="generate a key, print it once, store only its hash")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=["admin", "user"], required=True)
    create.add_argument("--file", required=True, help="the keys file (created if missing)")
    create.set_defaults(handler=_keys_create)


def _keys_create(args: argparse.Namespace) -> int:
    from server.api.auth import KeysFileError, Role, create_key

    try:
        key = create_key(Path(args.file), args.tenant, Role(args.role))
    except (KeysFileError, ValueError, OSError) as exc:
        print(f"prefix-serve: {exc}", file=sys.stderr)
        return 1
    print(key)
    print(f"(shown once; only its SHA-256 was added to {args.file})", file=sys.stderr)
    return 0

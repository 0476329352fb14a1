"""``prefix-serve keys create``: API keys (only their hashes are stored)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server.cli.remote import EXIT_ERROR, fail

KEYS_FILE_ENV = "PREFIX_SERVE_API_KEYS"  # the file `prefix-serve serve` reads
EXIT_USAGE = 2


def register(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="generate a key, print it once, store only its hash")
    create.add_argument(
        "--tenant",
        default="default",
        help="the tenant the key belongs to (default: %(default)s, the tenant of a server with auth "
        "off, so prefixes uploaded before auth was turned on stay reachable)",
    )
    create.add_argument(
        "--role",
        choices=["admin", "user"],
        default="user",
        help="user: generate and list models; admin: also manage the tenant's prefixes "
        "(default: %(default)s)",
    )
    create.add_argument(
        "--file",
        metavar="FILE",
        help=f"the keys file, created if missing (default: ${KEYS_FILE_ENV}; one of the two is needed)",
    )
    create.set_defaults(handler=_keys_create)


def _keys_create(args: argparse.Namespace) -> int:
    from server.api.auth import KeysFileError, Role, create_key

    keys_file = args.file or os.environ.get(KEYS_FILE_ENV)
    if not keys_file:
        fail(f"give the keys file with --file FILE (or ${KEYS_FILE_ENV})")
        return EXIT_USAGE
    try:
        key = create_key(Path(keys_file), args.tenant, Role(args.role))
    except (KeysFileError, ValueError, OSError) as exc:
        fail(str(exc))
        return EXIT_ERROR
    print(key)
    print(f"(shown once; only its SHA-256 was added to {keys_file})", file=sys.stderr)
    return 0

"""The ``prefix-serve`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.config import ServeSettings

    options = {
        name: getattr(args, name)
        for name in ("model", "store", "host", "port", "api_keys", "device", "dtype")
        if getattr(args, name) is not None
    }
    settings = ServeSettings(**options)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that was
    # in place before it started: ours, so a graceful stop exits 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_cleanly)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _demo_model(args: argparse.Namespace) -> int:
    from server.demo_model import build_demo_model

    out = build_demo_model(Path(args.outdir))
    print(f"demo model written to {out}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-serve", description="Serve many prefix-tuned tasks on one model."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--model", help="local Hugging Face model folder or hub id (default: the demo model)")
    serve.add_argument("--store", help="file:///abs/path (default ./prefix-data) or redis://host:port/db")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--api-keys", type=Path, help="keys file; without it auth is off (single tenant)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo-model", help="build the small offline demo model into OUTDIR")
    demo.add_argument("outdir")
    demo.set_defaults(handler=_demo_model)
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="generate a key, print it once, store only its hash")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=["admin", "user"], required=True)
    create.add_argument("--file", required=True, help="the keys file (created if missing)")
    create.set_defaults(handler=_keys_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""``prefix-serve serve``: the HTTP server."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--model", help="local Hugging Face model folder or hub id (default: the demo model)")
    serve.add_argument("--store", help="file:///abs/path (default ./prefix-data) or redis://host:port/db")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--api-keys", type=Path, help="keys file; without it auth is off (single tenant)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.set_defaults(handler=_serve)


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

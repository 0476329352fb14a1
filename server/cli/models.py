"""``prefix-serve demo-model``: the offline demo model."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo-model", help="build the small offline demo model into OUTDIR")
    demo.add_argument("outdir", metavar="OUTDIR", help="the folder to write (created if needed)")
    demo.set_defaults(handler=_demo_model)


def _demo_model(args: argparse.Namespace) -> int:
    from server.demo_model import build_demo_model

    out = build_demo_model(Path(args.outdir))
    print(f"demo model written to {out}")
    return 0

"""`specdec serve` arguments (the server itself lives in server/app.py)."""
from __future__ import annotations

import argparse


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    from ..cli import add_model_args

    add_model_args(p)
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    raise NotImplementedError

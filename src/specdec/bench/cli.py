"""`specdec bench` arguments (the runner lives in bench/runner.py)."""
from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure speedup, acceptance and compute against plain decoding and peers")
    from ..cli import add_model_args

    add_model_args(p)
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    raise NotImplementedError

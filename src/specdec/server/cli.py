"""`specdec serve`: load an engine and serve it over HTTP."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import SpecDecError


def add_serve_parser(sub) -> None:
    from ..model_args import add_model_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with streaming and metrics")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-concurrency", type=int, default=8, help="requests generated at once")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; beyond this: HTTP 429")
    p.add_argument("--api-key", default=os.environ.get("SPECDEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SPECDEC_API_KEY)")
    p.add_argument("--served-model-name", help="model id clients send (default: derived from --target)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, waiting included; then HTTP 504 (0: no limit; default 600)")
    p.add_argument("--replicas", metavar="N|auto",
                   help="run N copies of the server (or 'auto': between --min-replicas and --max-replicas by "
                        "load) behind Ray Serve's proxy on --host:--port; needs the ray extra")
    p.add_argument("--min-replicas", type=int, default=1, help="--replicas auto: the fewest (default 1)")
    p.add_argument("--max-replicas", type=int, default=4, help="--replicas auto: the most (default 4)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on a stop (SIGTERM, Ctrl-C), or for a replica being removed: seconds the requests in "
                        "flight may take to finish, while no new ones are taken; then they are cut (default 60)")
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.drain_timeout < 0:
        raise SpecDecError("--drain-timeout must be >= 0 seconds")
    if args.replicas is not None:
        from .replicas import serve_replicas

        return serve_replicas(args, build_app)
    import uvicorn

    app = build_app(args)
    logging.getLogger("specdec").info("serving on http://%s:%d", args.host, args.port)
    # On SIGTERM or Ctrl-C uvicorn closes the listener and lets the requests in flight finish
    # (streams included), for --drain-timeout seconds at most.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.drain_timeout)
    return 0


def build_app(args: argparse.Namespace):
    """The server's FastAPI app for `specdec serve`'s arguments: load the engine, size its batch."""
    from ..model_args import load_engine
    from .app import ServerConfig, create_app

    engine = load_engine(args)
    slots = engine.target.max_sequences
    if slots is not None and args.max_concurrency > slots:
        raise SpecDecError(f"--max-concurrency {args.max_concurrency} exceeds the {slots} sequences this backend "
                           "holds at once; lower it, or use --backend torch")
    engine.reserve_sequences(args.max_concurrency)
    name = args.served_model_name or _model_id(engine.target.name)
    config = ServerConfig(model_name=name, max_running=args.max_concurrency, max_waiting=args.max_queue,
                          api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                          request_timeout_s=args.request_timeout or None)
    logging.getLogger("specdec").info("serving %r with drafter %r", name, engine.drafter_name)
    return create_app(engine, config)


def _model_id(target_name: str) -> str:
    path = Path(target_name)
    return path.name if path.exists() else target_name

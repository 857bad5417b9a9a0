"""`specdec serve --replicas N`: N copies of the server behind Ray Serve's HTTP proxy.

Each replica is a Ray actor (a process of its own) running the same FastAPI app as `specdec
serve` (`create_app`): its own engine, scheduler thread, batch and Prometheus metrics. Ray Serve's
proxy spreads requests over the replicas (the OpenAI routes are unchanged), restarts one that
dies (only the requests it held fail), and with `--replicas auto` scales between
`--min-replicas` and `--max-replicas` on ongoing requests per replica (each one's queue depth).
A replica being removed takes no new requests and finishes those it holds (drain, up to
`--drain-timeout` seconds); a stop (SIGTERM, Ctrl-C) drains every replica before Ray shuts down. Every response names the replica that served it
(`x-specdec-replica`: its process id), and so do its metrics (`specdec_replica_info`). Each
replica runs on its share of the machine's cores (`threads_per_replica`).

Ray is an optional extra (`pip install -e '.[ray]'`); without it `--replicas` is refused with
that hint.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any, Callable

from ..errors import SpecDecError

log = logging.getLogger("specdec.server")

APP_NAME = "specdec"
REPLICA_HEADER = "x-specdec-replica"


def replica_settings(replicas: str, min_replicas: int, max_replicas: int, max_concurrency: int,
                     max_queue: int, drain_timeout_s: float) -> dict[str, Any]:
    """Ray Serve deployment options for `--replicas` ("N" or "auto")."""
    options: dict[str, Any] = {
        # The proxy sends a replica at most what its scheduler runs and queues: past that the
        # replica's own 429 answers, as it does alone.
        "max_ongoing_requests": max_concurrency + max_queue,
        "graceful_shutdown_timeout_s": drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if replicas == "auto":
        if not 1 <= min_replicas <= max_replicas:
            raise SpecDecError("need 1 <= --min-replicas <= --max-replicas")
        # Scale on queue depth: a replica is "full" at the requests its scheduler runs at once.
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": max_concurrency,
                                         "upscale_delay_s": 5.0, "downscale_delay_s": 30.0}
        return options
    try:
        count = int(replicas)
    except ValueError:
        raise SpecDecError(f"--replicas takes a number or 'auto', got {replicas!r}") from None
    if count < 1:
        raise SpecDecError("--replicas must be >= 1")
    options["num_replicas"] = count
    return options


def threads_per_replica(replicas: int, cores: int | None = None) -> int:
    """A replica's share of this machine's cores: decoding on CPU is bound by memory bandwidth, and
    replicas whose threads outnumber the cores wait on each other (2 replicas of 2 threads each on
    2 cores: a third of one replica's throughput)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, replicas))


def app_builder(args: argparse.Namespace, build: Callable[[argparse.Namespace], Any],
                threads: int) -> Callable[[], Any]:
    """What a replica runs at its start: `build(args)` -> the server's FastAPI app on `threads`
    threads, labelled with the replica (a header on every response, and a metric)."""
    def build_replica_app():
        import torch

        os.environ["SPECDEC_THREADS"] = str(threads)  # llama.cpp's threads
        torch.set_num_threads(threads)
        app = build(args)
        replica = str(os.getpid())
        app.state.metrics.replica_info.labels(replica=replica).set(1)

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    return build_replica_app


def serve_replicas(args: argparse.Namespace, build: Callable[[argparse.Namespace], Any]) -> int:
    """Run `build(args)`'s app as Ray Serve replicas on args.host:args.port until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SpecDecError("--replicas needs Ray Serve: pip install -e '.[ray]'") from None

    options = replica_settings(args.replicas, args.min_replicas, args.max_replicas, args.max_concurrency,
                               args.max_queue, args.drain_timeout)
    # A local Ray instance unless RAY_ADDRESS names a cluster; no dashboard (nothing to reach it).
    ray.init(include_dashboard=False, log_to_driver=True, ignore_reinit_error=True,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("SPECDEC_", "HF_"))}})
    serve.start(http_options={"host": args.host, "port": args.port}, detached=False)
    most = args.max_replicas if args.replicas == "auto" else int(args.replicas)
    threads = threads_per_replica(most)
    deployment = serve.deployment(serve.ingress(app_builder(args, build, threads))(), name="specdec-replica",
                                  ray_actor_options={"num_cpus": threads}, **options)
    log.info("serving on http://%s:%d with %s replica(s) of the engine (Ray Serve)", args.host, args.port,
             args.replicas)
    # SIGTERM (a supervisor's stop) ends it as Ctrl-C does: the replicas drain and the local Ray
    # processes are shut down, not left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            # Drain first: deleting the app stops its replicas gracefully (each finishes what it
            # holds, up to --drain-timeout) while the proxy still carries their streams.
            # serve.shutdown() alone stops the proxy at once and cuts every stream.
            log.info("draining the replicas (up to %.0f s; interrupt again to stop now)", args.drain_timeout)
            serve.delete(APP_NAME)
        except KeyboardInterrupt:
            log.warning("stopping without waiting for the requests in flight")
        except Exception as error:  # e.g. the app never deployed: the error that stopped it is the one to raise
            log.warning("could not drain the replicas: %s", error)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

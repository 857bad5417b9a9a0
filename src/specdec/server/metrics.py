"""Prometheus metrics for the server, in a registry of its own (one per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..stats import GenerationStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specdec_requests", "HTTP requests served, by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.generated_tokens = Counter("specdec_generated_tokens", "Output tokens generated", registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "Prompt tokens processed", registry=r)
        self.drafted_tokens = Counter("specdec_drafted_tokens", "Tokens proposed by the drafter", registry=r)
        self.accepted_tokens = Counter("specdec_accepted_tokens", "Drafted tokens accepted by the target", registry=r)
        self.target_passes = Counter("specdec_target_forward_passes", "Target verify/decode passes", registry=r)
        # By draft position (1 = a step's first draft token): how deep drafts stay right.
        self.drafted_by_position = Counter("specdec_drafted_tokens_by_position",
                                           "Draft tokens proposed at each position of a step's draft", ["position"],
                                           registry=r)
        self.accepted_by_position = Counter("specdec_accepted_tokens_by_position",
                                            "Draft tokens accepted at each position of a step's draft", ["position"],
                                            registry=r)
        self.scheduler_faults = Counter("specdec_scheduler_faults",
                                        "Batch steps that failed outside any one request (their requests ended)",
                                        registry=r)
        self.cancelled = Counter("specdec_cancelled_requests", "Requests dropped because the client went away",
                                 registry=r)
        self._drafted = self._accepted = 0  # plain totals behind the acceptance-rate gauge
        self.acceptance_rate = Gauge("specdec_acceptance_rate", "Accepted / drafted tokens since start", registry=r)
        self.acceptance_rate.set_function(self._acceptance_rate)
        self.queue_depth = Gauge("specdec_queue_depth", "Requests waiting for a slot", registry=r)
        self.free_sequences = Gauge("specdec_free_sequences",
                                    "Sequence slots the backend has free (llama.cpp), when idle: all of them",
                                    registry=r)
        self.running = Gauge("specdec_running_requests", "Requests being generated", registry=r)
        self.time_to_first_token = Histogram("specdec_time_to_first_token_seconds", "Arrival to first output token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("specdec_request_latency_seconds", "Arrival to last output token",
                                         buckets=LATENCY_BUCKETS, registry=r)
        # Set to 1 with the replica's process id where Ray Serve runs replicas (replicas.py): each
        # scrape names the replica whose counters it read.
        self.replica_info = Gauge("specdec_replica_info", "The replica serving these metrics", ["replica"],
                                  registry=r)

    def count(self, endpoint: str, status: int) -> None:
        """One answered HTTP request, by its route's template and the status it ended with (a
        stream that failed after its 200 header counts as the failure's status, 499 if the
        client left)."""
        self.requests.labels(endpoint, str(status)).inc()

    def record_finished(self, stats: GenerationStats, latency_s: float) -> None:
        self.generated_tokens.inc(stats.generated_tokens)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.drafted_tokens.inc(stats.drafted_tokens)
        self.accepted_tokens.inc(stats.accepted_tokens)
        self._drafted += stats.drafted_tokens
        self._accepted += stats.accepted_tokens
        self.target_passes.inc(stats.target_forward_passes)
        for position, (drafted, accepted) in enumerate(zip(stats.per_position_drafted, stats.per_position_accepted), 1):
            self.drafted_by_position.labels(str(position)).inc(drafted)
            self.accepted_by_position.labels(str(position)).inc(accepted)
        self.request_latency.observe(latency_s)

    def _acceptance_rate(self) -> float:
        return self._accepted / self._drafted if self._drafted else 0.0

"""The server's Prometheus metrics (GET /metrics, text exposition format), in a registry
of its own (several servers may live in one process):

    ttserve_requests_running                  users holding a decode slot (prefilling or decoding)
    ttserve_requests_waiting                  requests queued for a slot or for pages
    ttserve_kv_blocks_used, _total            KV page pool blocks reserved / in the pool
    ttserve_generated_tokens_total            tokens generated
    ttserve_prompt_tokens_total               prompt tokens admitted
    ttserve_time_to_first_token_seconds       histogram: arrival to first token
    ttserve_time_per_output_token_seconds     histogram: per request, (last - first token time) / (tokens - 1)
    ttserve_requests_finished_total{reason}   stop, length, cancelled, error
    ttserve_requests_rejected_total{status}   400, 429

The gauges are read from the scheduler when scraped; the scheduler reports tokens and
finished requests as they happen (it calls `first_token`, `token`, `finished`).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        self.registry = r = CollectorRegistry()
        Gauge("ttserve_requests_running", "Requests holding a decode slot", registry=r
              ).set_function(lambda: scheduler.running)
        Gauge("ttserve_requests_waiting", "Requests waiting for a slot or for KV pages", registry=r
              ).set_function(lambda: scheduler.waiting_count)
        Gauge("ttserve_kv_blocks_used", "KV cache blocks reserved by running requests", registry=r
              ).set_function(lambda: scheduler.blocks_used)
        Gauge("ttserve_kv_blocks_total", "KV cache blocks in the page pool", registry=r
              ).set_function(lambda: scheduler.blocks_total)
        self.generated = Counter("ttserve_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("ttserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.ttft = Histogram("ttserve_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("ttserve_time_per_output_token_seconds",
                              "Per request: time between tokens after the first", buckets=TPOT_BUCKETS, registry=r)
        self.finished_requests = Counter("ttserve_requests_finished", "Requests ended, by reason", ["reason"],
                                         registry=r)
        self.rejected = Counter("ttserve_requests_rejected", "Requests refused, by HTTP status", ["status"],
                                registry=r)

    # ------------------------------------------------------------------ scheduler events
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token(self) -> None:
        self.generated.inc()

    def finished(self, request) -> None:
        self.finished_requests.labels(request.finish_reason).inc()
        self.prompt_tokens.inc(len(request.prompt))
        n = len(request.generated)
        if n > 1:
            self.tpot.observe((request.last_token_at - request.first_token_at) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

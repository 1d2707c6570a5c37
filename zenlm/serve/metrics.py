"""The server's Prometheus series: requests, tokens, latency, time to first token, and the engine's
batch size, step time, queue depth and running requests."""
from __future__ import annotations

from .catalog import ModelCatalog


class Metrics:
    """Prometheus series for one app (its own registry, so several apps can live in one process)."""

    def __init__(self, catalog: ModelCatalog):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("zenlm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("zenlm_tokens", "tokens metered, by model and kind", ["model", "kind"], registry=r)
        self.latency = Histogram("zenlm_request_latency_seconds", "time to the last byte of a response", ["route"],
                                 registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.ttft = Histogram("zenlm_time_to_first_token_seconds", "queueing + prefill until the first token",
                              ["model"], registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("zenlm_batch_size", "rows in each decoding step", ["model"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.step = Histogram("zenlm_step_seconds", "wall time of one decoding step", ["model"], registry=r,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.queue = Gauge("zenlm_queue_depth", "requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge("zenlm_running_requests", "requests in the decoding batch", ["model"], registry=r)
        for m in catalog.models.values():
            if m.engine is not None:
                self.queue.labels(m.id).set_function(lambda e=m.engine: e.queue_depth)
                self.running.labels(m.id).set_function(lambda e=m.engine: e.batch_size)
                m.engine.on_step = lambda rows, dt, name=m.id: (self.batch.labels(name).observe(rows),
                                                                self.step.labels(name).observe(dt))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

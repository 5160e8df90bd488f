"""Prometheus metrics of a serving engine, in the text format ``/metrics`` returns.

Gauges and counters are read from the engine's latest stats at every scrape; the latency
histograms (time to first token, time per output token, end-to-end) are observed in the engine
thread as requests finish. Each server has its own registry, so several can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mlx_serve.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """The engine's gauges and counters; with data-parallel replicas, one sample per replica
    under a ``replica`` label (sum them for the server's totals)."""

    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        rows = self.async_engine.per_replica()
        labels = ["replica"] if len(rows) > 1 else []
        gauges = (
            ("num_seqs_running", "Sequences in the running batch (a request with n=2 has 2).",
             lambda s, rate: s.num_running),
            ("num_seqs_waiting", "Sequences waiting to be scheduled (preempted ones included).",
             lambda s, rate: s.num_waiting),
            ("kv_blocks_total", "KV-cache blocks in the preallocated cache.",
             lambda s, rate: s.num_blocks),
            ("kv_blocks_free", "KV-cache blocks no sequence holds (cached prefixes included).",
             lambda s, rate: s.num_free_blocks),
            ("kv_blocks_used", "KV-cache blocks held by sequences.",
             lambda s, rate: s.num_blocks - s.num_free_blocks),
            ("kv_cache_usage_ratio", "Fraction of the KV-cache blocks in use.",
             lambda s, rate: (s.num_blocks - s.num_free_blocks) / s.num_blocks),
            ("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens "
             "looked up, since start.", lambda s, rate: s.prefix_cache_hit_rate),
            ("generation_tokens_per_second", "Generated tokens per second over the last ~10 s.",
             lambda s, rate: rate))
        counters = (
            ("prompt_tokens", "Prompt tokens received (times n).", lambda s: s.prompt_tokens),
            ("generation_tokens", "Tokens generated.", lambda s: s.generation_tokens),
            ("preemptions", "Sequences preempted (recomputed later) because the KV cache "
             "was full.", lambda s: s.num_preemptions),
            ("spec_decode_num_draft_tokens", "Speculative draft tokens checked.",
             lambda s: s.num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Speculative draft tokens kept (each one a "
             "token generated without a step of its own).", lambda s: s.num_accepted_tokens))
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"mlx_serve_{name}", doc, labels=labels)
            for i, (stats, rate) in enumerate(rows):
                family.add_metric([str(i)] if labels else [], value(stats, rate))
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(f"mlx_serve_{name}", doc, labels=labels)
            for i, (stats, _) in enumerate(rows):
                family.add_metric([str(i)] if labels else [], value(stats))
            yield family


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("mlx_serve_time_to_first_token_seconds",
                              "Arrival to first generated token.", buckets=_LATENCY_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("mlx_serve_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("mlx_serve_e2e_request_latency_seconds",
                             "Arrival to the last token.", buckets=_LATENCY_BUCKETS,
                             registry=self.registry)
        self.finished = Counter("mlx_serve_requests_finished",
                                "Requests finished, by why: stop, length or abort.",
                                ["finish_reason"], registry=self.registry)

    def attach(self, async_engine) -> None:
        """Expose ``async_engine``'s stats and observe its finished requests."""
        self.registry.register(_EngineCollector(async_engine))
        async_engine.on_step = self.on_step

    def on_step(self, async_engine, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if not out.finished:
                continue
            reasons = {o.finish_reason for o in out.outputs}
            self.finished.labels("abort" if "abort" in reasons else out.outputs[0].finish_reason
                                 ).inc()
            m = out.metrics
            if m is None or m.first_token_time is None:
                continue
            self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
                generated = max(len(o.token_ids) for o in out.outputs)
                if generated > 1:
                    self.tpot.observe((m.finished_time - m.first_token_time) / (generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

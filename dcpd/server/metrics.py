"""Prometheus metrics, served over HTTP on a loopback port (prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dcpd_requests", "Finished requests by finish reason", ["reason"], registry=r)
        self.errors = Counter("dcpd_errors", "Error replies by code", ["code"], registry=r)
        self.ttft = Histogram("dcpd_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "dcpd_time_per_output_token_seconds", "Decode time per output token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram("dcpd_request_seconds", "Request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dcpd_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("dcpd_running_requests", "Requests holding KV blocks", registry=r)
        self.kv_used = Gauge("dcpd_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_free = Gauge("dcpd_kv_blocks_free", "KV blocks free", registry=r)
        self.tokens_in = Counter("dcpd_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.tokens_out = Counter("dcpd_generation_tokens", "Tokens generated", registry=r)
        self.steps = Counter("dcpd_engine_steps", "Engine steps run", registry=r)
        self.preemptions = Counter("dcpd_preemptions", "Requests preempted for KV blocks", registry=r)
        # disaggregation (prefill peers: transfers; router: states, stages, peers, retries)
        self.transfer_bytes = Counter("dcpd_kv_transfer_bytes", "KV bytes pushed to decode peers", registry=r)
        self.transfer_seconds = Histogram(
            "dcpd_kv_transfer_seconds", "KV push time, first chunk sent to ack", buckets=LATENCY_BUCKETS, registry=r
        )
        self.transfer_throughput = Histogram(
            "dcpd_kv_transfer_gb_per_second", "KV push throughput per request (GB/s)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0), registry=r,
        )  # fmt: skip
        self.transfer_failures = Counter("dcpd_kv_transfer_failures", "KV transfers that failed", registry=r)
        self.request_states = Gauge("dcpd_requests_in_state", "Requests in each routing state", ["state"], registry=r)
        self.stage_seconds = Histogram(
            "dcpd_stage_seconds", "Time spent in each routing stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.peers = Gauge("dcpd_peers", "Registered peers by role", ["role"], registry=r)
        self.retries = Counter("dcpd_request_retries", "Requests retried on another peer pair", ["why"], registry=r)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter in a background thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]

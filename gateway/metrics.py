"""Prometheus metrics of the gateway (the default registry, served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("chatai_requests_total", "API requests by endpoint, model and HTTP status",
                   ["endpoint", "model", "status"])
QUEUE_WAIT = Histogram("chatai_queue_wait_seconds", "Time from publishing a request to a worker starting it",
                       ["model"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
TIME_TO_FIRST_TOKEN = Histogram("chatai_time_to_first_token_seconds",
                                "Time from publishing a streamed request to its first token", ["model"],
                                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TOKENS = Counter("chatai_tokens_total", "Tokens processed, by model and kind (prompt, completion)",
                 ["model", "kind"])
LIVE_WORKERS = Gauge("chatai_live_workers", "Workers with a recent heartbeat, by model and state",
                     ["model", "state"])
IN_FLIGHT = Gauge("chatai_in_flight_requests", "Requests this gateway waits on", ["model"])
BROKER_CONNECTED = Gauge("chatai_broker_connected", "1 while the gateway's AMQP connection is open")
CANCELLATIONS = Counter("chatai_cancellations_total", "Requests cancelled because the client went away",
                        ["model"])

"""Prometheus metrics of the gateway (the default registry, served at ``/metrics``).

Label values must stay few: a ``model`` label is the model's name only for models this gateway
knows (from worker heartbeats, or because the broker routed a request to the model's queue,
which exists only for models in the definitions); any other name a client sends counts under
``other``. Otherwise every made-up name would be a new series on every scrape.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OTHER_MODEL = "other"
MAX_KNOWN_MODELS = 1000  # far more than a deployment serves; a bound all the same
_known_models: set[str] = set()

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
# Prefix-cache affinity (gateway/cluster/affinity.py) and what the workers' caches report.
AFFINITY_ROUTES = Counter("chatai_affinity_requests_total",
                          "Follow-up turns sent to their preferred worker's affinity queue (preferred), or "
                          "returned by the broker because that queue was gone and sent to the model's queue "
                          "(returned)", ["model", "route"])
PREFIX_CACHE_TOKENS = Gauge("chatai_prefix_cache_tokens",
                            "Prompt tokens looked up in the prefix caches of the live workers, and found there "
                            "(since each worker started), by model", ["model", "kind"])
PREFIX_CACHE_HIT_RATE = Gauge("chatai_prefix_cache_hit_rate",
                              "Prompt tokens found in the prefix cache / looked up, live workers, by model",
                              ["model"])
IN_FLIGHT = Gauge("chatai_in_flight_requests", "Requests this gateway waits on", ["model"])
BROKER_CONNECTED = Gauge("chatai_broker_connected", "1 while the gateway's AMQP connection is open")
CANCELLATIONS = Counter("chatai_cancellations_total", "Requests cancelled because the client went away",
                        ["model"])
STALLED_STREAMS = Counter("chatai_stalled_streams_total",
                          "Streams given up because the client took no bytes for the send timeout", ["model"])
MALFORMED_FRAMES = Counter("chatai_malformed_frames_total",
                           "Broker messages dropped because they could not be read, by where they came from "
                           "(replies, heartbeats, batch_results)", ["source"])


def know_model(name: str) -> None:
    """Give ``name`` a label of its own from now on (a model the cluster really has)."""
    if name not in _known_models and len(_known_models) < MAX_KNOWN_MODELS:
        _known_models.add(name)


def model_label(name: str) -> str:
    """The ``model`` label value for a model name a client sent."""
    return name if name in _known_models else OTHER_MODEL

# The SSH tunnel (gateway/cluster/tunnel.py).
TUNNEL_UP = Gauge("chatai_tunnel_up", "1 while the SSH tunnel to the cluster is up")
TUNNEL_STATE = Gauge("chatai_tunnel_state", "1 for the SSH tunnel's current state", ["state"])
TUNNEL_CONNECT_ATTEMPTS = Counter("chatai_tunnel_connect_attempts", "SSH connection attempts to the login node")
TUNNEL_CONNECT_FAILURES = Counter("chatai_tunnel_connect_failures", "Failed SSH connection attempts", ["reason"])
TUNNEL_DISCONNECTS = Counter("chatai_tunnel_disconnects", "SSH tunnel connections lost after being up")
TUNNEL_FORWARDS = Counter("chatai_tunnel_forwarded_connections", "AMQP connections carried to the broker")
TUNNEL_FORWARD_FAILURES = Counter("chatai_tunnel_forward_failures",
                                  "AMQP connections refused: tunnel down or forward refused")
TUNNEL_ACTIVE_FORWARDS = Gauge("chatai_tunnel_active_forwards", "Forwarded connections open now")

# Batches (gateway/batches/).
BATCH_LINES_SENT = Counter("chatai_batch_lines_published_total", "Batch lines put on a model queue (re-sends too)",
                           ["model"])
BATCH_RESULTS = Counter("chatai_batch_results_total",
                        "Batch results received, by outcome (completed, failed, duplicate = dropped)", ["outcome"])

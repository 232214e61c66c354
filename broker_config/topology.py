"""Names and arguments of everything that lives on the broker.

Both sides and the definitions renderer import these names, so a rename happens in one place.
Model queues, the batch results queue and the users are declared by the broker's definitions
(see ``definitions.py``), never by the gateway or the workers: neither has the right to.
"""

from __future__ import annotations

VHOST = "chatai"

# Exchanges
REQUESTS_EXCHANGE = "chatai.requests"  # direct, routing key = served model name
REPLIES_EXCHANGE = "chatai.replies"  # direct, routing key = reply queue name
CONTROL_EXCHANGE = "chatai.control"  # fanout: cancellations, gateway -> every worker
WORKERS_EXCHANGE = "chatai.workers"  # fanout: heartbeats, worker -> every gateway

# Queues
MODEL_QUEUE_PREFIX = "chatai.model."
BATCH_RESULTS_QUEUE = "chatai.batch-results"  # durable: batch results survive a gateway restart
GATEWAY_QUEUE_PREFIX = "chatai.gw."  # per gateway process, exclusive, auto-delete
WORKER_QUEUE_PREFIX = "chatai.wk."  # per worker process, exclusive, auto-delete
OPERATOR_QUEUE_PREFIX = "chatai.op."  # per operator tool (status, autoscaler), exclusive, auto-delete

# Priorities (classic queues, x-max-priority): interactive work overtakes a running batch.
MAX_PRIORITY = 10
INTERACTIVE_PRIORITY = 9
BATCH_PRIORITY = 1

# A model queue refuses new messages past this many (reject-publish): the gateway answers 429.
DEFAULT_MAX_QUEUE_LENGTH = 10_000


def model_queue(model: str) -> str:
    """The durable queue that holds requests for one served model."""
    return MODEL_QUEUE_PREFIX + model


def model_queue_arguments(max_length: int = DEFAULT_MAX_QUEUE_LENGTH) -> dict[str, object]:
    return {
        "x-max-priority": MAX_PRIORITY,
        "x-max-length": max_length,
        "x-overflow": "reject-publish",
    }


def gateway_reply_queue(gateway_id: str) -> str:
    return f"{GATEWAY_QUEUE_PREFIX}{gateway_id}.replies"


def gateway_workers_queue(gateway_id: str) -> str:
    return f"{GATEWAY_QUEUE_PREFIX}{gateway_id}.workers"


def worker_control_queue(worker_id: str) -> str:
    return f"{WORKER_QUEUE_PREFIX}{worker_id}.control"


def operator_workers_queue(tool_id: str) -> str:
    """A status view's or autoscaler's private copy of the heartbeat stream."""
    return f"{OPERATOR_QUEUE_PREFIX}{tool_id}.workers"

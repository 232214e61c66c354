"""Names and arguments of everything that lives on the broker.

Both sides and the definitions renderer import these names, so a rename happens in one place.
Model queues, the batch results queue and the users are declared by the broker's definitions
(see ``definitions.py``), never by the gateway or the workers: neither has the right to.
"""

from __future__ import annotations

import re

VHOST = "chatai"

# Exchanges
REQUESTS_EXCHANGE = "chatai.requests"  # direct, routing key = served model name
# topic, routing key = reply queue name. A topic exchange because RabbitMQ's topic permissions
# (checked on queue.bind / exchange.bind) apply to topic exchanges only: they keep each gateway
# deployment's bindings to routing keys under its own namespace (see definitions.py).
REPLIES_EXCHANGE = "chatai.replies"
CONTROL_EXCHANGE = "chatai.control"  # fanout: cancellations, gateway -> every worker
WORKERS_EXCHANGE = "chatai.workers"  # fanout: heartbeats, worker -> every gateway
# headers: a follow-up turn for the worker that holds its conversation's prefix cache. The routing
# key stays the model's name (a headers exchange ignores it) so that what the affinity queue
# dead-letters into chatai.requests reaches the model's shared queue (see affinity_policy()).
AFFINITY_EXCHANGE = "chatai.affinity"
AFFINITY_HEADER = "chatai-worker"  # the worker id a message is meant for (x- headers are not matched)

# Queues
MODEL_QUEUE_PREFIX = "chatai.model."
# Everything of one gateway deployment lives under chatai.gw.<its broker user>.: reply and
# heartbeat queues per process (exclusive, auto-delete), durable batch results per database.
GATEWAY_QUEUE_PREFIX = "chatai.gw."
WORKER_QUEUE_PREFIX = "chatai.wk."  # per worker process, exclusive, auto-delete
OPERATOR_QUEUE_PREFIX = "chatai.op."  # per operator tool (status, autoscaler), exclusive, auto-delete

# Priorities (classic queues, x-max-priority): interactive work overtakes a running batch.
MAX_PRIORITY = 10
INTERACTIVE_PRIORITY = 9
BATCH_PRIORITY = 1

# A model queue refuses new messages past this many (reject-publish): the gateway answers 429.
DEFAULT_MAX_QUEUE_LENGTH = 10_000


# Affinity (docs/architecture.md, "Prefix-cache affinity"). A request waits at most this long in
# its preferred worker's affinity queue before the broker dead-letters it to the model's shared
# queue: the most a busy, draining or dead preferred worker delays it (the spill bound).
AFFINITY_SPILL_MS = 50
# An affinity queue nobody consumes is deleted after this long. Far longer than the spill bound
# and than a gateway remembers a silent worker (a few heartbeat intervals), so no gateway still
# sends to a queue about to go (deleting a queue drops its messages without dead-lettering them).
AFFINITY_QUEUE_EXPIRES_MS = 300_000
AFFINITY_POLICY = "chatai-affinity"


def model_queue(model: str) -> str:
    """The durable queue that holds requests for one served model."""
    return MODEL_QUEUE_PREFIX + model


def model_queue_arguments(max_length: int = DEFAULT_MAX_QUEUE_LENGTH) -> dict[str, object]:
    return {
        "x-max-priority": MAX_PRIORITY,
        "x-max-length": max_length,
        "x-overflow": "reject-publish",
    }


# A gateway deployment's name is its broker user name. No dots (a name must not be a prefix of
# another's namespace: "a" would own "chatai.gw.a.b.*" of a deployment "a.b") and nothing a
# regex or a topic pattern gives a meaning to.
DEPLOYMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
RESERVED_USERS = ("worker", "operator", "guest")


def check_deployment_name(name: str) -> str:
    if not DEPLOYMENT_NAME.match(name) or name in RESERVED_USERS:
        raise ValueError(f"invalid gateway deployment name {name!r}: lower-case letters, digits, '-' and '_', "
                         f"at most 63, not one of {', '.join(RESERVED_USERS)}")
    return name


def gateway_namespace(user: str) -> str:
    """The queue-name and routing-key prefix that one gateway deployment (broker user) owns."""
    return f"{GATEWAY_QUEUE_PREFIX}{user}."


def gateway_reply_queue(user: str, gateway_id: str) -> str:
    return f"{gateway_namespace(user)}{gateway_id}.replies"


def gateway_workers_queue(user: str, gateway_id: str) -> str:
    return f"{gateway_namespace(user)}{gateway_id}.workers"


def gateway_batch_results_queue(user: str, database_id: str) -> str:
    """Durable: batch results survive a gateway restart; one per gateway database."""
    return f"{gateway_namespace(user)}{database_id}.batch-results"


def worker_control_queue(worker_id: str) -> str:
    return f"{WORKER_QUEUE_PREFIX}{worker_id}.control"


def worker_affinity_queue(worker_id: str) -> str:
    """A worker's own queue of follow-up turns (not exclusive, not auto-delete: its messages must
    dead-letter to the shared queue, never vanish with the queue; the policy expires it)."""
    return f"{WORKER_QUEUE_PREFIX}{worker_id}.affinity"


AFFINITY_QUEUE_PATTERN = "^" + re.escape(WORKER_QUEUE_PREFIX) + r".+\.affinity$"


def affinity_binding(worker_id: str) -> dict[str, str]:
    """The headers binding of a worker's affinity queue: messages stamped with its id."""
    return {"x-match": "all", AFFINITY_HEADER: worker_id}


def affinity_policy() -> dict[str, object]:
    """The broker policy of every affinity queue: spill after the bound into the requests
    exchange (the message keeps its routing key, the model), expire when unused.

    A policy, not queue arguments: declaring a queue with ``x-dead-letter-exchange`` needs write
    permission on that exchange, which would let a worker publish requests. A policy is the
    operator's (``chatai broker apply``), so the worker keeps no such right.
    """
    return {"message-ttl": AFFINITY_SPILL_MS, "dead-letter-exchange": REQUESTS_EXCHANGE,
            "expires": AFFINITY_QUEUE_EXPIRES_MS}


def operator_workers_queue(tool_id: str) -> str:
    """A status view's or autoscaler's private copy of the heartbeat stream."""
    return f"{OPERATOR_QUEUE_PREFIX}{tool_id}.workers"

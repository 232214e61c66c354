"""Render the broker's definitions document: vhost, exchanges, model queues, users, permissions.

The document is what RabbitMQ imports (``rabbitmqctl import_definitions`` or the management
API); it is the one place where least privilege is written down. Permission regexes are
anchored and name exact exchanges, so a user cannot reach a look-alike name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field

from broker_config import topology as t


def _exact(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def _prefix(prefix: str) -> str:
    return "^" + re.escape(prefix) + ".*$"


def _either(*patterns: str) -> str:
    return "|".join(patterns)


# configure / write / read regexes per role. Queue.bind needs write on the queue and read on
# the exchange; basic.publish needs write on the exchange; basic.consume needs read on the queue.
PERMISSIONS: dict[str, dict[str, str]] = {
    # The gateway publishes requests and cancellations, owns its reply and heartbeat queues,
    # and reads batch results. It can neither read a model queue nor declare anything else.
    "gateway": {
        "configure": _prefix(t.GATEWAY_QUEUE_PREFIX),
        "write": _either(_exact(t.REQUESTS_EXCHANGE, t.CONTROL_EXCHANGE), _prefix(t.GATEWAY_QUEUE_PREFIX)),
        "read": _either(
            _exact(t.REPLIES_EXCHANGE, t.WORKERS_EXCHANGE, t.BATCH_RESULTS_QUEUE),
            _prefix(t.GATEWAY_QUEUE_PREFIX),
        ),
    },
    # A worker consumes model queues, publishes replies and heartbeats, owns its control queue.
    # It cannot publish requests.
    "worker": {
        "configure": _prefix(t.WORKER_QUEUE_PREFIX),
        "write": _either(_exact(t.REPLIES_EXCHANGE, t.WORKERS_EXCHANGE), _prefix(t.WORKER_QUEUE_PREFIX)),
        "read": _either(_exact(t.CONTROL_EXCHANGE), _prefix(t.MODEL_QUEUE_PREFIX), _prefix(t.WORKER_QUEUE_PREFIX)),
    },
    # Operators and the autoscaler look at queue depths and consumers (passive declare needs no
    # permission) and listen to heartbeats through queues of their own, bound to the workers
    # exchange. They can neither publish anything nor read requests or replies.
    "operator": {
        "configure": _prefix(t.OPERATOR_QUEUE_PREFIX),
        "write": _prefix(t.OPERATOR_QUEUE_PREFIX),
        "read": _either(_exact(t.WORKERS_EXCHANGE), _prefix(t.OPERATOR_QUEUE_PREFIX)),
    },
}
TAGS: dict[str, list[str]] = {"gateway": [], "worker": [], "operator": ["monitoring"]}
ROLES = tuple(PERMISSIONS)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` format: base64(salt + sha256(salt + pw))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def new_password() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class Definitions:
    """Inputs of the rendered document."""

    models: list[str]
    passwords: dict[str, str]  # role -> password
    max_queue_length: int = t.DEFAULT_MAX_QUEUE_LENGTH
    vhost: str = t.VHOST
    extra_users: list[dict] = field(default_factory=list)

    def render(self) -> dict:
        missing = set(ROLES) - set(self.passwords)
        if missing:
            raise ValueError(f"no password for broker users: {', '.join(sorted(missing))}")
        v = self.vhost
        exchanges = [
            {"name": name, "vhost": v, "type": kind, "durable": True, "auto_delete": False,
             "internal": False, "arguments": {}}
            for name, kind in (
                (t.REQUESTS_EXCHANGE, "direct"),
                (t.REPLIES_EXCHANGE, "direct"),
                (t.CONTROL_EXCHANGE, "fanout"),
                (t.WORKERS_EXCHANGE, "fanout"),
            )
        ]
        queues = [
            {"name": t.model_queue(m), "vhost": v, "durable": True, "auto_delete": False,
             "arguments": t.model_queue_arguments(self.max_queue_length)}
            for m in self.models
        ]
        queues.append({"name": t.BATCH_RESULTS_QUEUE, "vhost": v, "durable": True,
                       "auto_delete": False, "arguments": {}})
        bindings = [
            {"source": t.REQUESTS_EXCHANGE, "vhost": v, "destination": t.model_queue(m),
             "destination_type": "queue", "routing_key": m, "arguments": {}}
            for m in self.models
        ]
        bindings.append({"source": t.REPLIES_EXCHANGE, "vhost": v, "destination": t.BATCH_RESULTS_QUEUE,
                         "destination_type": "queue", "routing_key": t.BATCH_RESULTS_QUEUE, "arguments": {}})
        users = [
            {"name": role, "password_hash": hash_password(self.passwords[role]),
             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": TAGS[role]}
            for role in ROLES
        ] + list(self.extra_users)
        permissions = [{"user": role, "vhost": v, **PERMISSIONS[role]} for role in ROLES]
        return {
            "vhosts": [{"name": v}],
            "users": users,
            "permissions": permissions,
            "exchanges": exchanges,
            "queues": queues,
            "bindings": bindings,
        }

    def to_json(self) -> str:
        return json.dumps(self.render(), indent=2)

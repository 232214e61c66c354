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
from pathlib import Path

from broker_config import topology as t


def _exact(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def _prefix(prefix: str) -> str:
    return "^" + re.escape(prefix) + ".*$"


def _either(*patterns: str) -> str:
    return "|".join(patterns)


# configure / write / read regexes per role. Queue.bind needs write on the queue and read on
# the exchange; basic.publish needs write on the exchange; basic.consume, basic.get and
# queue.purge need read on the queue; queue.delete needs configure.
def gateway_permissions(user: str) -> dict[str, str]:
    """One gateway deployment (broker user ``user``): publish requests and cancellations, own
    everything under ``chatai.gw.<user>.`` and nothing of any other deployment. It can neither
    read a model queue nor declare, read or purge another deployment's queues."""
    own = _prefix(t.gateway_namespace(t.check_deployment_name(user)))
    return {
        "configure": own,
        "write": _either(_exact(t.REQUESTS_EXCHANGE, t.AFFINITY_EXCHANGE, t.CONTROL_EXCHANGE), own),
        "read": _either(_exact(t.REPLIES_EXCHANGE, t.WORKERS_EXCHANGE), own),
    }


def gateway_topic_permissions(user: str) -> dict[str, str]:
    """Read on the replies exchange (a topic exchange) only for routing keys in its own namespace:
    RabbitMQ checks it on queue.bind and exchange.bind, so a deployment cannot bind anything to
    another deployment's reply or batch-result keys (nor ``#``). It publishes no replies."""
    return {"exchange": t.REPLIES_EXCHANGE, "write": "^$",
            "read": _prefix(t.gateway_namespace(t.check_deployment_name(user)))}


ROLE_PERMISSIONS: dict[str, dict[str, str]] = {
    # A worker consumes model queues, publishes replies and heartbeats, owns its control and
    # affinity queues (binding the latter to the affinity exchange needs read on it). It cannot
    # publish requests: its affinity queue dead-letters into the requests exchange by the
    # operator's policy, not by a queue argument (which would need write on that exchange).
    "worker": {
        "configure": _prefix(t.WORKER_QUEUE_PREFIX),
        "write": _either(_exact(t.REPLIES_EXCHANGE, t.WORKERS_EXCHANGE), _prefix(t.WORKER_QUEUE_PREFIX)),
        "read": _either(_exact(t.CONTROL_EXCHANGE, t.AFFINITY_EXCHANGE), _prefix(t.MODEL_QUEUE_PREFIX),
                        _prefix(t.WORKER_QUEUE_PREFIX)),
    },
    # Operators and the autoscaler look at queue depths and consumers (passive declare needs no
    # permission) and listen to heartbeats through queues of their own, bound to the workers
    # exchange. The autoscaler announces itself there too (which models it starts workers for, so
    # that gateways let a cold model's requests wait): that is all it may publish. It can read
    # neither requests nor replies.
    "operator": {
        "configure": _prefix(t.OPERATOR_QUEUE_PREFIX),
        "write": _either(_exact(t.WORKERS_EXCHANGE), _prefix(t.OPERATOR_QUEUE_PREFIX)),
        "read": _either(_exact(t.WORKERS_EXCHANGE), _prefix(t.OPERATOR_QUEUE_PREFIX)),
    },
}
TAGS: dict[str, list[str]] = {"worker": [], "operator": ["monitoring"]}
DEFAULT_GATEWAY = "gateway"  # the deployment name (= broker user) when only one gateway is served
ROLES = ("worker", "operator")  # users besides the gateway deployments


def permissions_for(user: str, role: str) -> dict[str, str]:
    """The vhost permissions of a broker user: its role's, or a gateway deployment's own."""
    return gateway_permissions(user) if role == "gateway" else ROLE_PERMISSIONS[role]


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` format: base64(salt + sha256(salt + pw))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def new_password() -> str:
    """A random URL-safe password that never starts with "-": command-line tools (rabbitmqctl,
    chpasswd wrappers) would read one that does as an option."""
    while (password := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return password


@dataclass
class Definitions:
    """Inputs of the rendered document."""

    models: list[str]
    passwords: dict[str, str]  # user (role or gateway deployment name) -> password
    max_queue_length: int = t.DEFAULT_MAX_QUEUE_LENGTH
    gateways: list[str] = field(default_factory=lambda: [DEFAULT_GATEWAY])  # one broker user each
    vhost: str = t.VHOST
    extra_users: list[dict] = field(default_factory=list)
    # Broker user name of each role besides the gateways (default: the role's own name). Users
    # are global on a node, so stacks sharing one broker (``chatai dev --broker URL``) name theirs.
    role_users: dict[str, str] = field(default_factory=dict)

    def user_of(self, role: str) -> str:
        """The broker user that plays ``role`` (``worker`` or ``operator``)."""
        return self.role_users.get(role, role)

    def render(self) -> dict:
        for name in self.gateways:
            t.check_deployment_name(name)
        missing = ({self.user_of(r) for r in ROLES} | set(self.gateways)) - set(self.passwords)
        if missing:
            raise ValueError(f"no password for broker users: {', '.join(sorted(missing))}")
        v = self.vhost
        exchanges = [
            {"name": name, "vhost": v, "type": kind, "durable": True, "auto_delete": False,
             "internal": False, "arguments": {}}
            for name, kind in (
                (t.REQUESTS_EXCHANGE, "direct"),
                (t.REPLIES_EXCHANGE, "topic"),
                (t.CONTROL_EXCHANGE, "fanout"),
                (t.WORKERS_EXCHANGE, "fanout"),
                (t.AFFINITY_EXCHANGE, "headers"),
            )
        ]
        queues = [
            {"name": t.model_queue(m), "vhost": v, "durable": True, "auto_delete": False,
             "arguments": t.model_queue_arguments(self.max_queue_length)}
            for m in self.models
        ]
        bindings = [
            {"source": t.REQUESTS_EXCHANGE, "vhost": v, "destination": t.model_queue(m),
             "destination_type": "queue", "routing_key": m, "arguments": {}}
            for m in self.models
        ]
        roles = {**{g: "gateway" for g in self.gateways}, **{self.user_of(r): r for r in ROLES}}
        users = [
            {"name": user, "password_hash": hash_password(self.passwords[user]),
             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": TAGS.get(role, [])}
            for user, role in roles.items()
        ] + list(self.extra_users)
        permissions = [{"user": user, "vhost": v, **permissions_for(user, role)} for user, role in roles.items()]
        topic_permissions = [{"user": g, "vhost": v, **gateway_topic_permissions(g)} for g in self.gateways]
        return {
            "vhosts": [{"name": v}],
            "users": users,
            "permissions": permissions,
            "topic_permissions": topic_permissions,
            "exchanges": exchanges,
            "queues": queues,
            "bindings": bindings,
            "policies": [{"vhost": v, "name": t.AFFINITY_POLICY, "pattern": t.AFFINITY_QUEUE_PATTERN,
                          "apply-to": "queues", "priority": 0, "definition": t.affinity_policy()}],
        }

    def to_json(self) -> str:
        return json.dumps(self.render(), indent=2)


def load_or_create_passwords(path: Path, users: list[str] | tuple[str, ...] = (DEFAULT_GATEWAY, *ROLES)) -> dict[str, str]:
    """Passwords for the broker users, kept in a file only its owner can read."""
    if path.exists():
        passwords = json.loads(path.read_text())
    else:
        passwords = {}
    missing = [u for u in users if u not in passwords]
    if missing:
        passwords.update({u: new_password() for u in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(json.dumps(passwords, indent=2))
    return passwords

"""Which broker a ``chatai dev`` stack uses, and the names it owns there.

Why names per stack: RabbitMQ users are global to a node, and a vhost holds queues that outlive
their users (durable batch-results queues). Two stacks on one shared broker with the same names
would overwrite each other's passwords and answer each other's requests. So a stack on a shared
broker (``--broker amqp://HOST:PORT``) owns one vhost and three users whose names derive from
its state folder, touches nothing else (``guest`` stays, other vhosts keep their limits), and
deletes exactly those on stop. A stack with a private node (the default) owns the whole node and
uses the production names (vhost ``chatai``, users ``gateway``, ``worker``, ``operator``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from broker_config import topology as t

PRIVATE = "private"


@dataclass(frozen=True)
class BrokerTarget:
    """``--broker``: a private node of the stack's own, or a shared broker at host:port."""

    shared: bool
    host: str = "127.0.0.1"
    port: int = 5672

    @classmethod
    def parse(cls, value: str) -> "BrokerTarget":
        """``private`` or ``amqp://HOST[:PORT]`` (no user, password or vhost: the stack makes its
        own, and a password on the command line would show in ``ps``). ValueError otherwise."""
        value = value.strip()
        if value == PRIVATE:
            return cls(shared=False)
        try:
            parts = urlsplit(value)
            port = parts.port or 5672
        except ValueError:
            parts, port = None, 0
        if parts is None or parts.scheme != "amqp" or not parts.hostname:
            raise ValueError(f"--broker must be 'private' or a shared broker's amqp://HOST:PORT, not {value!r}")
        if parts.username or parts.password or parts.path.strip("/") or parts.query:
            raise ValueError("--broker amqp://HOST:PORT takes no user, password or vhost: the stack creates "
                             "a vhost and users of its own there")
        return cls(shared=True, host=parts.hostname, port=port)


@dataclass(frozen=True)
class StackNames:
    """The vhost and the broker users of one stack (the gateway user is its deployment name)."""

    vhost: str = t.VHOST
    gateway: str = "gateway"
    worker: str = "worker"
    operator: str = "operator"

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> "StackNames":
        """Names of their own for a stack on a shared broker: ``dev-<hash of the state folder>``,
        stable across restarts (a killed stack's leftovers are reused, then removed on stop)."""
        tag = "dev-" + hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
        return cls(vhost=f"chatai-{tag}", gateway=f"{tag}-gateway", worker=f"{tag}-worker",
                   operator=f"{tag}-operator")

    def users(self) -> dict[str, str]:
        """Role -> broker user."""
        return {"gateway": self.gateway, "worker": self.worker, "operator": self.operator}

    def url(self, role: str, password: str, host: str, port: int) -> str:
        return (f"amqp://{quote(self.users()[role], safe='')}:{quote(password, safe='')}@{host}:{port}/"
                f"{quote(self.vhost, safe='')}")

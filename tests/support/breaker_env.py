"""Helpers for circuit breaker tests: a private sshd and a gateway-like broker user of their own.

Tripping the breaker shuts a broker user out. The session's shared ``gateway`` user (and the
gateway process other tests use) must not be disturbed, so these tests trip a throw-away user
that has exactly a gateway deployment's permissions (``broker_config.definitions``): its own
namespace ``chatai.gw.<name>.`` and routing keys under it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from broker_config import topology
from broker_config.definitions import gateway_permissions, gateway_topic_permissions, new_password


@dataclass
class GatewayLikeUser:
    name: str
    password: str
    broker: object  # conftest.BrokerEnv

    def url(self, host: str | None = None, port: int | None = None) -> str:
        return (f"amqp://{self.name}:{self.password}@{host or self.broker.host}:{port or self.broker.port}"
                f"/{topology.VHOST}")

    def reply_queue(self, gateway_id: str) -> str:
        return topology.gateway_reply_queue(self.name, gateway_id)

    def delete(self) -> None:
        self.broker.admin._run("delete_user", self.name)


def add_gateway_like_user(broker) -> GatewayLikeUser:
    user = GatewayLikeUser(f"gw-cb-{secrets.token_hex(3)}", new_password(), broker)
    broker.admin._run("add_user", user.name, user.password)
    p = gateway_permissions(user.name)
    broker.admin.set_permissions(user.name, p["configure"], p["write"], p["read"])
    tp = gateway_topic_permissions(user.name)
    broker.admin.set_topic_permissions(user.name, tp["exchange"], tp["write"], tp["read"])
    return user

"""Helpers for circuit breaker tests: a private sshd and a gateway-like broker user of their own.

Tripping the breaker shuts a broker user out. The session's shared ``gateway`` user (and the
gateway process other tests use) must not be disturbed, so these tests trip a throw-away user
that has exactly the gateway's permissions (``broker_config.definitions.PERMISSIONS``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from broker_config import topology
from broker_config.definitions import PERMISSIONS, new_password


@dataclass
class GatewayLikeUser:
    name: str
    password: str
    broker: object  # conftest.BrokerEnv

    def url(self, host: str | None = None, port: int | None = None) -> str:
        return (f"amqp://{self.name}:{self.password}@{host or self.broker.host}:{port or self.broker.port}"
                f"/{topology.VHOST}")

    def delete(self) -> None:
        self.broker.admin._run("delete_user", self.name)


def add_gateway_like_user(broker) -> GatewayLikeUser:
    user = GatewayLikeUser(f"gw-cb-{secrets.token_hex(3)}", new_password(), broker)
    broker.admin._run("add_user", user.name, user.password)
    p = PERMISSIONS["gateway"]
    broker.admin.set_permissions(user.name, p["configure"], p["write"], p["read"])
    return user

"""``chatai broker apply``: bring a running broker to the definitions, and lock what they cannot.

The definitions document (``definitions.py``) declares what must exist. Three things it
cannot say are done here, each idempotent:

* the built-in ``guest`` user is deleted. ``loopback_users`` only keeps it to connections from
  the broker's own host, and the SSH tunnel's forward *arrives* from the broker's host, so
  ``guest:guest`` would be open to anyone who reaches the tunnel;
* the vhost gets limits (connections, queues), so no client can exhaust the node with them;
* every gateway deployment's user gets limits (connections, channels), so one deployment, even
  compromised, cannot take every connection the vhost allows and starve workers or others;
* an exchange of an older definitions document with another type (``chatai.replies`` was
  direct; topic permissions need a topic exchange) is replaced: an import keeps an existing
  exchange as it is, silently. Gateways are then disconnected so that they bind again.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker_config.admin import BrokerAdmin, BrokerAdminError
from broker_config.definitions import Definitions, gateway_topic_permissions
from broker_config.topology import AFFINITY_POLICY, AFFINITY_SPILL_MS

GUEST = "guest"


@dataclass
class Limits:
    max_connections: int = 1000  # vhost: gateways + workers + operator tools, all together
    # vhost: model queues, 2 per gateway process, 2 per worker (control; affinity, which outlives its
    # worker by the policy's expiry, 5 min), batch results
    max_queues: int = 2000
    gateway_max_connections: int = 16  # per gateway deployment (one per gateway process)
    gateway_max_channels: int = 64  # per gateway deployment, all its connections together

    def vhost(self) -> dict[str, int]:
        return {"max-connections": self.max_connections, "max-queues": self.max_queues}

    def gateway(self) -> dict[str, int]:
        return {"max-connections": self.gateway_max_connections, "max-channels": self.gateway_max_channels}


def apply(admin: BrokerAdmin, definitions: Definitions, limits: Limits | None = None,
          delete_guest: bool = True) -> list[str]:
    """Import the definitions and lock the broker down; returns one line per thing done.

    ``delete_guest=False`` leaves ``guest`` alone: for a broker shared with others (``chatai dev
    --broker URL``), whose users are not ours to change."""
    limits = limits or Limits()
    document = definitions.render()
    done = []
    existing = admin.exchange_types()
    replaced = [e["name"] for e in document["exchanges"] if existing.get(e["name"], e["type"]) != e["type"]]
    for name in replaced:
        admin.delete_exchange(name)
        done.append(f"replaced exchange {name} ({existing[name]} -> "
                    f"{next(e['type'] for e in document['exchanges'] if e['name'] == name)})")
    admin.import_definitions(document)
    if replaced:  # their bindings went with the old exchange: gateways re-bind when they reconnect
        for gateway in definitions.gateways:
            try:
                admin.close_user_connections(gateway, "chatai broker apply: exchanges replaced, reconnect")
            except BrokerAdminError:  # no connection to close is fine
                pass
    done += [f"definitions: vhost {definitions.vhost}, {len(definitions.models)} model queue(s), "
            f"gateway deployment(s): {', '.join(definitions.gateways)}, policy {AFFINITY_POLICY} (affinity "
            f"queues spill after {AFFINITY_SPILL_MS} ms)"]
    # Topic permissions are in the document too; set them explicitly as well (idempotent), so they
    # hold whatever an import does with ones that exist already.
    for gateway in definitions.gateways:
        p = gateway_topic_permissions(gateway)
        admin.set_topic_permissions(gateway, p["exchange"], p["write"], p["read"])
        admin.set_user_limits(gateway, limits.gateway())
    done.append(f"gateway user limits: {limits.gateway()}")
    if not delete_guest:
        done.append("left the 'guest' user as it is (a shared broker's users are not ours to change)")
    elif admin.delete_user(GUEST):
        done.append("deleted the built-in 'guest' user (the SSH tunnel reaches the broker from its own host, "
                    "so loopback_users does not protect it)")
    else:
        done.append("no 'guest' user to delete")
    admin.set_vhost_limits(limits.vhost())
    done.append(f"vhost {definitions.vhost} limits: {limits.vhost()}")
    return done

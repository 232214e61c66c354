"""Administrative actions on the broker, through ``rabbitmqctl`` on the broker's host.

Only cluster-side tools use this (definitions, the circuit breaker, operator status); the
gateway never holds admin rights. ``rabbitmqctl`` talks to the node over Erlang distribution,
so it needs the node name and the Erlang cookie of the user running it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

from broker_config import topology as t
from broker_config.timing import Backoff, retry


class BrokerAdminError(RuntimeError):
    pass


class _Unreachable(BrokerAdminError):
    """rabbitmqctl could not talk to the node (worth another try), as opposed to a refusal."""


# What rabbitmqctl says when it could not talk to the node (as opposed to the node refusing).
_UNREACHABLE = ("unable to perform an operation on node", "Erlang distribution failed", "nodedown",
                "timed out")


@dataclass
class BrokerAdmin:
    node: str | None = None  # e.g. rabbit@localhost; None: rabbitmqctl's default
    rabbitmqctl: str = "rabbitmqctl"
    vhost: str = t.VHOST
    timeout: float = 30.0
    attempts: int = 3
    prefix: tuple[str, ...] = ()  # e.g. ("docker", "exec", "-i", CONTAINER) for a broker in a container

    def _run(self, *args: str, stdin: str | None = None) -> str:
        """Run one rabbitmqctl command; every command used here is idempotent, so retry it.

        The CLI is an Erlang node of its own: on a loaded host its distribution handshake with
        the broker can fail or stall although the broker is fine. Such failures are retried;
        an answer from the broker itself (an error about the command) is not.
        """
        exe = self.rabbitmqctl if self.prefix else shutil.which(self.rabbitmqctl) or self.rabbitmqctl
        cmd = [*self.prefix, exe, "-q"] + (["-n", self.node] if self.node else []) + list(args)

        def once() -> str:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, input=stdin)
            except subprocess.TimeoutExpired:
                raise _Unreachable(f"rabbitmqctl {args[0]} timed out {self.attempts} times") from None
            if proc.returncode == 0:
                return proc.stdout
            message = proc.stderr.strip() or proc.stdout.strip()
            error = _Unreachable if any(m in message for m in _UNREACHABLE) else BrokerAdminError
            raise error(f"rabbitmqctl {args[0]} failed: {message}")

        return retry(once, Backoff.fixed(1.0), attempts=self.attempts, retry_on=(_Unreachable,))

    def import_definitions(self, document: dict) -> None:
        # Through standard input: the document holds password hashes, and Debian's rabbitmqctl
        # runs as the rabbitmq user, which could not read a private temporary file.
        self._run("import_definitions", "--format", "json", stdin=json.dumps(document))

    def set_permissions(self, user: str, configure: str, write: str, read: str) -> None:
        self._run("set_permissions", "-p", self.vhost, user, configure, write, read)

    def set_topic_permissions(self, user: str, exchange: str, write: str, read: str) -> None:
        self._run("set_topic_permissions", "-p", self.vhost, user, exchange, write, read)

    def list_users(self) -> list[str]:
        out = self._run("list_users", "--formatter", "json")
        return [u["user"] for u in json.loads(out or "[]")]

    def delete_user(self, user: str) -> bool:
        """Delete a user if it exists (closing its connections); whether there was one."""
        if user not in self.list_users():
            return False
        self._run("delete_user", user)
        return True

    def list_vhosts(self) -> list[str]:
        out = self._run("list_vhosts", "name", "--formatter", "json")
        return [v["name"] for v in json.loads(out or "[]")]

    def delete_vhost(self, vhost: str) -> bool:
        """Delete a vhost with everything in it (queues, exchanges, permissions), if it exists."""
        if vhost not in self.list_vhosts():
            return False
        self._run("delete_vhost", vhost)
        return True

    def exchange_types(self) -> dict[str, str]:
        out = self._run("list_exchanges", "-p", self.vhost, "name", "type", "--formatter", "json")
        return {e["name"]: e["type"] for e in json.loads(out or "[]")}

    def delete_exchange(self, name: str) -> None:
        """rabbitmqctl has no delete_exchange (rabbitmqadmin needs the management plugin)."""
        def binary(text: str) -> str:
            return "<<" + ",".join(str(b) for b in text.encode()) + ">>"

        self._run("eval", f"rabbit_exchange:delete(rabbit_misc:r({binary(self.vhost)}, exchange, {binary(name)}), "
                          f"false, <<\"chatai\">>).")

    def set_vhost_limits(self, limits: dict[str, int]) -> None:
        self._run("set_vhost_limits", "-p", self.vhost, json.dumps(limits))

    def vhost_limits(self) -> dict[str, int]:
        return json.loads(self._run("list_vhost_limits", "-p", self.vhost).strip() or "{}")

    def set_user_limits(self, user: str, limits: dict[str, int]) -> None:
        self._run("set_user_limits", user, json.dumps(limits))

    def clear_permissions(self, user: str) -> None:
        self._run("clear_permissions", "-p", self.vhost, user)

    def close_user_connections(self, user: str, reason: str) -> None:
        self._run("close_all_user_connections", user, reason)

    def list_queues(self) -> list[dict]:
        """Depth and consumers of every queue in the vhost."""
        out = self._run("list_queues", "-p", self.vhost, "name", "messages", "messages_ready",
                        "messages_unacknowledged", "consumers", "--formatter", "json")
        return json.loads(out or "[]")

    def list_user_connections(self, user: str) -> list[dict]:
        out = self._run("list_connections", "user", "name", "--formatter", "json")
        return [c for c in json.loads(out or "[]") if c.get("user") == user]

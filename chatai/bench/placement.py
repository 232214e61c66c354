"""Where a benchmark's processes run: the shape of a deployment, or everything on every core.

In a deployment the engine has a GPU node to itself, and everything else (the users' clients,
the gateway VM, the login node's sshd, RabbitMQ) runs on other machines. On one machine
``deployment`` placement stands that up with CPU affinity: the "GPU node" (vLLM's server, or
chatai's worker with its engine processes) gets the upper half of this process's CPUs, and
everything else the lower half. Both paths get the same split, so their comparison is fair.
``shared`` lets every process use every CPU, as ``chatai dev`` runs on a laptop.

Affinity is inherited by threads and children, and vLLM's CPU backend binds its OpenMP threads
only within the CPUs it is allowed (``sched_getaffinity``), so one ``taskset`` for the node's
command and one ``sched_setaffinity`` for this process cover every process either side starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

PlacementName = Literal["deployment", "shared"]


def cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class Placement:
    name: PlacementName
    node: frozenset[int]  # the "GPU node": the engine's server or worker
    rest: frozenset[int]  # client, gateway, sshd, broker, database

    @classmethod
    def choose(cls, name: PlacementName, cpus: set[int] | None = None) -> "Placement":
        allowed = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        if name == "shared":
            return cls(name, frozenset(allowed), frozenset(allowed))
        if len(allowed) < 2:
            raise ValueError(f"deployment placement needs 2 or more CPUs (this process may use {len(allowed)}); "
                             "use --placement shared")
        half = len(allowed) // 2
        return cls(name, frozenset(allowed[half:]), frozenset(allowed[:half]))

    def node_command(self, argv: list[str]) -> list[str]:
        """``argv`` pinned to the node's CPUs (unchanged when shared)."""
        if self.name == "shared":
            return argv
        return ["taskset", "--cpu-list", cpu_list(self.node), *argv]

    @contextmanager
    def elsewhere(self) -> Iterator[None]:
        """This process (and every process it starts meanwhile) on the CPUs off the node."""
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.rest)
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)

    def describe(self) -> dict:
        return {"placement": self.name, "node_cpus": cpu_list(self.node), "other_cpus": cpu_list(self.rest)}

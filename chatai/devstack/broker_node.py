"""A private RabbitMQ node for development and tests, started from ``broker_config/rabbitmq.conf``.

It runs as its own Erlang node on free ports with its data under a directory of its own, so it
neither needs nor disturbs a system broker.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import broker_config
from chatai.devstack.processes import free_port, wait_until

CONF_TEMPLATE = Path(broker_config.__file__).with_name("rabbitmq.conf")


def rabbitmq_installed() -> bool:
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


@dataclass
class LocalBrokerNode:
    base_dir: Path
    port: int
    node: str

    @classmethod
    def create(cls, name: str = "chatai") -> "LocalBrokerNode":
        """A node with its data in a fresh directory that the broker's own user can write.

        Debian's ``rabbitmq-server`` and ``rabbitmqctl`` switch from root to the ``rabbitmq``
        user, so the directory must be reachable by it (pytest's temporary dirs are not).
        """
        port = free_port()
        base_dir = Path(tempfile.mkdtemp(prefix=f"chatai-rabbit-{port}-"))
        base_dir.chmod(0o755)
        return cls(base_dir=base_dir, port=port, node=f"{name}-{port}@localhost")

    def _env(self) -> dict[str, str]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        conf = self.base_dir / "rabbitmq.conf"
        text = CONF_TEMPLATE.read_text().replace(
            "listeners.tcp.default = 5672", f"listeners.tcp.1 = 127.0.0.1:{self.port}"
        )
        conf.write_text(text)
        plugins = self.base_dir / "enabled_plugins"
        plugins.write_text("[].\n")
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("rabbitmq")
            except KeyError:
                owner = None
            if owner is not None:
                for path in [self.base_dir, *self.base_dir.rglob("*")]:
                    os.chown(path, owner.pw_uid, owner.pw_gid)
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_CONFIG_FILE=str(conf),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base_dir / "log"),
            RABBITMQ_PID_FILE=str(self.base_dir / "rabbit.pid"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),
        )
        return env

    def start(self, timeout: float = 60.0) -> None:
        env = self._env()
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # await_startup answers "unavailable" until the node has registered with epmd: poll it.
        last = ""

        def started() -> bool:
            nonlocal last
            probe = subprocess.run(["rabbitmqctl", "-n", self.node, "--timeout", "10", "await_startup"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            last = probe.stderr.strip()[-500:]
            return probe.returncode == 0

        try:
            wait_until(started, timeout, f"RabbitMQ node {self.node} to start", every=0.5)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}: {last}") from None

    def stop(self, remove: bool = True) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.node, "stop"], env=self._env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)

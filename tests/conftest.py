"""Shared fixtures: a real RabbitMQ broker with the project's definitions applied.

The broker comes from, in order: ``RABBITMQ_URL`` plus ``RABBITMQ_NODE`` (an existing broker
we may administer with rabbitmqctl), a private ``rabbitmq-server`` node (``chatai.devstack``'s,
from ``broker_config/rabbitmq.conf``) on free ports, or a RabbitMQ container where a Docker engine
exists. Every process and daemon the fixtures start comes from ``chatai/devstack/``, as for
``chatai dev``; ``tests/support/`` adds only what is test-specific.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker_config import topology
from broker_config.admin import BrokerAdmin
from broker_config.definitions import DEFAULT_GATEWAY, ROLES, Definitions, new_password
from broker_config.provision import Limits
from broker_config.provision import apply as apply_definitions
from chatai.devstack.broker_node import LocalBrokerNode, rabbitmq_installed

# The fast tier (`pytest -m "not slow"`, no root, well under a minute) is every test that needs
# none of these: a real broker, sshd, Slurm or vLLM engine (each reached through one of them).
SLOW_FIXTURES = {"broker", "tiny_model_dir", "sshd", "gw_user", "postgres"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
            # Under pytest-xdist (`--dist loadgroup`: CHATAI_TEST_PROCESSES for scripts/test.sh) a
            # file's slow tests stay in one process: its module fixtures (an sshd, a Slurm cluster,
            # own workers) start once, and files run side by side, each process with its own broker.
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


# Models the test broker knows: one served by the test worker, one that no worker ever serves.
SERVED_MODEL = "tiny"
UNSERVED_MODEL = "unserved"


@dataclass
class BrokerEnv:
    """A running broker with the chatai definitions applied and a password for every role."""

    host: str
    port: int
    admin: BrokerAdmin
    passwords: dict[str, str] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    log_dir: Path | None = None  # the broker's own logs, when the tests started the node

    def url(self, role: str) -> str:
        return f"amqp://{role}:{self.passwords[role]}@{self.host}:{self.port}/{topology.VHOST}"

    def apply(self, models: list[str]) -> None:
        """(Re)apply the definitions, adding these models (as ``chatai broker apply`` does)."""
        self.models = sorted(set(self.models) | set(models))
        # Generous per-deployment limits: many test clients share the session's gateway user.
        apply_definitions(self.admin, Definitions(models=self.models, passwords=self.passwords),
                          Limits(gateway_max_connections=256, gateway_max_channels=4096))


@pytest.fixture(scope="session")
def broker() -> BrokerEnv:
    passwords = {user: new_password() for user in (DEFAULT_GATEWAY, *ROLES)}
    node: LocalBrokerNode | None = None
    container = None
    if os.environ.get("RABBITMQ_URL"):
        parts = urlsplit(os.environ["RABBITMQ_URL"])
        env = BrokerEnv(parts.hostname or "127.0.0.1", parts.port or 5672,
                        BrokerAdmin(node=os.environ.get("RABBITMQ_NODE")), passwords)
    elif rabbitmq_installed():
        node = LocalBrokerNode.create(name="chatai-test")
        node.start()
        env = BrokerEnv("127.0.0.1", node.port, BrokerAdmin(node=node.node), passwords,
                        log_dir=node.base_dir / "log")
    else:  # pragma: no cover - only where a Docker engine exists
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13").start()
        env = BrokerEnv(container.get_container_host_ip(), int(container.get_exposed_port(5672)),
                        BrokerAdmin(prefix=("docker", "exec", "-i", container.get_wrapped_container().id)),
                        passwords)
    env.apply([SERVED_MODEL, UNSERVED_MODEL])
    yield env
    if node is not None:
        node.stop()
    if container is not None:  # pragma: no cover
        container.stop()


# ---------------------------------------------------------------- shared state (real PostgreSQL)


class PostgresEnv:
    """A PostgreSQL server for the session; ``new_database()`` gives each test an empty one."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    def new_database(self) -> str:
        from chatai.devstack.postgres_node import create_database

        return create_database(self.admin_url)


@pytest.fixture(scope="session")
def postgres() -> PostgresEnv:
    """A private cluster (``chatai.devstack.postgres_node``: initdb/pg_ctl under a temporary
    directory, a free port; about a second), or a container where only a Docker engine exists."""
    from chatai.devstack.postgres_node import LocalPostgres, postgres_installed

    if postgres_installed():
        node = LocalPostgres.create(durable=False)
        try:
            node.start()
            yield PostgresEnv(node.url())
        finally:
            node.stop()
    else:  # pragma: no cover - only where a Docker engine exists
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as container:
            yield PostgresEnv(container.get_connection_url())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty gateway database on each engine (``CHATAI_GATEWAY_DATABASE_URL``): store tests
    take this fixture to run against both; the PostgreSQL half is in the slow tier."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    return request.getfixturevalue("postgres").new_database()


# ---------------------------------------------------------------- the worker side (real vLLM)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random Llama (real tokenizer and chat template), built once per session."""
    from chatai.devstack.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny", seed=0)


# A fine-tuned variant of SERVED_MODEL: a LoRA adapter the session worker serves beside it.
SERVED_ADAPTER = "tiny-lora"


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA adapter for the tiny model, in PEFT's layout."""
    from chatai.devstack.tiny_model import make_tiny_lora

    return make_tiny_lora(tmp_path_factory.mktemp("tiny-lora") / SERVED_ADAPTER, tiny_model_dir)


@pytest.fixture(scope="session")
def served_worker(broker: BrokerEnv, tiny_model_dir, tiny_lora_dir, tmp_path_factory: pytest.TempPathFactory):
    """One real worker process (vLLM CPU engine) serving SERVED_MODEL for the whole session,
    with the LoRA adapter SERVED_ADAPTER beside it.

    ``.proc`` (Popen), ``.model``, ``.log_path``, ``.log_text()``, ``.worker_id``; stopped with SIGTERM at the end.
    Tests that kill, drain or idle a worker start their own with ``support.worker_proc``.
    """
    from support.worker_proc import start_worker

    log_path = tmp_path_factory.mktemp("worker-logs") / "served-worker.log"
    worker = start_worker(tiny_model_dir, SERVED_MODEL, broker.url("worker"), log_path,
                          worker_id=f"served-worker-{os.getpid()}", max_num_seqs=16, max_model_len=512,
                          heartbeat_interval=1.0,
                          # vLLM's serving options, as an operator sets them for a Hermes-style model.
                          extra_args=["--coalesce-ms", "20", "--coalesce-tokens", "16",
                                      "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                                      "--lora-modules", f"{SERVED_ADAPTER}={tiny_lora_dir}", "--max-lora-rank", "8"],
                          # Any other vLLM serve argument passes through. Random weights can pad a
                          # JSON answer with whitespace for ever; a real model does not.
                          env={"CHATAI_WORKER_VLLM_ARGS":
                               '--structured-outputs-config \'{"backend": "xgrammar", "disable_any_whitespace": true}\''})
    try:
        worker.wait_ready()
    except BaseException:
        worker.kill()
        raise
    yield worker
    worker.stop(timeout=60)


# ---------------------------------------------------------------- the gateway (real process)


@pytest.fixture(scope="session")
def gateway(broker: BrokerEnv, served_worker, tmp_path_factory: pytest.TempPathFactory):
    """A ``chatai gateway`` process connected straight to the test broker, with an API key.

    ``.client()`` / ``.async_client()`` give official OpenAI SDK clients; ``.health()``,
    ``.wait_for(predicate)``; it is serving SERVED_MODEL when handed out.
    """
    from support.gateway import gateway_serving

    with gateway_serving(tmp_path_factory.mktemp("gateway"), broker.url("gateway"), SERVED_MODEL,
                         env={"CHATAI_GATEWAY_QUEUE_TIMEOUT": "30"}) as gw:
        yield gw


# ---------------------------------------------------------------- the login node (real sshd + breaker)


@pytest.fixture(scope="module")
def gw_user(broker: BrokerEnv):
    """A broker user with the gateway's permissions, for a module's breaker to shut out.

    The session's own ``gateway`` user stays untouched, so other suites are not disturbed.
    """
    from support.breaker_env import add_gateway_like_user

    user = add_gateway_like_user(broker)
    yield user
    user.delete()


@pytest.fixture(scope="module")
def sshd(broker: BrokerEnv, gw_user, tmp_path_factory: pytest.TempPathFactory):
    """A private OpenSSH sshd with the real breaker configuration; the tunnel may reach only the broker."""
    import pwd

    from chatai.devstack.sshd import start_local_sshd

    s = start_local_sshd(tmp_path_factory.mktemp("sshd"), broker.host, broker.port, rabbit_node=broker.admin.node,
                         broker_user=gw_user.name)
    yield s
    s.stop()
    assert not Path(s.base_dir).exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(s.user)  # the throw-away tunnel account is gone


@pytest.fixture
def breaker(sshd, broker):
    """The module's circuit breaker (``circuit_breaker.breaker.Breaker``), closed before and after."""
    b = sshd.breaker(admin=broker.admin)
    b.reset(by="test")
    yield b
    b.reset(by="test")

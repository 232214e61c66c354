"""``chatai dev``: the whole stack on one machine, as a developer or a demo needs it.

Broker (a private RabbitMQ node started from ``broker_config/``, or with ``--broker URL`` a
shared one where the stack owns a vhost and users of its own, see ``broker_names``), the
definitions, a worker on the tiny model (or ``--model``), and the gateway, each a child
process with its log under ``STATE_DIR/logs``. ``STATE_DIR/stack.json`` tells tests and tools
where everything is. Ctrl-C or SIGTERM stops all of it, workers first so they drain.

The API key comes from ``CHATAI_DEV_API_KEY`` or a file, not from the command line: a process's
arguments are readable by every local user (``ps``, ``/proc/<pid>/cmdline``), its environment
only by its owner. The variable is removed from the environment the children inherit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from chatai import discovery
from broker_config.admin import BrokerAdmin, BrokerAdminError
from broker_config.definitions import load_or_create_passwords
from broker_config.definitions import Definitions
from broker_config.provision import apply as apply_definitions
from chatai.devstack.broker_names import BrokerTarget, StackNames
from chatai.devstack.broker_node import LocalBrokerNode, rabbitmq_installed
from chatai.devstack.processes import Child, ChildExited, start_gateway, start_worker, wait_until
from gateway import private
from gateway.keys import KeyStore


API_KEY_ENV = "CHATAI_DEV_API_KEY"
MIN_KEY_LENGTH = 16  # gateway.keys.KeyStore refuses shorter keys


class DevError(RuntimeError):
    pass


def resolve_api_key(flag: str | None = None, file: Path | None = None) -> str | None:
    """The key to accept: ``file``, else ``$CHATAI_DEV_API_KEY``, else the deprecated ``--api-key``
    (with a warning), else None (a key is generated). Checked before anything starts."""
    env_key = os.environ.pop(API_KEY_ENV, None)  # children never inherit it
    if flag is not None:
        print("chatai dev: warning: --api-key is deprecated: the key is visible to every local user in ps "
              f"and /proc/<pid>/cmdline. Set {API_KEY_ENV} or use --api-key-file instead.",
              file=sys.stderr, flush=True)
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except OSError as exc:
            raise DevError(f"cannot read the API key file {file}: {exc.strerror}") from None
        key = lines[0].strip() if lines else ""
        source = str(file)
    elif env_key:
        key, source = env_key.strip(), API_KEY_ENV
    elif flag is not None:
        key, source = flag.strip(), "--api-key"
    else:
        return None
    if len(key) < MIN_KEY_LENGTH:
        raise DevError(f"the API key from {source} must be at least {MIN_KEY_LENGTH} characters long")
    return key


def _say(msg: str) -> None:
    print(f"chatai dev: {msg}", flush=True)


@dataclass
class DevStack:
    state_dir: Path
    port: int
    api_key: str | None = None
    model: Path | None = None
    served_model_name: str = "tiny"
    broker: str = "private"  # private, or a shared broker's amqp://HOST:PORT
    broker_node: str | None = None  # rabbitmqctl -n for a shared broker (None: rabbitmqctl's default)
    tunnel: bool | None = None  # None: through a local sshd with the real breaker when one can run
    slurm: bool = False  # start the worker as a job array of a private single-node Slurm
    slurm_cpus: int = 8  # CPUs that Slurm node declares (config_overrides): each worker asks for one
    worker_args: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)  # extra CHATAI_WORKER_* settings
    worker_cpus: str | None = None  # pin the worker (and its engine) to these CPUs ("1", "2,3"): a node of its own
    workers: int = 1  # workers pulling the model's one queue (not with slurm: `chatai scale up` there)
    key_limits: dict[str, int | None] = field(default_factory=dict)  # the generated key's own limits
    ready_timeout: float = 300.0
    # Gateway processes (``chatai gateway --replicas``); more than one share a private PostgreSQL.
    gateway_replicas: int = 1

    processes: dict[str, Child] = field(default_factory=dict, init=False)
    node: LocalBrokerNode | None = field(default=None, init=False)
    sshd: object | None = field(default=None, init=False)  # chatai.devstack.sshd.LocalSshd
    dev_slurm: object | None = field(default=None, init=False)  # chatai.devstack.dev_slurm.DevSlurm
    postgres: object | None = field(default=None, init=False)  # chatai.devstack.postgres_node.LocalPostgres
    _watch_stop: threading.Event = field(default_factory=threading.Event, init=False)
    _admin: BrokerAdmin | None = field(default=None, init=False)
    broker_host: str = field(default="127.0.0.1", init=False)
    broker_port: int = field(default=5672, init=False)
    names: StackNames = field(default_factory=StackNames, init=False)
    _shared_admin: BrokerAdmin | None = field(default=None, init=False)  # set once our names exist there
    extra: dict[str, object] = field(default_factory=dict, init=False)

    # ------------------------------------------------------------------ pieces

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def _start_broker(self) -> BrokerAdmin:
        """A private node (the stack owns all of it), or a shared broker administered through
        rabbitmqctl, where the stack gets a vhost and users named after its state folder."""
        target = BrokerTarget.parse(self.broker)
        if target.shared:
            self.names = StackNames.for_state_dir(self.state_dir)
            self.broker_host, self.broker_port = target.host, target.port
            admin = BrokerAdmin(node=self.broker_node, vhost=self.names.vhost, timeout=15, attempts=1)
            try:
                admin.list_vhosts()  # can we administer it?
            except (BrokerAdminError, OSError, subprocess.TimeoutExpired) as exc:
                raise DevError(f"cannot administer the broker at {target.host}:{target.port} with rabbitmqctl "
                               f"(node {self.broker_node or 'rabbitmqctl default'}; --broker-node NAME): {exc}") from None
            _say(f"using the shared RabbitMQ at {target.host}:{target.port}: vhost {self.names.vhost}, users "
                 f"{', '.join(self.names.users().values())} (removed on stop; nothing else is changed)")
            return BrokerAdmin(node=self.broker_node, vhost=self.names.vhost)
        if not rabbitmq_installed():
            raise DevError("rabbitmq-server is not installed (apt-get install rabbitmq-server), "
                           "or give a shared broker with --broker amqp://HOST:PORT")
        self.node = LocalBrokerNode.create(name="chatai-dev")
        _say(f"starting a private RabbitMQ node {self.node.node} on port {self.node.port}")
        self.node.start()
        self.broker_port = self.node.port
        return BrokerAdmin(node=self.node.node)

    def _remove_shared_names(self) -> None:
        """On a shared broker: delete this stack's vhost (its queues go with it) and its users."""
        admin = self._shared_admin
        if admin is None:
            return
        self._shared_admin = None
        try:
            admin.delete_vhost(self.names.vhost)
            for user in self.names.users().values():
                admin.delete_user(user)
            _say(f"removed vhost {self.names.vhost} and this stack's users from the shared broker")
        except (BrokerAdminError, OSError, subprocess.TimeoutExpired) as exc:
            _say(f"warning: could not remove vhost {self.names.vhost} and users from the shared broker: {exc}")

    def _model_dir(self) -> Path:
        if self.model is not None:
            return self.model
        tiny = self.state_dir / "tiny-model"
        if not (tiny / "config.json").exists():
            _say("writing the tiny test model")
            subprocess.run([sys.executable, "-m", "chatai.cli", "make-tiny-model", str(tiny)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return tiny

    def _start_tunnel_end(self) -> dict[str, str]:
        """The login node's side, here: a private sshd with the breaker; the gateway's tunnel settings."""
        from chatai.devstack.sshd import sshd_available, start_local_sshd

        if self.tunnel is None:
            self.tunnel = sshd_available()
        if not self.tunnel:
            _say("no local sshd (needs root and openssh-server): the gateway connects to the broker directly")
            return {}
        sshd = start_local_sshd(self.state_dir / "tunnel", self.broker_host, self.broker_port,
                                rabbit_node=self.node.node if self.node else self.broker_node,
                                broker_user=self.names.gateway, vhost=self.names.vhost)
        self.sshd = sshd
        # The breaker's enforcer: on a trip it shuts the gateway's broker user out, on reset lets it in.
        watcher = threading.Thread(target=sshd.breaker(self._admin).watch, kwargs={"stop": self._watch_stop},
                                   name="breaker-watch", daemon=True)
        watcher.start()
        self.extra["tunnel"] = {"host": sshd.host, "port": sshd.port, "user": sshd.user,
                                "key_path": str(sshd.client_key_path),
                                "known_hosts": str(sshd.known_hosts_path),
                                "breaker_config": str(sshd.config_path)}
        _say(f"tunnel endpoint: {sshd.user}@{sshd.host}:{sshd.port} (circuit breaker armed)")
        return sshd.gateway_env()

    def _submit_slurm_worker(self, model_dir: Path, worker_url: str) -> None:
        """The worker as an operator runs it: ``chatai scale up`` against a private Slurm here."""
        from chatai.devstack.dev_slurm import start_dev_slurm

        self.dev_slurm = start_dev_slurm(self.state_dir, cpus=self.slurm_cpus)
        job_id = self.dev_slurm.scale_up(self.served_model_name, model_dir, worker_url, workers=1,
                                         worker_args=self.worker_args)
        self.extra["slurm"] = {"job_id": job_id, **self.dev_slurm.env,
                               "worker_logs": str(self.dev_slurm.state_dir / "logs")}
        _say(f"submitted worker array job {job_id} to a private Slurm "
             f"(SLURM_CONF={self.dev_slurm.env.get('SLURM_CONF')})")

    def _gateway_database(self) -> tuple[dict[str, str], list[str]]:
        """For several gateway replicas: a private PostgreSQL they share (its URL in their
        environment, never on a command line) and ``--replicas``; nothing for one gateway."""
        if self.gateway_replicas <= 1:
            return {}, []
        from chatai.devstack.postgres_node import LocalPostgres

        self.postgres = LocalPostgres.create()
        self.postgres.start()
        _say(f"gateway: {self.gateway_replicas} replicas sharing a private PostgreSQL on port {self.postgres.port}")
        return ({"CHATAI_GATEWAY_DATABASE_URL": self.postgres.new_database("chatai")},
                ["--replicas", str(self.gateway_replicas)])

    def broker_url(self, role: str, passwords: dict[str, str]) -> str:
        return self.names.url(role, passwords[self.names.users()[role]], self.broker_host, self.broker_port)

    # ------------------------------------------------------------------ whole stack

    def start(self) -> dict:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        other = discovery.stack_in(self.state_dir)
        if other is not None:
            raise DevError(f"a chatai dev stack already runs with the state folder {self.state_dir}: "
                           "give this one another --state-dir")
        self.logs.mkdir(exist_ok=True)
        admin = self._admin = self._start_broker()
        users = self.names.users()
        passwords = load_or_create_passwords(self.state_dir / "broker-secrets.json", tuple(users.values()))
        shared = self.node is None
        if shared:
            self._shared_admin = admin  # from here on, stop() removes what the import creates
        definitions = Definitions(models=[self.served_model_name], passwords=passwords, gateways=[users["gateway"]],
                                  vhost=self.names.vhost,
                                  role_users={"worker": users["worker"], "operator": users["operator"]})
        for line in apply_definitions(admin, definitions, delete_guest=not shared):
            _say(f"broker: {line}")

        gw_state = self.state_dir / "gateway"
        gateway_env, gateway_args = self._gateway_database()
        keys = KeyStore(gateway_env.get("CHATAI_GATEWAY_DATABASE_URL") or private.database(gw_state))
        if self.api_key:
            keys.ensure("dev", self.api_key)
        else:
            self.api_key = keys.create("dev", limits=self.key_limits)[1]
        keys.close()

        model_dir = self._model_dir()
        if self.slurm:
            self._submit_slurm_worker(model_dir, self.broker_url("worker", passwords))
        else:
            for i in range(self.workers):
                name = "worker" if i == 0 else f"worker-{i + 1}"
                self.processes[name] = start_worker(model_dir, self.served_model_name,
                                                   self.broker_url("worker", passwords), self.logs / f"{name}.log",
                                                   args=self.worker_args, env=self.worker_env, name=name,
                                                   cpus=self.worker_cpus)
        tunnel_env = self._start_tunnel_end()
        self.processes["gateway"] = start_gateway(gw_state, self.port, self.broker_url("gateway", passwords),
                                                  self.logs / "gateway.log",
                                                  args=[*gateway_args, *([] if tunnel_env else ["--broker-direct"])],
                                                  env={**tunnel_env, **gateway_env})
        info = {
            "gateway_url": f"http://127.0.0.1:{self.port}/v1",
            "api_key": self.api_key,
            "model": self.served_model_name,
            "model_path": str(Path(model_dir).resolve()),
            "broker_url": self.broker_url("gateway", passwords),
            "broker_node": self.node.node if self.node else self.broker_node,
            "broker_shared": self.node is None,
            "broker_vhost": self.names.vhost,
            "broker_users": self.names.users(),
            "pids": {name: c.pid for name, c in self.processes.items()},
            "dev_pid": os.getpid(),
            "logs": str(self.logs),
            **self.extra,
        }
        stack = self.state_dir / "stack.json"
        stack.touch(mode=0o600, exist_ok=True)
        stack.chmod(0o600)  # it holds the API key and broker credentials
        stack.write_text(json.dumps(info, indent=2))
        discovery.publish(stack)  # operator commands (chatai status, scale, breaker) find it
        return info

    def serving(self) -> bool:
        """True once the gateway's /health says the workers are ready for the served model (a
        worker, for a Slurm job that may still wait for its node)."""
        try:
            body = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        ready = body.get("models", {}).get(self.served_model_name, {}).get("ready") or 0
        return ready >= (1 if self.slurm else self.workers)

    def wait_until_serving(self) -> None:
        try:
            wait_until(self.serving, self.ready_timeout, f"the stack to serve '{self.served_model_name}'", every=0.5,
                       check=self.check_children)
        except TimeoutError as exc:
            raise DevError(f"{exc}; see the logs in {self.logs}") from None

    def check_children(self) -> None:
        for child in self.processes.values():
            try:
                child.check()
            except ChildExited:
                raise DevError(f"the {child.name} exited with code {child.proc.returncode}; "
                               f"see {child.log_path}") from None

    def demo(self) -> None:
        """Stream one answer through the whole stack with the official SDK: the proof it serves."""
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=self.api_key, max_retries=0)
        stream = client.chat.completions.create(
            model=self.served_model_name, stream=True, max_tokens=24,
            messages=[{"role": "user", "content": "Say hello to the cluster."}])
        print("chatai dev: streamed answer: ", end="", flush=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(flush=True)

    def stop(self) -> None:
        discovery.withdraw(self.state_dir / "stack.json")
        # Workers first (SIGTERM: they drain and give requests back), then the rest.
        if self.dev_slurm is not None:
            self.dev_slurm.stop()
        order = sorted(self.processes.values(), key=lambda c: 0 if c.name.startswith("worker") else 1)
        for child in order:
            child.signal(signal.SIGTERM)
        for child in order:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            child.kill()  # what did not stop, and anything it left behind in its session
        self._watch_stop.set()
        if self.sshd is not None:
            self.sshd.stop()
        self._remove_shared_names()
        if self.node is not None:
            self.node.stop()
        if self.postgres is not None:
            self.postgres.stop()


def run(stack: DevStack, demo: bool = True) -> int:
    """Start, prove, serve until a signal, stop. Returns the exit code."""
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        info = stack.start()
        stack.wait_until_serving()
        if demo:
            stack.demo()
        _say(f"ready: {info['gateway_url']} model={stack.served_model_name} state={stack.state_dir / 'stack.json'}")
        while True:
            stack.check_children()
            time.sleep(1)
    except KeyboardInterrupt:
        _say("stopping")
    except DevError as exc:
        _say(f"error: {exc}")
        code = 1
    finally:
        stack.stop()
        _say("stopped")
    return code

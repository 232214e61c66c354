"""docker-compose.yml, checked without a Docker engine (none runs on these machines).

What is checked: the file is valid against the compose specification's JSON schema (the copy
that ships with check-jsonschema); every service is built from a stage of a Dockerfile in this
repository, but PostgreSQL and HAProxy (their official images, pinned); every command,
Dockerfile CMD and entrypoint script line that runs ``chatai`` names an existing subcommand
with options it accepts; every bind-mounted file and entrypoint exists;
every CHATAI_* variable is a field of the component's settings class; ports, hosts and the
served model agree with broker_config/rabbitmq.conf, the breaker's install options and each other;
the gateway replicas are identical and the load balancer (docker/haproxy.cfg) reaches each.
What is not checked: that the images build and the stack runs (that needs a Docker engine).
"""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml

from chatai.cli import app as chatai_app
from gateway.batches.config import BatchSettings
from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
SCRIPT_DIR_IN_IMAGE = "/usr/local/lib/chatai-docker/"
# Services run from an official image rather than built here: the image each must use.
OFFICIAL_IMAGES = {"db": "postgres", "lb": "haproxy"}
GATEWAYS = ("gateway", "gateway-2")


def _schema_validator() -> jsonschema.protocols.Validator:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(text)
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_file_is_valid_against_the_compose_schema():
    validator = _schema_validator()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert not errors, errors
    # The schema is strict enough to catch mistakes (so the check above means something).
    broken = {"services": {"gateway": {"build": {"context": "."}, "ports": "8000", "depends_on": {"x": {"condition": "soon"}},
                                       "healthcheck": {"test": ["CMD"], "interval": 5}}}}
    assert len(list(validator.iter_errors(broken))) >= 2


def _dockerfile_stages(dockerfile: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", dockerfile.read_text(), re.M | re.I))


def test_every_image_is_built_from_a_dockerfile_in_the_repository():
    for name, image in OFFICIAL_IMAGES.items():
        repo, _, tag = SERVICES[name]["image"].partition(":")
        assert repo == image and tag[:1].isdigit(), f"{name}: not the official {image} image with a pinned version"
        assert "build" not in SERVICES[name]
    for name, svc in SERVICES.items():
        if name in OFFICIAL_IMAGES:
            continue
        assert "build" in svc, f"{name}: no build section (an image from elsewhere)"
        build = svc["build"]
        context = (ROOT / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        assert build["target"] in _dockerfile_stages(dockerfile), f"{name}: no stage {build['target']!r}"
        assert "image" not in svc or "build" in svc


class BadCommand(AssertionError):
    """An argv that the chatai CLI would refuse."""


def _resolve(argv: list[str]) -> None:
    """Parse ``argv`` as the chatai CLI would, without running it; BadCommand if it would refuse it.

    Typer builds its commands with a click of its own, so the commands are walked by duck typing
    and any parsing error is taken for a refusal.
    """
    if argv[:1] != ["chatai"]:
        raise BadCommand(f"not a chatai command: {argv}")
    command = typer.main.get_command(chatai_app)
    args, path = argv[1:], ["chatai"]
    while hasattr(command, "commands"):  # a group
        if not args or args[0] not in command.commands:
            raise BadCommand(f"{' '.join(path)} has no subcommand {args[:1]}")
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    try:
        command.make_context(" ".join(path), list(args))  # parses options and arguments only
    except Exception as exc:  # noqa: BLE001 - typer's click.UsageError and friends
        raise BadCommand(f"{' '.join(path)} refuses {args}: {exc}") from None


def _script_commands(script: Path) -> list[list[str]]:
    """``chatai ...`` lines of a shell script (with continuation lines joined)."""
    text = script.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True) if line.strip() else []
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[:1] == ["chatai"]:
            out.append(words)
    return out


def _all_chatai_commands() -> list[tuple[str, list[str]]]:
    found = []
    for name, svc in SERVICES.items():
        if svc.get("command", [None])[0] == "chatai":
            found.append((f"compose service {name}", svc["command"]))
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for cmd in re.findall(r"^CMD\s+(\[.*\])\s*$", dockerfile, re.M):
        found.append(("docker/Dockerfile CMD", json.loads(cmd)))
    for script in sorted((ROOT / "docker").glob("*.sh")):
        found += [(f"docker/{script.name}", argv) for argv in _script_commands(script)]
    return found


def test_every_command_is_an_existing_chatai_subcommand():
    commands = _all_chatai_commands()
    assert len(commands) >= 8
    for where, argv in commands:
        try:
            _resolve(argv)
        except BadCommand as exc:
            pytest.fail(f"{where}: {exc}")
    for wrong in (["chatai", "gateway", "--no-such-flag"], ["chatai", "no-such-command"], ["chatai", "breaker"],
                  ["chatai", "worker", "--max-num-seqs", "many"]):
        with pytest.raises(BadCommand):
            _resolve(wrong)


def test_every_mounted_file_and_entrypoint_exists():
    declared = set(COMPOSE.get("volumes") or {})
    for name, svc in SERVICES.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: mounted {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"
        for entry in svc.get("entrypoint", []):
            if entry.startswith(SCRIPT_DIR_IN_IMAGE):
                assert (ROOT / "docker" / entry.removeprefix(SCRIPT_DIR_IN_IMAGE)).is_file(), entry
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "COPY docker/*.sh " + SCRIPT_DIR_IN_IMAGE in dockerfile
    for entry in re.findall(r'^ENTRYPOINT\s+\["([^"]+)"', dockerfile, re.M):
        script = ROOT / "docker" / entry.removeprefix(SCRIPT_DIR_IN_IMAGE)
        assert script.is_file() and script.stat().st_mode & 0o111, f"{entry}: missing or not executable"
    for source in re.findall(r"^COPY\s+(\S+)\s+\S+\s*$", dockerfile, re.M):
        assert list(ROOT.glob(source)), f"Dockerfile copies {source}, which is missing"


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[service].get("environment") or {}).items()}


def test_settings_variables_are_real_settings():
    gateway_env = _env("gateway")
    batch_env = {k: v for k, v in gateway_env.items() if k.startswith("CHATAI_GATEWAY_BATCH_")}
    gateway_env = {k: v for k, v in gateway_env.items() if k not in batch_env}
    fields = GatewaySettings.model_fields
    for key in gateway_env:
        assert key.removeprefix("CHATAI_GATEWAY_").lower() in fields, f"gateway: unknown setting {key}"
    for key in batch_env:
        assert key.removeprefix("CHATAI_GATEWAY_BATCH_").lower() in BatchSettings.model_fields, f"gateway: unknown {key}"
    # The replicas share the files directory: it lies on the volume both mount.
    files_dir = batch_env["CHATAI_GATEWAY_BATCH_FILES_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["gateway"]["volumes"]}
    assert any(files_dir.startswith(target + "/") and source in COMPOSE["volumes"] for target, source in mounts.items())
    settings = GatewaySettings(**{k.removeprefix("CHATAI_GATEWAY_").lower(): v for k, v in gateway_env.items()})
    assert settings.tunnel_host == "login-node" and not settings.broker_direct
    for key in _env("worker"):
        if key.startswith("CHATAI_WORKER_"):
            assert key.removeprefix("CHATAI_WORKER_").lower() in WorkerSettings.model_fields, f"worker: unknown {key}"


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_ports_hosts_and_models_agree():
    rabbit_port = int(re.search(r"^listeners\.tcp\.default\s*=\s*(\d+)", (ROOT / "broker_config" / "rabbitmq.conf").read_text(), re.M).group(1))
    gw_env = _env("gateway")
    # The gateways: their listening port and health check; the load balancer publishes its own
    # port and reaches every replica on theirs, checking /health.
    gw_port = _option(SERVICES["gateway"]["command"], "--port")
    assert SERVICES["gateway"]["expose"] == [gw_port]
    assert f":{gw_port}/health" in " ".join(SERVICES["gateway"]["healthcheck"]["test"])
    haproxy = (ROOT / "docker" / "haproxy.cfg").read_text()
    [published] = SERVICES["lb"]["ports"]
    assert re.search(rf"^\s*bind :{published.rsplit(':', 1)[1]}\s*$", haproxy, re.M)
    servers = re.findall(r"^\s*server \S+ (\S+):(\d+) check", haproxy, re.M)
    assert sorted(servers) == sorted((name, gw_port) for name in GATEWAYS)
    assert "option httpchk GET /health" in haproxy
    # The tunnel: the login node's sshd port and name; the forward the breaker permits is the broker.
    assert SERVICES["login-node"]["expose"] == [gw_env["CHATAI_GATEWAY_TUNNEL_PORT"]]
    assert gw_env["CHATAI_GATEWAY_TUNNEL_HOST"] == SERVICES["login-node"]["hostname"] == "login-node"
    install = next(a for a in _script_commands(ROOT / "docker" / "login-node.sh") if a[1:3] == ["breaker", "install"])
    assert _option(install, "--broker-host") == gw_env["CHATAI_GATEWAY_TUNNEL_REMOTE_HOST"] == SERVICES["broker"]["hostname"]
    assert int(_option(install, "--broker-port")) == int(gw_env["CHATAI_GATEWAY_TUNNEL_REMOTE_PORT"]) == rabbit_port
    assert "chatai-tunnel" == gw_env["CHATAI_GATEWAY_TUNNEL_USER"]  # the breaker's default tunnel account
    assert SERVICES["broker"]["expose"] == [str(rabbit_port)]
    # The broker URLs handed to the gateway and the worker name the broker's host and port.
    assert f"@{SERVICES['broker']['hostname']}:{rabbit_port}/chatai" in (ROOT / "docker" / "broker.sh").read_text()
    # The breaker administers the node the broker runs as.
    node = f"rabbit@{SERVICES['broker']['hostname']}"
    assert _option(install, "--rabbit-node") == node == _option(SERVICES["login-node"]["command"], "--rabbit-node")
    # The worker serves a model the broker has a queue for.
    apply = SERVICES["broker"]["command"]
    assert _option(SERVICES["worker"]["command"], "--served-model-name") in [
        apply[i + 1] for i, a in enumerate(apply) if a == "--model"]
    assert _env("worker")["CHATAI_WORKER_MODEL"].startswith("/models/")
    assert any(v.endswith(":/models") for v in SERVICES["worker"]["volumes"])


def test_gateway_replicas_are_the_same_service():
    """Two replicas of one definition: the same image, command, settings and volumes."""
    first, second = (SERVICES[name] for name in GATEWAYS)
    assert first == second
    assert [n for n, s in SERVICES.items() if s.get("command", [None, None])[:2] == ["chatai", "gateway"]] == list(GATEWAYS)


def test_start_order_and_health_checks():
    for gateway in GATEWAYS:
        for needed in ("login-node", "broker", "db"):
            assert SERVICES[gateway]["depends_on"][needed]["condition"] == "service_healthy"
        assert SERVICES["lb"]["depends_on"][gateway]["condition"] == "service_healthy"
    assert SERVICES["db"]["depends_on"]["gateway-key"]["condition"] == "service_completed_successfully"
    assert SERVICES["login-node"]["depends_on"]["broker"]["condition"] == "service_healthy"
    assert SERVICES["login-node"]["depends_on"]["gateway-key"]["condition"] == "service_completed_successfully"
    assert SERVICES["worker"]["depends_on"]["broker"]["condition"] == "service_healthy"
    for name in ("broker", "login-node", "db", *GATEWAYS):
        assert SERVICES[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    # Only the load balancer is published, and only on the host's loopback (TLS proxy in front).
    assert [n for n, s in SERVICES.items() if s.get("ports")] == ["lb"]
    assert SERVICES["lb"]["ports"][0].startswith("127.0.0.1:")
    # The database's password is made before PostgreSQL first starts, and only the services
    # that need it mount it.
    assert sorted(n for n, s in SERVICES.items() if any(v.startswith("db-secret:") for v in s.get("volumes", []))) \
        == sorted(["gateway-key", "db", *GATEWAYS])

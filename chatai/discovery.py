"""Find the running ``chatai dev`` stacks, so that operator commands work on one with no flags.

Why a registry of entries, one per state folder: ``chatai dev`` may keep its state anywhere
(``--state-dir``), several stacks may run at once, and the operator commands (``chatai status``,
``scale``, ``autoscale``, ``breaker``, ``batch``) run from another shell. While it runs, each
``chatai dev`` writes the path of its ``stack.json`` into an entry of its own under
``$XDG_RUNTIME_DIR/chatai/dev-stacks/`` (else ``~/.cache/chatai/dev-stacks/``), named after its
state folder, mode 0600 in a 0700 folder, and removes that entry, and only that one, on the way
out. Which stack a command uses:

1. ``--stack DIR`` (``chatai --stack DIR COMMAND`` or ``COMMAND ... --stack DIR``), else
   ``$CHATAI_STACK``: a state folder or its ``stack.json``; ``none``: no stack at all;
2. else every running stack found (the registry's entries and ``./.chatai-dev``): the only one,
   or, when there are several, none but an error that lists them and asks for ``--stack``.

A stack counts only while one of its processes lives (an entry left by a killed stack is
ignored). Its settings become *defaults* of the commands (:meth:`DevStackInfo.operator_env`,
:meth:`DevStackInfo.client_env`): anything set in the environment wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

STACK_ENV = "CHATAI_STACK"
DEFAULT_STATE_DIR = Path(".chatai-dev")


class StackChoiceError(RuntimeError):
    """No stack where one was named, or several running and none named."""


def registry_dir() -> Path:
    """The per-user folder holding one entry per running stack."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path.home() / ".cache"
    return base / "chatai" / "dev-stacks"


def entry_path(stack_json: Path) -> Path:
    """The registry entry of the stack whose ``stack.json`` is ``stack_json``: named after its folder."""
    folder = str(Path(stack_json).resolve().parent)
    return registry_dir() / hashlib.sha256(folder.encode()).hexdigest()[:16]


def publish(stack_json: Path) -> Path:
    """Register ``stack_json`` for the operator commands (called by ``chatai dev`` once it started)."""
    entry = entry_path(stack_json)
    entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    entry.parent.chmod(0o700)
    entry.touch(mode=0o600, exist_ok=True)
    entry.chmod(0o600)
    entry.write_text(str(Path(stack_json).resolve()) + "\n")
    return entry


def withdraw(stack_json: Path) -> None:
    """Remove this stack's own entry (never another stack's)."""
    entry = entry_path(stack_json)
    try:
        if Path(entry.read_text().strip()) == Path(stack_json).resolve():
            entry.unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class DevStackInfo:
    """A running stack's ``stack.json`` and what the operator commands need from it."""

    path: Path
    data: dict

    @property
    def state_dir(self) -> Path:
        return self.path.parent

    @property
    def gateway_url(self) -> str | None:
        url = self.data.get("gateway_url")
        return url.removesuffix("/v1") if url else None

    @property
    def breaker_config(self) -> str | None:
        return (self.data.get("tunnel") or {}).get("breaker_config")

    @property
    def slurm(self) -> dict:
        return self.data.get("slurm") or {}

    def operator_url(self) -> str | None:
        """The read-only operator user's URL: the gateway's host and vhost, the operator's name
        from ``stack.json`` and password from the stack's ``broker-secrets.json``."""
        user = (self.data.get("broker_users") or {}).get("operator", "operator")
        try:
            password = json.loads((self.state_dir / "broker-secrets.json").read_text())[user]
            parts = urlsplit(self.data["broker_url"])
        except (OSError, ValueError, KeyError):
            return None
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}" + \
            (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def operator_env(self) -> dict[str, str]:
        """Defaults for ``CHATAI_SLURM_*``, ``SLURM_CONF`` and ``CHATAI_BREAKER_CONFIG``: the
        stack's broker, breaker, private Slurm, model path and worker broker-URL file, and the
        job sizes ``chatai dev --slurm`` itself uses (one CPU, no GPU, no --time-min)."""
        env: dict[str, str] = {}
        if url := self.operator_url():
            env["CHATAI_SLURM_OPERATOR_BROKER_URL"] = url
        if self.breaker_config:
            env["CHATAI_BREAKER_CONFIG"] = self.breaker_config
        slurm = self.slurm
        if slurm.get("SLURM_CONF"):
            slurm_dir = self.state_dir / "slurm"
            env.update({
                "SLURM_CONF": slurm["SLURM_CONF"],
                "CHATAI_SLURM_BROKER_URL_FILE": str(slurm_dir / "worker-broker-url"),
                "CHATAI_SLURM_LOG_DIR": slurm.get("worker_logs") or str(slurm_dir / "logs"),
                "CHATAI_SLURM_TIME": "08:00:00", "CHATAI_SLURM_TIME_MIN": "none",
                "CHATAI_SLURM_CPUS_PER_TASK": "1", "CHATAI_SLURM_SIGNAL_GRACE": "60",
                "CHATAI_SLURM_DRAIN_GRACE": "30",
            })
        if self.data.get("model") and self.data.get("model_path"):
            env["CHATAI_SLURM_MODELS"] = json.dumps({self.data["model"]: self.data["model_path"]})
        return env

    def client_env(self) -> dict[str, str]:
        """Defaults for the API clients (``chatai batch``): the gateway's URL and the stack's key."""
        env: dict[str, str] = {}
        if self.gateway_url:
            env["CHATAI_BASE_URL"] = self.gateway_url
        if self.data.get("api_key"):
            env["CHATAI_API_KEY"] = self.data["api_key"]
        return env

    def alive(self) -> bool:
        pids = [*(self.data.get("pids") or {}).values(), *([self.data["dev_pid"]] if self.data.get("dev_pid") else [])]
        return any(_alive(int(pid)) for pid in pids)


def load(path: Path) -> DevStackInfo | None:
    """The stack whose ``stack.json`` (or state folder) is ``path``, if it is readable."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "stack.json"
    try:
        return DevStackInfo(path.resolve(), json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def running_stacks() -> list[DevStackInfo]:
    """Every running stack this user has: the registry's live entries and ``./.chatai-dev``."""
    paths: list[Path] = []
    try:
        for entry in sorted(registry_dir().iterdir()):
            try:
                paths.append(Path(entry.read_text().strip()))
            except OSError:
                continue
    except OSError:
        pass
    paths.append(DEFAULT_STATE_DIR / "stack.json")
    found: dict[Path, DevStackInfo] = {}
    for path in paths:
        info = load(path)
        if info is not None and info.path not in found and info.alive():
            found[info.path] = info
    return list(found.values())


def stack_in(state_dir: Path) -> DevStackInfo | None:
    """The running stack whose state folder is ``state_dir``, if any."""
    info = load(Path(state_dir) / "stack.json")
    return info if info is not None and info.alive() else None


def find_stack(stack: str | Path | None = None) -> DevStackInfo | None:
    """The running stack a command should use: ``stack`` (or ``$CHATAI_STACK``) when given, else
    the only running one; None when none runs. Raises StackChoiceError when the named one does
    not run, or when several run and none is named."""
    given = str(stack) if stack is not None else os.environ.get(STACK_ENV, "").strip()
    if given.lower() == "none":
        return None
    if given:
        info = load(Path(given))
        if info is None or not info.alive():
            raise StackChoiceError(f"no running chatai dev stack in {given}")
        return info
    stacks = running_stacks()
    if len(stacks) > 1:
        listed = "\n".join(f"  --stack {s.state_dir}" for s in stacks)
        raise StackChoiceError(f"{len(stacks)} chatai dev stacks are running; choose one with --stack DIR "
                               f"(or {STACK_ENV}=DIR):\n{listed}")
    return stacks[0] if stacks else None


def apply_defaults(command: str, stack: str | Path | None = None, quiet: bool = False,
                   client: bool = False) -> DevStackInfo | None:
    """Before a command: the chosen stack's settings as environment defaults (what the user set
    wins), ``$CHATAI_STACK`` set to it (so everything in this process sees the same one), and one
    line on stderr saying which stack is used. ``client``: API client settings (``chatai batch``)
    instead of the operator's."""
    info = find_stack(stack)
    if info is None:
        return None
    os.environ[STACK_ENV] = str(info.path)
    defaults = info.client_env() if client else info.operator_env()
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    if added and not quiet:
        print(f"chatai {command}: using the running chatai dev stack {info.state_dir} "
              f"(--stack DIR for another, {STACK_ENV}=none for none)", file=sys.stderr)
    return info

"""Find a running ``chatai dev`` stack, so that operator commands work on it with no flags.

Why a pointer file: ``chatai dev`` may keep its state anywhere (``--state-dir``), and the
operator commands (``chatai status``, ``scale``, ``breaker``) run from another shell. While it
runs, ``chatai dev`` writes the path of its ``stack.json`` to a per-user pointer file,
``$XDG_RUNTIME_DIR/chatai/dev-stack`` (else ``~/.cache/chatai/dev-stack``), mode 0600 in a 0700
folder, and removes it on the way out. Where to look, first hit wins:

1. ``$CHATAI_STACK``: a ``stack.json`` or the state folder holding one (``none``: never look);
2. the pointer file;
3. ``./.chatai-dev/stack.json`` (``chatai dev``'s default state folder).

A stack counts only while one of its processes lives. Its settings become *defaults* of the
operator commands (:meth:`DevStackInfo.operator_env`): anything set in the environment wins.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

STACK_ENV = "CHATAI_STACK"
DEFAULT_STATE_DIR = Path(".chatai-dev")


def pointer_path() -> Path:
    """The per-user file that names the running stack's ``stack.json``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path.home() / ".cache"
    return base / "chatai" / "dev-stack"


def publish(stack_json: Path) -> Path:
    """Point the operator commands at ``stack_json`` (called by ``chatai dev`` once it started)."""
    pointer = pointer_path()
    pointer.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pointer.touch(mode=0o600, exist_ok=True)
    pointer.chmod(0o600)
    pointer.write_text(str(Path(stack_json).resolve()) + "\n")
    return pointer


def withdraw(stack_json: Path) -> None:
    """Remove the pointer if it still names ``stack_json`` (another stack may have taken it)."""
    pointer = pointer_path()
    try:
        if Path(pointer.read_text().strip()) == Path(stack_json).resolve():
            pointer.unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
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
        """The read-only operator user's URL: the gateway's host and vhost, the operator's
        password from the stack's ``broker-secrets.json``."""
        try:
            password = json.loads((self.state_dir / "broker-secrets.json").read_text())["operator"]
            parts = urlsplit(self.data["broker_url"])
        except (OSError, ValueError, KeyError):
            return None
        netloc = f"operator:{quote(password, safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
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

    def alive(self) -> bool:
        return any(_alive(int(pid)) for pid in (self.data.get("pids") or {}).values())


def _candidates() -> list[Path]:
    out: list[Path] = []
    given = os.environ.get(STACK_ENV, "").strip()
    if given:
        path = Path(given).expanduser()
        out.append(path / "stack.json" if path.is_dir() else path)
    try:
        out.append(Path(pointer_path().read_text().strip()))
    except OSError:
        pass
    out.append(DEFAULT_STATE_DIR / "stack.json")
    return out


def find_stack() -> DevStackInfo | None:
    """The running ``chatai dev`` stack this user's commands should see, or None."""
    if os.environ.get(STACK_ENV, "").strip().lower() == "none":
        return None
    for path in _candidates():
        try:
            info = DevStackInfo(path.resolve(), json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if info.alive():
            return info
    return None


def apply_defaults(command: str, quiet: bool = False) -> DevStackInfo | None:
    """Before an operator command: the running stack's settings as environment defaults (what
    the operator set wins), and one line on stderr saying which stack is used."""
    stack = find_stack()
    if stack is None:
        return None
    added = {k: v for k, v in stack.operator_env().items() if k not in os.environ}
    os.environ.update(added)
    if added and not quiet:
        print(f"chatai {command}: using the running chatai dev stack {stack.path} "
              f"({STACK_ENV}=none to ignore it)", file=sys.stderr)
    return stack

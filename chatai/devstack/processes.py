"""Child processes of a local stack: start one with its log, wait for a condition, stop it.

``chatai dev``, ``chatai bench`` and the tests start gateways, workers, vLLM's server and
daemons the same way: each child in a session of its own (so a stop reaches vLLM's engine core
processes too), its output in a log file, readiness awaited by polling a condition while the
child is checked for an early exit, whose log tail then becomes the error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from broker_config import timing

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], T], timeout: float = 10.0, what: str = "condition", every: float = 0.1,
               check: Callable[[], None] | None = None) -> T:
    """``broker_config.timing.wait_until``; ``check`` runs before each poll and may raise (a child
    that died). Raises TimeoutError naming ``what`` after ``timeout``."""
    if check is None:
        return timing.wait_until(pred, timeout, what, every)

    def checked() -> T:
        check()
        return pred()

    return timing.wait_until(checked, timeout, what, every)


def http_ok(url: str) -> bool:
    """True when ``GET url`` answers 200 (a server that is up)."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class ChildExited(RuntimeError):
    pass


@dataclass
class Child:
    """A started child process and its log."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check(self) -> None:
        """Raise ChildExited (with the log's tail) if the process has ended."""
        if self.proc.poll() is not None:
            raise ChildExited(f"the {self.name} exited with code {self.proc.returncode}; "
                              f"log {self.log_path}:\n{self.log_tail()}")

    def wait_until(self, pred: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
        """``wait_until`` that fails at once if this child exits meanwhile."""
        return wait_until(pred, timeout, what, every, check=self.check)

    def signal(self, sig: int = signal.SIGTERM, group: bool = False) -> None:
        """Signal the process (``group``: its whole session) if it still runs."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole session: the process and whatever it started (vLLM's engine core)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def stop(self, timeout: float = 60.0, group: bool = False) -> int | None:
        """SIGTERM (the process, or its session), wait up to ``timeout`` for a graceful exit, then
        SIGKILL the session (which also reaps children left behind). Returns the exit code, or
        None if it had to be killed."""
        self.signal(signal.SIGTERM, group=group)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        rc = self.proc.poll()
        self.kill()
        return rc


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Child:
    """Start ``argv`` in a session of its own, output appended to ``log_path``; ``env`` is added
    to this process's environment."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    return Child(name, proc, log_path)


WORKER_READY_LINE = "worker ready"  # gpu_worker.main.READY_LINE (not imported: it loads the engine's modules)


def start_worker(model_dir: Path | str, served_model_name: str, broker_url: str, log_path: Path, *,
                 args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None, name: str = "worker",
                 cwd: Path | None = None, cpus: str | None = None) -> Child:
    """One GPU worker (``python -m gpu_worker``, the same as ``chatai worker``) serving ``model_dir``;
    ``cpus`` (a list such as ``"1"`` or ``"2,3"``) pins it and its engine there, as a node would.

    The broker URL holds the worker user's password: it goes through the environment, never argv.
    Ready once :data:`WORKER_READY_LINE` is in its log (see :func:`worker_ready`).
    """
    argv = [sys.executable, "-m", "gpu_worker", "--model", str(model_dir), "--served-model-name", served_model_name,
            *args]
    if cpus:
        argv = ["taskset", "--cpu-list", cpus, *argv]
    return spawn(name, argv, log_path, {**(env or {}), "CHATAI_WORKER_BROKER_URL": broker_url}, cwd=cwd)


def worker_ready(worker: Child, timeout: float = 180.0) -> None:
    """Block until the worker logs its ready line (it then consumes its queue)."""
    worker.wait_until(lambda: WORKER_READY_LINE in worker.log_text(), timeout, f"the {worker.name} to be ready")


def start_gateway(state_dir: Path, port: int, broker_url: str, log_path: Path, *,
                  args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None) -> Child:
    """One gateway (``chatai gateway``) on 127.0.0.1:``port`` with its keys and batches in ``state_dir``.

    The broker URL holds the gateway user's password: it goes through the environment, never argv.
    """
    argv = [sys.executable, "-m", "chatai.cli", "gateway", "--port", str(port), "--state-dir", str(state_dir), *args]
    return spawn("gateway", argv, log_path, {"CHATAI_GATEWAY_BROKER_URL": broker_url, **(env or {})})

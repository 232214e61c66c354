"""Start and stop real worker processes (``python -m gpu_worker``) for tests.

Each worker runs in its own session (process group), so a test can SIGKILL the worker together
with the engine core processes vLLM spawned, and nothing outlives the test. The broker URL goes
through the environment, as in production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_LINE = "worker ready"  # gpu_worker.main.READY_LINE (not imported: keep tests light)
REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerStartError(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    model: str  # served model name = the queue it consumes
    log_path: Path
    worker_id: str
    args: list[str] = field(default_factory=list)

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

    def wait_ready(self, timeout: float = 180.0) -> "WorkerProcess":
        """Block until the worker logs its ready line (it then consumes its queue)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.log_text():
                return self
            if self.proc.poll() is not None:
                raise WorkerStartError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.2)
        self.kill()
        raise WorkerStartError(f"worker not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the worker process only (as Slurm's --signal=B: or an operator would)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker and vLLM's engine core processes."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait for a graceful exit; SIGKILL the group if it does not come."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        rc = self.proc.poll()
        self.kill()  # also reaps engine children left behind, if any
        return rc


def start_worker(
    model_dir: Path | str,
    served_model_name: str,
    broker_url: str,
    log_path: Path | str,
    *,
    worker_id: str | None = None,
    max_num_seqs: int = 8,
    max_model_len: int = 512,
    heartbeat_interval: float = 1.0,
    extra_args: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Launch a worker; call ``.wait_ready()`` on the result (or start several, then wait)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    worker_id = worker_id or f"test-{served_model_name}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    args = [
        sys.executable, "-m", "gpu_worker",
        "--model", str(model_dir),
        "--served-model-name", served_model_name,
        "--max-num-seqs", str(max_num_seqs),
        "--max-model-len", str(max_model_len),
        "--heartbeat-interval", str(heartbeat_interval),
        "--worker-id", worker_id,
        *extra_args,
    ]
    full_env = dict(os.environ)
    full_env.update(
        CHATAI_WORKER_BROKER_URL=broker_url,
        VLLM_CPU_KVCACHE_SPACE=full_env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # vLLM's CPU backend pins its threads to core 0 by default ("auto"); several test workers
        # would then share one core while the other idles. Let the OS spread them.
        VLLM_CPU_OMP_THREADS_BIND=full_env.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    full_env.update(env or {})
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                cwd=str(REPO_ROOT), start_new_session=True)
    finally:
        log.close()
    return WorkerProcess(proc=proc, model=served_model_name, log_path=log_path, worker_id=worker_id, args=args)

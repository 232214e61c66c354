"""Real worker processes for tests: ``chatai.devstack``'s worker with small, test-sized engines.

Each worker runs in its own session (process group), so a test can SIGKILL the worker together
with the engine core processes vLLM spawned, and nothing outlives the test. The broker URL goes
through the environment, as in production.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from chatai.devstack import processes

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WorkerProcess(processes.Child):
    """The worker's process (``.proc``, ``.pid``, ``.log_text()``, ``.signal()``: the process only,
    as Slurm's ``--signal=B:`` or an operator would; ``.kill()``: the whole group, engine too)."""

    model: str = ""  # served model name = the queue it consumes
    worker_id: str = ""

    def wait_ready(self, timeout: float = 180.0) -> "WorkerProcess":
        """Block until the worker logs its ready line (it then consumes its queue)."""
        try:
            processes.worker_ready(self, timeout)
        except TimeoutError:
            self.kill()
            raise
        return self


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
    worker_id = worker_id or f"test-{served_model_name}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    args = ["--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
            "--heartbeat-interval", str(heartbeat_interval), "--worker-id", worker_id, *extra_args]
    test_env = {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # vLLM's CPU backend pins its threads to core 0 by default ("auto"); several test workers
        # would then share one core while the other idles. Let the OS spread them.
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    child = processes.start_worker(model_dir, served_model_name, broker_url, Path(log_path), args=args,
                                   env=test_env, name=f"worker {worker_id}", cwd=REPO_ROOT)
    return WorkerProcess(child.name, child.proc, child.log_path, model=served_model_name, worker_id=worker_id)

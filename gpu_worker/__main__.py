"""``python -m gpu_worker``: the same as ``chatai worker`` (vLLM's spawned engine core needs the guard)."""

from gpu_worker.cli import standalone

if __name__ == "__main__":
    standalone()

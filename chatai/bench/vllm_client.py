"""vLLM's own benchmark client (``vllm.benchmarks.serve``) as the yardstick for ``chatai bench``.

Both paths are measured by the client vLLM's developers measure their server with, so a figure
here means what it means in vLLM's own reports: TTFT, ITL and TPOT percentiles from its
per-token timestamps, output throughput from the tokens its tokenizer counts. The project's
hand-written client (``chatai.bench.load``) stays only as the relay benchmark's load, where a
synthetic engine has no tokenizer to count with.

It runs as a child process (``python -m chatai.bench.vllm_client ARGS``: the ``vllm bench serve``
command does not start with the CPU package here), so its event loop is alone in its process,
the priority raise of ``favoured_client`` reaches it through inheritance, and its result file is
the contract: this module only builds the arguments and reads the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

# vLLM's result keys -> the names chatai's reports use (docs/performance.md).
FIGURES = {"output_throughput": "output_tok_s", "median_ttft_ms": "ttft_p50_ms", "p99_ttft_ms": "ttft_p99_ms",
           "median_itl_ms": "itl_p50_ms", "p99_itl_ms": "itl_p99_ms", "median_tpot_ms": "tpot_p50_ms",
           "p99_tpot_ms": "tpot_p99_ms", "duration": "wall_s", "total_output_tokens": "output_tokens"}


def argv(base_url: str, model: str, tokenizer: Path, level: dict, input_len: int, result_dir: Path,
         result_file: str) -> list[str]:
    """``vllm bench serve``'s arguments for one level: random prompts of ``input_len`` tokens,
    ``level["max_tokens"]`` output tokens each with ignore_eos, a closed loop of
    ``level["concurrency"]`` clients (``--max-concurrency``, every request sent at once)."""
    return [
        "--backend", "openai-chat", "--base-url", base_url.removesuffix("/v1"), "--endpoint", "/v1/chat/completions",
        "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
        "--random-input-len", str(input_len), "--random-output-len", str(level["max_tokens"]),
        "--random-range-ratio", "0", "--ignore-eos", "--num-prompts", str(level["requests"]),
        "--max-concurrency", str(level["concurrency"]), "--request-rate", "inf",
        "--num-warmups", str(level.get("warmup", 0)), "--temperature", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", result_file, "--seed", "0",
    ]


def figures(raw: dict, concurrency: int) -> dict:
    """vLLM's result as one row of ``chatai bench``'s report (its own keys kept under ``vllm``)."""
    row = {ours: raw.get(theirs, float("nan")) for theirs, ours in FIGURES.items()}
    ok = int(raw.get("completed", 0))
    failed = int(raw.get("failed", 0))
    # Each distinct failure once, with how often (the per-request lists need --save-detailed).
    errors = [f"{n} x {e}" for e, n in Counter(str(e).strip()[:200] for e in raw.get("errors") or [] if e).most_common(5)]
    kept = {k: v for k, v in raw.items() if not isinstance(v, list)}  # per-request lists stay out
    return {"concurrency": concurrency, "requests": ok + failed, "ok": ok, "failed": failed, **row,
            "errors": errors, "client": "vllm.benchmarks.serve", "vllm": kept}


def run_level(base_url: str, api_key: str, model: str, tokenizer: Path, level: dict, input_len: int,
              work: Path, timeout: float = 3600.0) -> dict:
    """One level through vLLM's client in a child process; its figures as a report row."""
    work.mkdir(parents=True, exist_ok=True)
    name = f"c{level['concurrency']}-{os.getpid()}.json"
    log = work / "vllm-client.log"
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, "-m", "chatai.bench.vllm_client",
                               *argv(base_url, model, tokenizer, level, input_len, work, name)],
                              env={**os.environ, "OPENAI_API_KEY": api_key}, stdout=out, stderr=out,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    result = work / name
    if done.returncode != 0 or not result.exists():
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"vLLM's benchmark client failed (exit {done.returncode}); log {log}:\n{tail}")
    return figures(json.loads(result.read_text()), level["concurrency"])


def main(args: list[str]) -> None:
    """What ``vllm bench serve`` does, without the CLI entry point that fails to start here."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM's benchmark client")
    add_cli_args(parser)
    serve_main(parser.parse_args(args))


if __name__ == "__main__":
    main(sys.argv[1:])

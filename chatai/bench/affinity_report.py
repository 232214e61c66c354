"""What ``chatai bench affinity`` prints against the issue's targets, and its plot."""

from __future__ import annotations

import math
from pathlib import Path

RUN_LABELS = {"one_worker": "1 worker", "affinity_off": "2 workers, affinity off", "affinity_on": "2 workers, affinity on"}


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1%}"


def targets(result: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the issue's targets; met None when not measurable."""
    hit, ttft = result["hit_rate"], result["followup_ttft_p50_ms"]
    rows: list[tuple[str, str, bool | None]] = []
    if hit["one_worker"] and hit["affinity_on"] is not None and hit["affinity_off"] is not None:  # > 0
        ratio = hit["affinity_on"] / hit["one_worker"]
        gain = hit["affinity_on"] / hit["affinity_off"] if hit["affinity_off"] else math.inf
        rows.append(("hit rate, affinity on >= 90% of one worker's",
                     f"{_pct(hit['affinity_on'])} vs {_pct(hit['one_worker'])} ({ratio:.0%}); affinity off "
                     f"{_pct(hit['affinity_off'])} (on is {gain:.2f}x off)", ratio >= 0.9))
    else:
        rows.append(("hit rate, affinity on >= 90% of one worker's",
                     "one worker found nothing cached (prompts shorter than a cache block?)", None))
    ratio = ttft["affinity_on"] / ttft["one_worker"] if ttft["one_worker"] else math.nan
    rows.append(("follow-up TTFT p50, affinity on <= 1.2x one warm worker's",
                 f"{ttft['affinity_on']} ms vs {ttft['one_worker']} ms ({ratio:.2f}x)", ratio <= 1.2))
    rows.append(("follow-up TTFT p50, affinity on < affinity off",
                 f"{ttft['affinity_on']} ms vs {ttft['affinity_off']} ms", ttft["affinity_on"] < ttft["affinity_off"]))
    share = result["max_worker_share"]
    rows.append(("no worker takes more than 60% of the requests (affinity on)", _pct(share), share <= 0.6))
    probe = result.get("spill_probe") or {}
    if probe:
        rows.append((f"a busy preferred worker delays a request by at most the spill bound ({result['spill_bound_ms']} ms)",
                     f"+{probe['spill_delay_p50_ms']} ms p50 over a request to an idle worker "
                     f"(waits {min(probe['spilled_wait_ms'])}-{max(probe['spilled_wait_ms'])} ms vs "
                     f"{min(probe['direct_wait_ms'])}-{max(probe['direct_wait_ms'])} ms; "
                     f"{probe['spilled_to_other_worker']}/{len(probe['spilled_wait_ms'])} started by the other worker)",
                     # the bound, plus the broker's timer and re-routing; and every one spilled
                     probe["spill_delay_p50_ms"] <= 1.2 * result["spill_bound_ms"]
                     and probe["spilled_to_other_worker"] == len(probe["spilled_wait_ms"])))
    lost, dup = result["requests_lost"], result["requests_duplicated"]
    rows.append(("0 requests lost or duplicated", f"{lost} lost, {dup} duplicated", lost == 0 and dup == 0))
    return rows


def table(result: dict) -> str:
    lines = ["| run | hit rate | follow-up TTFT p50 / p99 (ms) | first-turn TTFT p50 (ms) | tok/s | requests per worker | lost | load average |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for name, r in result["runs"].items():
        lines.append(f"| {RUN_LABELS[name]} | {_pct(r['hit_rate'])} | {r['followup_ttft_p50_ms']} / "
                     f"{r['followup_ttft_p99_ms']} | {r['first_turn_ttft_p50_ms']} | {r['output_tok_s']} | "
                     f"{' / '.join(str(v) for v in sorted(r['share'].values(), reverse=True))} | {r['lost']} | "
                     f"{' '.join(map(str, r['load_average']))} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for target, measured, met in targets(result):
        lines.append(f"| {target} | {measured} | {'-' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(lines)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(RUN_LABELS)
    labels = [RUN_LABELS[n].replace(", ", "\n") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(labels, [100 * (result["hit_rate"][n] or 0) for n in names], color="#4c72b0")
    axes[0].set_title("prefix-cache hit rate (%)")
    axes[0].set_ylim(0, 100)
    p50 = [result["followup_ttft_p50_ms"][n] for n in names]
    p99 = [result["followup_ttft_p99_ms"][n] for n in names]
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
    axes[1].set_xticks(list(x), labels)
    axes[1].set_title("follow-up turns: TTFT (ms)")
    axes[1].legend()
    shares = [result["runs"][n]["max_worker_share"] * 100 for n in names]
    axes[2].bar(labels, shares, color="#55a868")
    axes[2].axhline(60, color="red", linestyle="--", linewidth=1)
    axes[2].set_title("busiest worker's share of requests (%)")
    fig.suptitle(f"chatai bench affinity ({result['machine']['date']}, load average at start "
                 f"{result['machine']['load_average_at_start'][0]})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)

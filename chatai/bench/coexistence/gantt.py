"""The Gantt chart of both runs: nodes on the y axis, regular and worker jobs in their colours."""

from __future__ import annotations

from pathlib import Path

from chatai.bench.coexistence.measures import Interval

COLOURS = {"regular": "#3b6ea8", "worker": "#f0a030", "worker-real": "#c0392b", "idle": "#eeeeee"}


def draw(runs: dict[str, list[Interval]], nodes: list[str], window_end: float, grace_s: int, path: Path) -> Path:
    """One panel per run (baseline first); worker jobs of the real vLLM model in their own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2 + 0.45 * len(nodes) * len(runs)), sharex=True)
    axes = axes if len(runs) > 1 else [axes]
    row = {n: i for i, n in enumerate(nodes)}
    for ax, (title, items) in zip(axes, runs.items()):
        for it in items:
            colour = COLOURS["regular"] if it.kind == "regular" else (
                COLOURS["worker-real"] if it.name.endswith("-tiny") else COLOURS["worker"])
            ax.broken_barh([(it.start, it.length)], (row[it.node] - 0.4, 0.8), facecolors=colour,
                           edgecolor="white", linewidth=0.5)
        ax.axvline(window_end, color="black", linestyle=":", linewidth=1)
        ax.set_yticks(range(len(nodes)), [n.rsplit("-", 1)[-1] for n in nodes])
        ax.set_ylim(-0.6, len(nodes) - 0.4)
        ax.invert_yaxis()
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel("node (1 GPU each)")
    axes[-1].set_xlabel(f"seconds since the trace started (dotted: end of the baseline's regular work; grace {grace_s} s)")
    axes[0].legend(handles=[Patch(color=COLOURS["regular"], label="regular job"),
                            Patch(color=COLOURS["worker"], label="worker (synthetic engine)"),
                            Patch(color=COLOURS["worker-real"], label="worker (real vLLM, tiny model)")],
                   loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""``g2d reproduce``'s figure: the metric against the label fraction per row, one panel per sweep."""

from __future__ import annotations

from pathlib import Path

from g2d.reproduce.report import CellResult, fraction_sweeps
from g2d.reproduce.spec import Experiment

__all__ = ["plot_fractions"]


def plot_fractions(exp: Experiment, results: list[CellResult], path: Path) -> Path | None:
    """Metric vs label fraction per row, with error bars, one panel per (task, data, metric)."""
    sweeps = fraction_sweeps(exp)
    if not sweeps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.row, r.column): r for r in results}
    # panels without any finished cell (a table run in parts) are left out
    sweeps = {k: v for k, v in sweeps.items() if any(by[(row.name, c.name)].values for c in v for row in exp.rows)}
    if not sweeps:
        return None
    colours = {row.name: f"C{i % 10}" for i, row in enumerate(exp.rows)}  # one colour per row in every panel
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.6), squeeze=False)
    for ax, ((task, data, metric, _), cols) in zip(axes[0], sweeps.items()):
        for row in exp.rows:
            pts = [(c.fraction, by[(row.name, c.name)]) for c in cols if by[(row.name, c.name)].values]
            if pts:
                ax.errorbar([f for f, _ in pts], [r.mean for _, r in pts], yerr=[r.std for _, r in pts],
                            marker="o", capsize=3, label=row.name, color=colours[row.name])
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_ylabel(metric)
        ax.set_title(f"{task} on {data}" + (f" ({cols[0].args})" if cols[0].args else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""PNG figures (matplotlib, Agg: no display needed): learning curves and result bars.

A *curve* is (label, x, y, y_std or None); a grid has one column per task and one row
per quantity. Files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sodp3d.files import atomic_write

Curve = tuple[str, np.ndarray, np.ndarray, np.ndarray | None]
RATE = {"success rate": (-0.03, 1.03), "training success rate": (-0.03, 1.03)}


def _save(fig, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return Path(path)


def curve_grid(columns: list[str], rows: list[str], curves: dict[tuple[str, str], list[Curve]], path: str | Path,
               xlabel: str = "environment steps", title: str = "",
               ylims: dict[str, tuple[float, float]] | None = None) -> Path:
    """``curves[(row, column)]``: the curves of one panel; a std draws a band; ``ylims``
    fixes a row's range (rates are drawn on [0, 1])."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(columns), 2.8 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), len(columns), squeeze=False, sharex="col")
    for r, row in enumerate(rows):
        for c, col in enumerate(columns):
            ax = axes[r][c]
            for i, (label, x, y, std) in enumerate(curves.get((row, col), [])):
                colour = f"C{i % 10}"
                marker = "o" if len(x) <= 30 else None
                ax.plot(x, y, label=label, color=colour, marker=marker, ms=3, lw=1.5)
                if std is not None:
                    ax.fill_between(x, y - std, y + std, color=colour, alpha=0.2, lw=0)
            if ylims and row in ylims:
                ax.set_ylim(*ylims[row])
            if r == 0:
                ax.set_title(col, fontsize=10)
            if c == 0:
                ax.set_ylabel(row)
            if r == len(rows) - 1:
                ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def finetune_curves(summaries: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One fine-tuning run: per task, success (training rollouts, and the evaluations) and
    mean chunk reward against environment steps."""
    tasks = [s["task"] for s in summaries]
    curves: dict[tuple[str, str], list[Curve]] = {}
    for s in summaries:
        h = s.get("history") or []
        x = np.array([e["env_steps"] for e in h], float)
        curves[("success rate", s["task"])] = [
            ("training rollouts (eta = 1)", x, np.array([e["success_rate"] for e in h], float), None)]
        ev = s.get("evals") or []
        for eta in dict.fromkeys(e.get("eta", 0.0) for e in ev):
            pts = [e for e in ev if e.get("eta", 0.0) == eta]
            curves[("success rate", s["task"])].append(
                (f"evaluation (eta = {eta:g})", np.array([e["env_steps"] for e in pts], float),
                 np.array([e["success_rate"] for e in pts], float), None))
        curves[("mean chunk reward", s["task"])] = [
            ("training rollouts", x, np.array([e["mean_chunk_reward"] for e in h], float), None)]
    return curve_grid(tasks, ["success rate", "mean chunk reward"], curves, path, title=title, ylims=RATE)


def bars(groups: list[str], series: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, ylabel: str,
         title: str = "") -> Path:
    """Grouped bars: ``series[label] = (means, stds)`` over ``groups`` (tasks and 'average')."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.1 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    xs = np.arange(len(groups))
    for i, (label, (mean, std)) in enumerate(series.items()):
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=label, color=f"C{i % 10}")
    ax.set_xticks(xs, groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

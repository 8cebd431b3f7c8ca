"""PNG plots logged with every arm: the accuracy matrices and accuracy after each task."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matrix_heatmap(matrices: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """One heatmap per protocol; cell [i, j] = accuracy on task j after training task i."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    for ax, (name, R) in zip(axes[0], matrices.items(), strict=True):
        image = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        if len(R) <= 12:
            for (i, j), value in np.ndenumerate(R):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ticks = np.arange(0, len(R), max(1, len(R) // 10))  # whole task numbers, never fractions
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_title(name.upper())
        ax.set_xlabel("evaluated task j")
        ax.set_ylabel("after training task i")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_curves(curves: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Accuracy on everything seen so far after each task, one line per protocol (or per arm)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy on seen tasks")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_figure(stats: dict[str, dict[str, tuple[float, float]]], first_task: dict[str, np.ndarray],
                      title: str, path: Path) -> Path:
    """The GEM paper's figure: ACC, BWT and FWT bars per method with error bars over seeds (``stats[method]
    [metric] = (mean, std)``), and the first task's test accuracy as the later tasks are learned
    (``first_task[method]``: rows = seeds, columns = tasks trained)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    methods = list(stats)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[:3], ("ACC", "BWT", "FWT"), strict=True):
        means = [stats[m][metric][0] for m in methods]
        stds = [stats[m][metric][1] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color=colors[: len(methods)])
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[3]
    for i, (method, rows) in enumerate(first_task.items()):
        mean, std = rows.mean(0), rows.std(0, ddof=1) if len(rows) > 1 else np.zeros(rows.shape[1])
        steps = np.arange(1, rows.shape[1] + 1)
        ax.plot(steps, mean, label=method, color=colors[i % len(colors)])
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=colors[i % len(colors)])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy on the first task")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

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

"""A heatmap of the accuracy matrix: rows = after training session k, columns = session i."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmap(matrix: list[list[float]], path: str | Path, title: str,
                     metric: str = "accuracy") -> Path:
    T = len(matrix)
    grid = np.full((T, max(len(r) for r in matrix)), np.nan)
    for k, row in enumerate(matrix):
        grid[k, :len(row)] = row
    fig, ax = plt.subplots(figsize=(1.1 * grid.shape[1] + 2.5, 0.9 * T + 1.8))
    im = ax.imshow(grid * 100, vmin=0, vmax=100, cmap="viridis")
    for k in range(T):
        for i in range(len(matrix[k])):
            v = grid[k, i] * 100
            ax.text(i, k, f"{v:.1f}", ha="center", va="center",
                    color="white" if v < 60 else "black", fontsize=9)
    ax.set_xticks(range(grid.shape[1]), [f"S{i}" for i in range(grid.shape[1])])
    ax.set_yticks(range(T), [f"after S{k}" for k in range(T)])
    ax.set_xlabel("evaluated session")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=f"{metric} (%)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Motion-intensity resampling (appendix A.5): cap at 20, balance bins over 0..20.

Each kept clip gets a ``sample_weight`` so that, drawn with probability proportional to
it (training uses a weighted sampler), every non-empty intensity bin is equally likely.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_INTENSITY = 20.0


def cap(m: float, max_intensity: float = MAX_INTENSITY) -> float:
    return float(min(max(m, 0.0), max_intensity))


def bin_index(m: np.ndarray, bins: int, max_intensity: float = MAX_INTENSITY) -> np.ndarray:
    """Bin of each (capped) intensity; the top edge (== max) falls in the last bin."""
    idx = np.floor(np.asarray(m, float) / max_intensity * bins).astype(int)
    return np.clip(idx, 0, bins - 1)


def balance_weights(m: np.ndarray, bins: int = 10, max_intensity: float = MAX_INTENSITY) -> np.ndarray:
    """Weights w_i = 1 / (count of i's bin * number of non-empty bins): they sum to 1 and
    give each non-empty bin the same total probability."""
    m = np.asarray(m, float)
    if m.size == 0:
        return m
    idx = bin_index(m, bins, max_intensity)
    counts = np.bincount(idx, minlength=bins)
    nonempty = int((counts > 0).sum())
    return 1.0 / (counts[idx] * nonempty)


def histogram_png(m: np.ndarray, weights: np.ndarray, path: str | Path, bins: int = 10,
                  max_intensity: float = MAX_INTENSITY) -> Path:
    """Before/after histogram: raw counts vs. the expected counts under the weighted sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(m, float)
    edges = np.linspace(0, max_intensity, bins + 1)
    before = np.bincount(bin_index(m, bins, max_intensity), minlength=bins) if m.size else np.zeros(bins)
    after = (np.bincount(bin_index(m, bins, max_intensity), weights=weights, minlength=bins) * m.size
             if m.size else np.zeros(bins))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, counts, title in ((axes[0], before, "before (clips per bin)"),
                              (axes[1], after, "after resampling (expected draws per epoch)")):
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", edgecolor="black", color="#4c72b0")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("motion intensity (px at 512, capped at 20)")
    axes[0].set_ylabel("clips")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

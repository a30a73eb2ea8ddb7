"""PNG figures logged with each run: the learning curve (training and validation) and the confusion
matrix of the trainer's one final test pass (so its accuracy is the logged `test_accuracy`).

matplotlib comes with mlflow; the Agg backend draws without a display.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = {"loss": "training loss", "val_loss": "validation loss", "train_accuracy": "train accuracy",
          "val_accuracy": "validation accuracy (device)",
          "twin_error": "twin error (held out)", "twin_probe_error": "twin error (probe)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def learning_curve(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Loss (left), accuracies (middle) and twin errors (right, when reported) against the epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    groups = [[k for k in ("loss", "val_loss") if k in series],
              [k for k in ("train_accuracy", "val_accuracy") if k in series],
              [k for k in ("twin_error", "twin_probe_error") if k in series]]
    groups = [g for g in groups if g] or [sorted(series)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for key in keys:
            steps, values = zip(*series[key]) if series[key] else ((), ())
            ax.plot(steps, values, marker="o", markersize=3, label=LABELS.get(key, key))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if keys and keys[0].endswith("accuracy"):
            ax.set_ylim(0, 1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def confusion_counts(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    n = n_classes or int(max(y_true.max(initial=-1), y_pred.max(initial=-1)) + 1)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def confusion_matrix(y_true, y_pred, path: str | Path, title: str = "", n_classes: int | None = None) -> Path:
    """Rows: true class, columns: predicted class; cells: counts (colour: fraction of the row)."""
    plt = _pyplot()
    counts = confusion_counts(y_true, y_pred, n_classes)
    n = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    frac = counts / np.where(rows == 0, 1, rows)
    size = min(9.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(counts) / max(1, counts.sum())
    ax.set_title(f"{title + ': ' if title else ''}test accuracy {accuracy:.3f} (n={counts.sum()})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

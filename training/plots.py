"""Figures people look at: sample grids, confusion matrices, misclassified images, curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def sample_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, per_class: int = 8,
                seed: int = 0) -> Path:
    """A row of example images per class: "show image from numbers"."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(class_names), per_class, figsize=(per_class * 0.9, len(class_names) * 0.95))
    for row, name in enumerate(class_names):
        idx = np.flatnonzero(labels == row)
        picks = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picks):
                ax.imshow(images[picks[col]].reshape(28, 28), cmap="gray", vmin=0, vmax=255)
        axes[row, 0].text(-4, 14, name, ha="right", va="center", fontsize=9)
    fig.suptitle("Sample training images per class")
    return _save(fig, path)


def confusion_figure(confusion: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("Actual class")
    ax.set_title(title)
    threshold = confusion.max() / 2 if confusion.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if confusion[i, j] > threshold else "black")
    return _save(fig, path)


def misclassified_grid(images: np.ndarray, actual: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                       class_names: list[str], path: Path, limit: int = 36) -> Path:
    """The most confident mistakes first, each captioned with its actual and predicted class."""
    wrong = np.flatnonzero(actual != predicted)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i].reshape(28, 28), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true: {class_names[actual[i]]}\npred: {class_names[predicted[i]]} ({confidence[i]:.0%})",
                     fontsize=7)
    fig.suptitle(f"Misclassified test images ({len(wrong)} most confident)" if len(wrong) else "No misclassified images")
    return _save(fig, path)

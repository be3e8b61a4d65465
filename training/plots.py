"""Figures people look at: sample grids, confusion matrices, misclassified images, curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import PercentFormatter


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def sample_grid(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, per_class: int = 8, seed: int = 0
) -> Path:
    """A row of example images per class: "show image from numbers"."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(class_names), per_class, figsize=(per_class * 0.9, len(class_names) * 0.95))
    for row, name in enumerate(class_names):
        idx = np.flatnonzero(labels == row)
        picks = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else np.array([], int)
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
            ax.text(
                j,
                i,
                str(confusion[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if confusion[i, j] > threshold else "black",
            )
    return _save(fig, path)


def misclassified_grid(
    images: np.ndarray,
    actual: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    class_names: list[str],
    path: Path,
    limit: int = 36,
) -> Path:
    """The most confident mistakes first, each captioned with its actual and predicted class."""
    wrong = np.flatnonzero(actual != predicted)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[i].reshape(28, 28), cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"true: {class_names[actual[i]]}\npred: {class_names[predicted[i]]} ({confidence[i]:.0%})", fontsize=7
        )
    fig.suptitle(
        f"Misclassified test images ({len(wrong)} most confident)" if len(wrong) else "No misclassified images"
    )
    return _save(fig, path)


def accuracy_bars(rows: list[dict], champion: str, path: Path) -> Path:
    """Validation and test accuracy of every model, best first, each bar labelled with its value."""
    rows = sorted(rows, key=lambda r: r["val_accuracy"])  # best at the top of a horizontal chart
    names = [f"{r['model']} (champion)" if r["model"] == champion else r["model"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.2))
    for offset, key, label, colour in (
        (0.2, "val_accuracy", "validation", "#93c5fd"),
        (-0.2, "test_accuracy", "test", "#2563eb"),
    ):
        values = [r[key] for r in rows]
        bars = ax.barh(y + offset, values, height=0.38, label=label, color=colour)
        ax.bar_label(bars, labels=[f"{v:.2%}" for v in values], padding=3, fontsize=8)
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1.12)
    ax.xaxis.set_major_formatter(PercentFormatter(1))
    ax.set_xlabel("Accuracy")
    ax.set_title("Accuracy of every model (champion chosen on validation)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def curves_figure(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Training loss and validation accuracy per epoch, every model on the same two panels."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        loss_ax.plot(curve["epoch"], curve["train_loss"], marker=".", label=name)
        acc_ax.plot(curve["epoch"], curve["val_accuracy"], marker=".", label=name)
    loss_ax.set(xlabel="Epoch", ylabel="Training loss", title="Training loss")
    acc_ax.set(xlabel="Epoch", ylabel="Validation accuracy", title="Validation accuracy")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def per_class_figure(accuracy: dict[str, float], title: str, path: Path) -> Path:
    """Accuracy (recall) of each class, worst at the top, each bar labelled with its value."""
    ordered = sorted(accuracy.items(), key=lambda item: item[1], reverse=True)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(ordered) + 1.2))
    bars = ax.barh([name for name, _ in ordered], [value for _, value in ordered], color="#2563eb")
    ax.bar_label(bars, labels=[f"{value:.1%}" for _, value in ordered], padding=3, fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.xaxis.set_major_formatter(PercentFormatter(1))
    ax.set_xlabel("Accuracy on the test images of the class (recall)")
    ax.set_title(title)
    return _save(fig, path)

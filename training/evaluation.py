"""Predictions and metrics: accuracy, loss, confusion matrix, per-class report."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits for uint8 images [N,1,28,28], in eval mode, batch by batch on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = [model(images[i: i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels.long()).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are the actual class, columns the predicted one."""
    return np.bincount(
        np.asarray(actual, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64),
        minlength=num_classes * num_classes,
    ).reshape(num_classes, num_classes)


def classification_report(confusion: np.ndarray, class_names: list[str]) -> dict:
    """Per-class precision, recall, F1 and support, with macro and weighted averages."""
    tp = np.diag(confusion).astype(float)
    predicted = confusion.sum(0).astype(float)
    support = confusion.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    report = {
        name: {"precision": p, "recall": r, "f1": f, "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    }
    total = support.sum()
    weights = support / total if total else np.zeros_like(support)
    report["macro avg"] = {
        "precision": precision.mean(), "recall": recall.mean(), "f1": f1.mean(), "support": int(total)
    }
    report["weighted avg"] = {
        "precision": float(precision @ weights), "recall": float(recall @ weights),
        "f1": float(f1 @ weights), "support": int(total),
    }
    report["accuracy"] = float(tp.sum() / total) if total else 0.0
    return {k: ({m: float(v) if m != "support" else v for m, v in d.items()} if isinstance(d, dict) else d)
            for k, d in report.items()}

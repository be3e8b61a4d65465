"""Predictions and metrics: accuracy, loss, confusion matrix, per-class report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.config import TtaSettings
from training.data import Prepared
from training.models import TestTimeAugmented


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for uint8 images [N,1,28,28], in eval mode, batch by batch on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # an empty split still runs one (empty) batch: its logits have the model's number of classes as columns
    batches = range(0, max(len(images), 1), batch_size)
    outputs = [model(images[i : i + batch_size].to(device)).float().cpu() for i in batches]
    model.train(was_training)
    return torch.cat(outputs)


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
    report: dict[str, Any] = {
        name: {"precision": p, "recall": r, "f1": f, "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    }
    total = support.sum()
    weights = support / total if total else np.zeros_like(support)
    report["macro avg"] = {
        "precision": precision.mean(),
        "recall": recall.mean(),
        "f1": f1.mean(),
        "support": int(total),
    }
    report["weighted avg"] = {
        "precision": float(precision @ weights),
        "recall": float(recall @ weights),
        "f1": float(f1 @ weights),
        "support": int(total),
    }
    report["accuracy"] = float(tp.sum() / total) if total else 0.0
    return {
        k: ({m: float(v) if m != "support" else v for m, v in d.items()} if isinstance(d, dict) else d)
        for k, d in report.items()
    }


@dataclass
class Evaluation:
    """A model's scores on the validation and test sets, and its test predictions in detail."""

    scores: dict[str, float]  # {val,test}_{loss,accuracy} and test_accuracy_single_view
    actual: np.ndarray  # test labels
    predicted: np.ndarray
    confidence: np.ndarray  # probability of the predicted class
    confusion: np.ndarray
    report: dict


def evaluate_model(
    net: torch.nn.Sequential, prepared: Prepared, class_names: list[str], tta: TtaSettings, batch_size: int
) -> Evaluation:
    """Score `net` on both held-out splits, averaging its logits over the views `tta` names, exactly as the
    exported graph computes them; `test_accuracy_single_view` is the network alone, to show what TTA buys."""
    augmented = TestTimeAugmented(net, tta)
    batch_of_views = max(1, batch_size // tta.views)

    def logits_of(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(prepared.images(split))
        single_view = predict_logits(net, images, batch_size)
        if tta.views == 1:
            return single_view, single_view
        return single_view, predict_logits(augmented, images, batch_of_views)

    def labels_of(split: str) -> torch.Tensor:
        return torch.from_numpy(prepared.labels(split)).long()

    _, val_logits = logits_of("val")
    test_single_view, test_logits = logits_of("test")
    test_labels = labels_of("test")
    scores: dict[str, float] = {}
    scores["val_loss"], scores["val_accuracy"] = loss_and_accuracy(val_logits, labels_of("val"))
    scores["test_loss"], scores["test_accuracy"] = loss_and_accuracy(test_logits, test_labels)
    scores["test_accuracy_single_view"] = loss_and_accuracy(test_single_view, test_labels)[1]  # what TTA buys
    confidence, predicted = test_logits.softmax(1).max(1)
    actual = test_labels.numpy()
    confusion = confusion_matrix(actual, predicted.numpy(), len(class_names))
    return Evaluation(
        scores, actual, predicted.numpy(), confidence.numpy(), confusion, classification_report(confusion, class_names)
    )

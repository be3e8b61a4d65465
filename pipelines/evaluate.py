"""evaluate stage (one per zoo model): validation and test metrics, confusion matrix, report, mistakes."""
import csv
import logging
import sys

import mlflow
import torch

from pipelines._stage import run
from training import tracking
from training.checkpoint import load_trained, read_json, summary_path, write_json
from training.config import (CARD_FILE, DATASET_FILE, METRICS_DIR, PREDICTIONS_DIR, EVALUATION_DIR,
                             experiment_name, flip_tta, load_params)
from training.data import Prepared
from training.evaluation import classification_report, confusion_matrix, loss_and_accuracy, predict_logits
from training.models import FlipAveraged
from training.plots import confusion_figure, misclassified_grid

log = logging.getLogger("evaluate")


def main() -> None:
    name = sys.argv[1]
    params = load_params()
    card = read_json(CARD_FILE)
    class_names = card["class_names"]
    data = Prepared.load(DATASET_FILE)
    summary = read_json(summary_path(name))
    tta = flip_tta(params, "evaluate", name)
    net = load_trained(name, params, card)
    batch = params["evaluate"]["batch_size"]

    scores = {}
    for split in ("val", "test"):
        images = torch.from_numpy(data.images(split))
        single_view = logits = predict_logits(net, images, batch)
        if tta:  # what the exported FlipAveraged graph computes, from the same two passes
            logits = FlipAveraged.combine(single_view, predict_logits(net, images.flip(-1), batch))
        labels = torch.from_numpy(data.labels(split)).long()
        scores[f"{split}_loss"], scores[f"{split}_accuracy"] = loss_and_accuracy(logits, labels)
    scores["test_accuracy_single_view"] = loss_and_accuracy(single_view, labels)[1]  # what TTA buys
    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    actual, predicted, confidence = labels.numpy(), predicted.numpy(), confidence.numpy()
    confusion = confusion_matrix(actual, predicted, len(class_names))
    report = classification_report(confusion, class_names)

    metrics = {**scores, **{k: summary[k] for k in ("parameters", "best_epoch", "train_seconds", "images_per_second")}}
    write_json(metrics, METRICS_DIR / f"{name}.json")
    PREDICTIONS_DIR.mkdir(parents=True, exist_ok=True)
    with open(PREDICTIONS_DIR / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((class_names[a], class_names[p]) for a, p in zip(actual, predicted))
    out = EVALUATION_DIR / name
    write_json(report, out / "classification_report.json")
    write_json({"labels": class_names, "matrix": confusion.tolist()}, out / "confusion_matrix.json")
    confusion_figure(confusion, class_names, f"{name}: test accuracy {scores['test_accuracy']:.2%}",
                     out / "confusion_matrix.png")
    misclassified_grid(data.images("test"), actual, predicted, confidence, class_names,
                       out / "misclassified.png", params["evaluate"]["misclassified"])

    tracking.setup(experiment_name(params))
    with tracking.start_run(run_id=summary["run_id"]):
        mlflow.log_metrics({k: v for k, v in scores.items() if k.startswith("test_")})  # val: per epoch, by train
        mlflow.log_metrics({f"test_f1.{cls}": report[cls]["f1"] for cls in class_names})
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    log.info("%s: val_acc %.4f, test_acc %.4f%s", name, scores["val_accuracy"], scores["test_accuracy"],
             f" with flip TTA ({scores['test_accuracy_single_view']:.4f} without)" if tta else "")


if __name__ == "__main__":
    run(main)

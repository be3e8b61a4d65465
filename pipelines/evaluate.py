"""evaluate stage (one per zoo model): validation and test loss and accuracy, averaged over the test-time
augmentation views the model learned from (mirrors, 1-pixel shifts) and on single views; confusion matrix,
classification report, gallery of misclassified test images; all logged to the model's MLflow run."""

import csv
import logging
import sys
from pathlib import Path

from common.files import read_json, write_json
from pipelines._stage import run
from training import tracking
from training.checkpoint import load_trained
from training.config import CARD_FILE, DATASET_FILE, EVALUATION_DIR, METRICS_DIR, PREDICTIONS_DIR, Params, summary_path
from training.data import Prepared
from training.evaluation import Evaluation, evaluate_model
from training.plots import confusion_figure, misclassified_grid

log = logging.getLogger("evaluate")


def write_predictions(evaluation: Evaluation, class_names: list[str], path: Path) -> None:
    """actual,predicted class names per test image: the data of DVC's confusion-matrix plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (class_names[a], class_names[p]) for a, p in zip(evaluation.actual, evaluation.predicted, strict=True)
        )


def main() -> None:
    name = sys.argv[1]
    params = Params.load()
    card = read_json(CARD_FILE)
    class_names = card["class_names"]
    prepared = Prepared.load(DATASET_FILE)
    summary = read_json(summary_path(name))
    tta = params.tta_for(name)
    evaluation = evaluate_model(
        load_trained(name, params, card), prepared, class_names, tta, params.evaluate.batch_size
    )
    scores = evaluation.scores

    write_json(
        {**scores, **{k: summary[k] for k in ("parameters", "best_epoch", "train_seconds", "images_per_second")}},
        METRICS_DIR / f"{name}.json",
    )
    write_predictions(evaluation, class_names, PREDICTIONS_DIR / f"{name}.csv")
    out = EVALUATION_DIR / name
    write_json(evaluation.report, out / "classification_report.json")
    write_json({"labels": class_names, "matrix": evaluation.confusion.tolist()}, out / "confusion_matrix.json")
    confusion_figure(
        evaluation.confusion,
        class_names,
        f"{name}: test accuracy {scores['test_accuracy']:.2%}",
        out / "confusion_matrix.png",
    )
    misclassified_grid(
        prepared.images("test"),
        evaluation.actual,
        evaluation.predicted,
        evaluation.confidence,
        class_names,
        out / "misclassified.png",
        params.evaluate.misclassified,
    )

    tracking.setup(params.experiment_name)
    tracking.log_evaluation(summary["run_id"], scores, evaluation.report, class_names, out)
    log.info(
        "%s: val_acc %.4f, test_acc %.4f%s",
        name,
        scores["val_accuracy"],
        scores["test_accuracy"],
        f" with test-time augmentation, {tta.describe()} ({scores['test_accuracy_single_view']:.4f} without)"
        if tta.views > 1
        else "",
    )


if __name__ == "__main__":
    run(main)

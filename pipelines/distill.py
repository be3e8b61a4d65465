"""distill stage: the challenger fine-tuned to give from one view the answers its test-time views give
(training/distill.py), as an MLflow run nested in the challenger's (`distill` params, per-epoch curves, the
student's accuracies). distill/weights.pt is the student; distill.json holds its figures and whether the export
stage exports it in the challenger's place (`distill.tolerance`)."""

import logging
import shutil

import mlflow

from common.files import read_json, write_json
from pipelines._stage import run
from training import tracking
from training.checkpoint import load_augmented, save_weights
from training.config import CARD_FILE, CHALLENGER_FILE, DATASET_FILE, DISTILL_DIR, DISTILL_FILE, DISTILL_WEIGHTS, Params
from training.data import Prepared
from training.distill import distill, exported_instead

log = logging.getLogger("distill")


def log_epoch(record: dict) -> None:
    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])


def main() -> None:
    params = Params.load()
    challenger = read_json(CHALLENGER_FILE)
    name, settings = challenger["model"], params.distill
    views = params.tta_for(name).views
    shutil.rmtree(DISTILL_DIR, ignore_errors=True)
    DISTILL_DIR.mkdir()
    record = {
        "model": name,
        "teacher_views": views,
        "teacher_val_accuracy": challenger["val_accuracy"],
        "teacher_test_accuracy": challenger["test_accuracy"],
        "settings": settings.model_dump(),
    }
    if settings.epochs == 0 or views == 1:
        why = "distill.epochs is 0" if settings.epochs == 0 else f"{name} answers from one view already"
        write_json({**record, "exported": False, "reason": f"not distilled: {why}"}, DISTILL_FILE)
        log.info("not distilled: %s; the export stage exports %s with its %d view(s)", why, name, views)
        return
    card = read_json(CARD_FILE)
    teacher = load_augmented(name, params, card)
    tracking.setup(params.experiment_name)
    tags = tracking.run_tags(card["sha256"]) | {"mlflow.parentRunId": challenger["run_id"]}
    with tracking.start_run(run_name=f"{name}-distilled", tags=tags) as active:
        mlflow.log_params(
            tracking.flatten({"distill": settings.model_dump(), "teacher": {"model": name, "views": views}})
        )
        student = distill(teacher, Prepared.load(DATASET_FILE), params, name, on_epoch_end=log_epoch)
        chosen = exported_instead(student.val_accuracy, challenger["val_accuracy"], settings.tolerance)
        mlflow.log_metrics(
            {
                "best_val_accuracy": student.val_accuracy,
                "test_accuracy": student.test_accuracy,
                "train_seconds": student.train_seconds,
                "exported": float(chosen),
            }
        )
    save_weights(student.model, DISTILL_WEIGHTS)
    verdict = "within" if chosen else "beyond"
    reason = (
        f"one view {student.val_accuracy:.4f} against {views} views {challenger['val_accuracy']:.4f} on validation, "
        f"{verdict} distill.tolerance ({settings.tolerance} points)"
    )
    write_json(
        {
            **record,
            "run_id": active.info.run_id,
            "student_val_accuracy": student.val_accuracy,
            "student_test_accuracy": student.test_accuracy,
            "train_seconds": round(student.train_seconds, 1),
            "history": student.history,
            "exported": chosen,
            "reason": reason,
        },
        DISTILL_FILE,
    )
    log.info("%s: %s; the export stage exports %s", name, reason, "the student" if chosen else "the challenger")


if __name__ == "__main__":
    run(main)

"""train stage (one per zoo model): trains on the CPU or CUDA (or data-parallel under `torchrun`), early
stopping restoring the best weights; one MLflow run per model (params, per-epoch curves, dataset inputs,
system metrics, the model); the best weights, the curves and a summary on disk."""

import csv
import logging
import sys
from pathlib import Path

from common.files import read_json, write_json
from pipelines._stage import run
from training.checkpoint import save_weights
from training.config import CARD_FILE, CURVES_DIR, DATASET_FILE, Params, summary_path, weights_path
from training.data import Prepared
from training.distributed import process_group
from training.fit import train_zoo_model

log = logging.getLogger("train")


def write_curves(history: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def main() -> None:
    name = sys.argv[1]
    params = Params.load()
    with process_group() as distributed:
        trained = train_zoo_model(params, name, Prepared.load(DATASET_FILE), read_json(CARD_FILE), distributed)
    if trained is None:  # a torchrun worker: the main rank writes the outputs
        return
    save_weights(trained.model, weights_path(name))
    write_curves(trained.history, CURVES_DIR / f"{name}.csv")
    write_json(trained.summary, summary_path(name))
    summary = trained.summary
    log.info(
        "%s: best val_acc %.4f at epoch %d (%d params, %.0fs)",
        name,
        summary["best_val_accuracy"],
        summary["best_epoch"],
        summary["parameters"],
        summary["train_seconds"],
    )


if __name__ == "__main__":
    run(main)

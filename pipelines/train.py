"""train stage (one per zoo model): train, save the best weights, log everything to MLflow."""
import csv
import dataclasses
import logging
import sys

import mlflow
import torch

from pipelines._stage import run
from training import tracking
from training.checkpoint import read_json, save_weights, summary_path, weights_path, write_json
from training.config import (CARD_FILE, CURVES_DIR, DATASET_FILE, architecture_options, experiment_name,
                             load_params, train_config)
from training.data import Prepared
from training.distributed import process_group
from training.models import build_model, count_parameters
from training.trainer import TrainResult, seed_everything, train

log = logging.getLogger("train")


def write_curves(history: list[dict], path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def main() -> None:
    name = sys.argv[1]
    params = load_params()
    card = read_json(CARD_FILE)
    data = Prepared.load(DATASET_FILE)
    config = train_config(params, name)
    options = architecture_options(params, name)
    seed_everything(config.seed)
    model = build_model(name, options, card["pixel_mean"], card["pixel_std"])
    tensors = {k: torch.from_numpy(v) for k, v in data.arrays.items()}
    with process_group() as distributed:
        if not distributed.is_main:  # a torchrun worker: trains its shard, logs and writes nothing
            train(model, tensors["x_train"], tensors["y_train"], tensors["x_val"], tensors["y_val"], config,
                  desc=name, distributed=distributed)
            return
        n_params = count_parameters(model)
        tracking.setup(experiment_name(params))
        with tracking.start_run(run_name=name, tags=tracking.run_tags(card["sha256"])) as active:
            mlflow.log_params(tracking.flatten({
                "model": {"name": name, **options}, "train": dataclasses.asdict(config), "data": params["data"],
            }))
            mlflow.log_params({"model.parameters": n_params, "distributed.world_size": distributed.world_size})
            result = train(
                model, tensors["x_train"], tensors["y_train"], tensors["x_val"], tensors["y_val"], config,
                on_epoch_end=lambda record: mlflow.log_metrics(
                    {k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"]),
                desc=name, distributed=distributed,
            )
            record_run(name, result, n_params, active.info.run_id, tensors["x_val"][:2].numpy())


def record_run(name: str, result: TrainResult, n_params: int, run_id: str, example) -> None:
    """The best weights, curves and summary on disk, the model and summary metrics in MLflow."""
    model = result.model.cpu().to(memory_format=torch.contiguous_format).eval()
    save_weights(model, weights_path(name))
    write_curves(result.history, CURVES_DIR / f"{name}.csv")
    best = result.history[result.best_epoch - 1]
    summary = {
        "model": name,
        "run_id": run_id,
        "parameters": n_params,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "best_val_accuracy": best["val_accuracy"],
        "train_seconds": round(result.train_seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
    }
    mlflow.log_metrics({k: float(summary[k]) for k in
                        ("best_val_accuracy", "best_epoch", "train_seconds", "images_per_second")})
    info = mlflow.pytorch.log_model(
        model, name="model", input_example=example, serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    summary["model_uri"] = info.model_uri
    write_json(summary, summary_path(name))
    log.info("%s: best val_acc %.4f at epoch %d (%d params, %.0fs)", name, best["val_accuracy"],
             result.best_epoch, n_params, result.train_seconds)


if __name__ == "__main__":
    run(main)

"""One zoo model trained as one MLflow run: params, per-epoch curves, summary metrics and the model logged."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import torch

from training import tracking
from training.checkpoint import new_model
from training.config import Params
from training.data import Prepared
from training.distributed import Distributed
from training.models import count_parameters
from training.trainer import seed_everything, train


@dataclass
class TrainedModel:
    """A trained model (best epoch's weights, on the CPU), its per-epoch history and its run summary."""

    model: torch.nn.Module
    history: list[dict]
    summary: dict


def train_zoo_model(
    params: Params, name: str, prepared: Prepared, card: dict, distributed: Distributed
) -> TrainedModel | None:
    """Train zoo model `name` on the prepared data; the main rank logs it to MLflow and gets the result,
    any other torchrun rank trains its shard and gets None."""
    config = params.train_config(name)
    seed_everything(config.seed)
    model = new_model(name, params, card)
    x_train, y_train, x_val, y_val = (
        torch.from_numpy(prepared.arrays[k]) for k in ("x_train", "y_train", "x_val", "y_val")
    )
    if not distributed.is_main:
        train(model, x_train, y_train, x_val, y_val, config, desc=name, distributed=distributed)
        return None
    n_params = count_parameters(model)
    tracking.setup(params.experiment_name)
    with tracking.start_run(run_name=name, tags=tracking.run_tags(card["sha256"]), log_system_metrics=True) as active:
        splits = {"train": "train", "validation": "val", "test": "test"}  # MLflow's context: our split name
        digests = {context: prepared.digest(split) for context, split in splits.items()}
        tracking.log_datasets(card["dataset"], digests, params.data.spec.home)
        mlflow.log_params(
            tracking.flatten(
                {
                    "model": {"name": name, **params.model_entry(name).model_dump(exclude={"train"})},
                    "train": config.model_dump(),
                    "data": params.data.model_dump(),
                }
            )
        )
        mlflow.log_params({"model.parameters": n_params, "distributed.world_size": distributed.world_size})
        result = train(
            model,
            x_train,
            y_train,
            x_val,
            y_val,
            config,
            on_epoch_end=log_epoch,
            desc=name,
            distributed=distributed,
        )
        trained = result.model.cpu().to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
        best = result.history[result.best_epoch - 1]
        summary = {
            "model": name,
            "run_id": active.info.run_id,
            "parameters": n_params,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "best_val_accuracy": best["val_accuracy"],
            "train_seconds": round(result.train_seconds, 2),
            "images_per_second": round(result.images_per_second, 1),
        }
        summary["model_uri"] = log_trained_model(trained, summary, prepared.images("val")[:2])
    return TrainedModel(trained, result.history, summary)


def log_trained_model(model: torch.nn.Module, summary: dict, example: np.ndarray) -> str:
    """The summary metrics and the model (PyTorch 2 program, with an input example) in the active run."""
    mlflow.log_metrics(
        {k: float(summary[k]) for k in ("best_val_accuracy", "best_epoch", "train_seconds", "images_per_second")}
    )
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example,
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    return info.model_uri


def log_epoch(record: dict) -> None:
    """One epoch's curves in the active run, at step = epoch."""
    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])

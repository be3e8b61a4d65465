"""Distillation: the challenger fine-tuned to give, from one view of an image, the answer its test-time views give,
so that the exported graph runs the network once per image instead of once per view."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from training.config import Params, TrainConfig
from training.data import Prepared
from training.evaluation import loss_and_accuracy, predict_logits
from training.models import TestTimeAugmented
from training.progress import progress
from training.trainer import Distillation, seed_everything, train

CHUNK_IMAGES = 4096  # teacher answers computed (and reported) this many training images at a time


def student_config(params: Params, name: str) -> TrainConfig:
    """Model `name`'s own recipe for `distill.epochs` at `distill.lr` and no early stopping (the best validation
    epoch is kept all the same). Its only augmentation is the mirror, where the teacher's views include it: their
    set is then the same for an image and its mirror, and so is the teacher's answer; shifts and erasing would
    change the answer the student is taught."""
    update = {
        "epochs": params.distill.epochs,
        "lr": params.distill.lr,
        "translate": 0,
        "hflip": params.tta_for(name).flip,
        "erase": 0.0,
    }
    return params.train_config(name).model_copy(update={**update, "patience": 0})


def teacher_logits(teacher: TestTimeAugmented, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """The teacher's logits, the mean over its views, for every image, with progress."""
    batch_of_views = max(1, batch_size // teacher.views)
    starts = range(0, len(images), CHUNK_IMAGES)
    chunks = [
        predict_logits(teacher, torch.from_numpy(images[start : start + CHUNK_IMAGES]), batch_of_views)
        for start in progress(starts, f"teacher answers ({teacher.views} views)", unit="chunk")
    ]
    return torch.cat(chunks)


@dataclass
class Student:
    model: torch.nn.Module  # the best validation epoch's weights, on the CPU, in eval mode
    history: list[dict]
    val_accuracy: float  # one view
    test_accuracy: float
    train_seconds: float


def distill(
    teacher: TestTimeAugmented,
    prepared: Prepared,
    params: Params,
    name: str,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> Student:
    """A copy of the teacher's network trained on its answers for the training images (`distill` params)."""
    config = student_config(params, name)
    seed_everything(config.seed)
    soft_targets = teacher_logits(teacher, prepared.images("train"), params.evaluate.batch_size)
    student = copy.deepcopy(teacher.net)  # the teacher's own weights to start from
    x_train, y_train, x_val, y_val = (
        torch.from_numpy(prepared.arrays[k]) for k in ("x_train", "y_train", "x_val", "y_val")
    )
    distillation = Distillation(soft_targets, params.distill.temperature, params.distill.weight)
    result = train(
        student,
        x_train,
        y_train,
        x_val,
        y_val,
        config,
        on_epoch_end,
        desc=f"{name} distilled",
        distillation=distillation,
    )
    model = result.model.cpu().to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    test_logits = predict_logits(model, torch.from_numpy(prepared.images("test")), config.eval_batch_size)
    _, test_accuracy = loss_and_accuracy(test_logits, torch.from_numpy(prepared.labels("test")).long())
    best = result.history[result.best_epoch - 1]
    return Student(model, result.history, best["val_accuracy"], test_accuracy, result.train_seconds)


def exported_instead(student_val_accuracy: float, teacher_val_accuracy: float, tolerance_points: float) -> bool:
    """Whether the one-view student replaces the challenger in the export: its validation accuracy is at most
    `tolerance_points` below the challenger's with its views."""
    return student_val_accuracy >= teacher_val_accuracy - tolerance_points / 100

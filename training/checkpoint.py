"""Trained weights on disk: written atomically, read back with `weights_only=True` (no unpickling)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.config import Params, weights_path
from training.models import TestTimeAugmented, build_model


def save_weights(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def new_model(name: str, params: Params, card: dict) -> torch.nn.Sequential:
    """The zoo model `name`, freshly initialised, for the dataset the prepared data's card describes."""
    return build_model(params.model_entry(name), len(card["class_names"]), card["pixel_mean"], card["pixel_std"])


def load_trained(name: str, params: Params, card: dict, weights: Path | None = None) -> torch.nn.Sequential:
    """The zoo model `name` with its trained weights (or those in `weights`), in eval mode, on the CPU."""
    model = new_model(name, params, card)
    model.load_state_dict(torch.load(weights or weights_path(name), map_location="cpu", weights_only=True))
    return model.eval()


def load_augmented(name: str, params: Params, card: dict) -> TestTimeAugmented:
    """The trained model averaged over the test-time views that model `name` gets, as it is exported."""
    return TestTimeAugmented(load_trained(name, params, card), params.tta_for(name)).eval()

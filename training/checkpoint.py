"""Trained weights on disk: written atomically, read back with `weights_only=True` (no unpickling)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.config import Params, weights_path
from training.models import FlipAveraged, build_model


def save_weights(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def load_trained(name: str, params: Params, card: dict, flip_tta: bool = False) -> torch.nn.Module:
    """The zoo model `name` with its trained weights, in eval mode, on the CPU; with `flip_tta` it
    averages its logits over each image and its mirror image."""
    model = build_model(name, params.architecture_options(name), card["pixel_mean"], card["pixel_std"])
    model.load_state_dict(torch.load(weights_path(name), map_location="cpu", weights_only=True))
    return (FlipAveraged(model) if flip_tta else model).eval()

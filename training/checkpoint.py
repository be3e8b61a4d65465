"""Trained weights on disk: written atomically, read back with `weights_only=True` (no unpickling)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from training.config import MODELS_DIR, architecture_options
from training.models import FlipAveraged, build_model


def weights_path(name: str) -> Path:
    return MODELS_DIR / name / "weights.pt"


def summary_path(name: str) -> Path:
    return MODELS_DIR / name / "train.json"


def save_weights(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def load_trained(name: str, params: dict, card: dict, flip_tta: bool = False) -> torch.nn.Module:
    """The zoo model `name` with its trained weights, in eval mode, on the CPU; with `flip_tta` it
    averages its logits over each image and its mirror image."""
    model = build_model(name, architecture_options(params, name), card["pixel_mean"], card["pixel_std"])
    model.load_state_dict(torch.load(weights_path(name), map_location="cpu", weights_only=True))
    return (FlipAveraged(model) if flip_tta else model).eval()


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)

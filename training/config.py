"""params.yaml, read once: the effective settings of each stage and each zoo model."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from training.datasets import DatasetSpec, get_spec
from training.trainer import TrainConfig

PARAMS_FILE = Path("params.yaml")

# Where each stage writes (relative to the repo root, where DVC runs the stages).
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
DATASET_FILE = PREPARED_DIR / "dataset.npz"
CARD_FILE = PREPARED_DIR / "card.json"
SAMPLES_FILE = PREPARED_DIR / "samples.png"
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
CURVES_DIR = Path("plots/curves")
PREDICTIONS_DIR = Path("plots/predictions")
REPORTS_DIR = Path("reports")
CHAMPION_FILE = Path("champion.json")
EXPORT_DIR = Path("export")


def load_params(path: Path = PARAMS_FILE) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def dataset_spec(params: dict) -> DatasetSpec:
    return get_spec(params["data"]["dataset"])


def model_params(params: dict, name: str) -> dict:
    """The model's own entry: architecture options plus optional `train` overrides."""
    if name not in params.get("models", {}):
        raise ValueError(f"params.yaml has no entry models.{name}")
    return copy.deepcopy(params["models"][name] or {})


def train_config(params: dict, name: str) -> TrainConfig:
    """Shared `train` params, then the model's overrides; hflip only where the dataset allows it."""
    values = {**params["train"], **model_params(params, name).get("train", {})}
    config = TrainConfig.from_dict(values)
    config.hflip = config.hflip and dataset_spec(params).hflip_ok
    return config


def architecture_options(params: dict, name: str) -> dict:
    options = model_params(params, name)
    options.pop("train", None)
    return options


def experiment_name(params: dict) -> str:
    return params["mlflow"]["experiment"].format(dataset=params["data"]["dataset"])


def registered_model_name(params: dict) -> str:
    return params["mlflow"]["registered_model"].format(dataset=params["data"]["dataset"])

"""params.yaml, read once: the effective settings of each stage and each zoo model."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from training.datasets import DatasetSpec, get_spec
from training.trainer import TrainConfig

PARAMS_FILE = Path("params.yaml")
PRESETS_DIR = Path("pipelines/presets")

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
EVALUATION_DIR = REPORTS_DIR / "evaluation"  # one folder per model, written by its evaluate stage
REPORT_FILE = REPORTS_DIR / "report.md"  # the pipeline report, written by the select stage
REPORT_FIGURES_DIR = REPORTS_DIR / "figures"
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


def flip_tta(params: dict, group: str, name: str) -> bool:
    """Whether `group` (evaluate or export) averages model `name` over each image and its mirror image:
    asked for, and the model learned from mirrored images (hflip, which the dataset must allow)."""
    return bool(params[group].get("tta", False)) and train_config(params, name).hflip


def experiment_name(params: dict) -> str:
    return params["mlflow"]["experiment"].format(dataset=params["data"]["dataset"])


def registered_model_name(params: dict) -> str:
    return params["mlflow"]["registered_model"].format(dataset=params["data"]["dataset"])


def preset_overrides(name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, object]:
    """A preset: dotted params.yaml keys and their values, as `dvc exp run -S key=value` takes them."""
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets_dir.glob("*.yaml"))
        raise ValueError(f"no preset {name!r} ({path}); presets: {known}")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def apply_overrides(params: dict, overrides: dict[str, object]) -> dict:
    """params.yaml as it is with `overrides` set; every key must already exist (a typo is an error)."""
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ValueError(f"preset key {dotted!r} is not in params.yaml")
        node[leaf] = value
    return params

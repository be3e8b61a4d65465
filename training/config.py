"""params.yaml, read and validated once: one typed settings object per group, and where each stage writes.

params.yaml holds every default; the dataclasses here have none, so a value lives in exactly one place.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from training.datasets import DatasetSpec, get_spec
from training.errors import ConfigError

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

OPTIMIZERS = ("sgd", "sgd_momentum", "adagrad", "adam", "adamw")
SCHEDULES = ("none", "cosine", "onecycle")


def weights_path(name: str) -> Path:
    return MODELS_DIR / name / "weights.pt"


def summary_path(name: str) -> Path:
    return MODELS_DIR / name / "train.json"


Settings = TypeVar("Settings")


def _check_type(value: Any, expected: Any, where: str) -> Any:
    """`value` as the settings field of type `expected` takes it; a nested group becomes its dataclass."""
    if isinstance(expected, type) and dataclasses.is_dataclass(expected):
        return build(expected, value, where)
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} is {value!r}; expected {expected}")
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ConfigError(f"{where} is {value!r}; expected a {origin.__name__}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where} is {value!r}; expected {expected.__name__}")
    return value


def build(cls: type[Settings], values: Any, where: str) -> Settings:
    """The settings dataclass `cls` from a params.yaml group: every key known, none missing, types checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of settings, not {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown, missing = set(values) - set(names), set(names) - set(values)
    if unknown:
        raise ConfigError(f"unknown {where} params {sorted(unknown)}; known: {sorted(names)}")
    if missing:
        raise ConfigError(f"params.yaml is missing {where} params {sorted(missing)}")
    return cls(**{name: _check_type(values[name], hints[name], f"{where}.{name}") for name in names})


@dataclass(frozen=True)
class SplitFiles:
    train: str
    test: str


@dataclass(frozen=True)
class SubsetSizes:
    train: int  # stratified subsets for quick runs; 0 keeps every image
    test: int


@dataclass(frozen=True)
class DataSettings:
    dataset: str
    mirror: str
    val_size: int | float  # a count of images, or a fraction when below 1
    seed: int
    subset: SubsetSizes
    csv: SplitFiles

    @property
    def spec(self) -> DatasetSpec:
        return get_spec(self.dataset)


@dataclass
class TrainConfig:
    """One model's training settings: the `train` group with the model's own overrides applied."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    label_smoothing: float
    patience: int  # epochs without validation improvement before stopping; 0 = never stop early
    min_delta: float
    translate: int  # random translation, in pixels
    hflip: bool  # only honoured where the dataset allows it
    erase: float  # fraction of images with one random rectangle blacked out
    amp: bool  # bf16 autocast where the device computes bf16 natively (CUDA, AVX512/AMX CPUs)
    channels_last: bool
    compile: bool  # torch.compile the training step (minutes of compiling; pays off on GPUs)
    device: str
    seed: int
    verbose: str | int  # 0 silent, 1 progress bar, 2 one line per epoch; auto: bar on a terminal
    eval_batch_size: int

    @classmethod
    def from_dict(cls, values: dict, where: str = "train") -> TrainConfig:
        config = build(cls, values, where)
        if config.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {config.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if config.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {config.schedule!r}; choose one of {list(SCHEDULES)}")
        return config


@dataclass(frozen=True)
class DistributedSettings:
    launcher: str


@dataclass(frozen=True)
class TtaSettings:
    """Test-time augmentation, one setting for the evaluate stage and the exported graph alike."""

    flip: bool  # the mirror images too (models trained with hflip only)
    shift: int  # copies shifted this many pixels up, down, left and right (models trained with translate)

    @property
    def views(self) -> int:
        return (1 + 4 * (self.shift > 0)) * (1 + self.flip)

    def describe(self) -> str:
        kinds = ["mirror"] * self.flip + [f"{self.shift}-pixel shifts"] * (self.shift > 0)
        return f"{' and '.join(kinds)}: {self.views} views" if kinds else "none"


@dataclass(frozen=True)
class EvaluateSettings:
    batch_size: int
    misclassified: int


@dataclass(frozen=True)
class MlflowSettings:
    experiment: str
    registered_model: str
    alias: str


@dataclass(frozen=True)
class Int8Settings:
    calibration_images: int  # training images the static quantization calibrates on
    max_accuracy_drop: float  # test accuracy (a fraction) the int8 model may lose against fp32
    min_agreement: float  # fraction of test images on which int8 and fp32 must predict the same class


@dataclass(frozen=True)
class ExportSettings:
    parity_atol: float
    bentoml_model: str
    int8: Int8Settings


@dataclass(frozen=True)
class Params:
    """Every params.yaml group, validated; each zoo model's effective settings on demand."""

    data: DataSettings
    zoo: list[str]
    train: dict[str, Any]  # shared by every model; see train_config
    models: dict[str, Any]
    distributed: DistributedSettings
    tta: TtaSettings
    evaluate: EvaluateSettings
    mlflow: MlflowSettings
    export: ExportSettings

    @classmethod
    def from_dict(cls, values: dict) -> Params:
        params = build(cls, values, "params.yaml")
        get_spec(params.data.dataset)  # an unknown dataset fails here, once
        if params.tta.shift < 0:
            raise ConfigError(f"tta.shift is {params.tta.shift}; it counts pixels, 0 or more")
        for name in params.zoo:
            params.train_config(name)
        return params

    @classmethod
    def load(cls, path: Path = PARAMS_FILE) -> Params:
        return cls.from_dict(load_params(path))

    def model_entry(self, name: str) -> dict:
        """The model's own entry: architecture options plus optional `train` overrides."""
        if name not in self.models:
            raise ConfigError(f"params.yaml has no entry models.{name}")
        return copy.deepcopy(self.models[name] or {})

    def train_config(self, name: str) -> TrainConfig:
        """Shared `train` params, then the model's overrides; hflip only where the dataset allows it."""
        values = {**self.train, **self.model_entry(name).get("train", {})}
        config = TrainConfig.from_dict(values, where=f"train (models.{name})")
        config.hflip = config.hflip and self.data.spec.hflip_ok
        return config

    def architecture_options(self, name: str) -> dict:
        options = self.model_entry(name)
        options.pop("train", None)
        return options

    def tta_for(self, name: str) -> TtaSettings:
        """The test-time augmentation model `name` gets: the `tta` group's views, each only where the model
        learned from such images: mirrors with hflip (which the dataset must allow), shifts with translate."""
        config = self.train_config(name)
        shift = self.tta.shift if config.translate >= self.tta.shift else 0
        return TtaSettings(flip=self.tta.flip and config.hflip, shift=shift)

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment.format(dataset=self.data.dataset)

    @property
    def registered_model_name(self) -> str:
        return self.mlflow.registered_model.format(dataset=self.data.dataset)

    @property
    def bentoml_model_name(self) -> str:
        return self.export.bentoml_model.format(dataset=self.data.dataset)


def load_params(path: Path = PARAMS_FILE) -> dict:
    """params.yaml as plain data (what presets and `dvc exp run -S` edit)."""
    with open(path) as f:
        return yaml.safe_load(f)


def preset_overrides(name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, object]:
    """A preset: dotted params.yaml keys and their values, as `dvc exp run -S key=value` takes them."""
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets_dir.glob("*.yaml"))
        raise ConfigError(f"no preset {name!r} ({path}); presets: {known}")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def apply_overrides(params: dict, overrides: dict[str, object]) -> dict:
    """params.yaml as it is with `overrides` set; every key must already exist (a typo is an error)."""
    params = copy.deepcopy(params)
    node: Any
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"preset key {dotted!r} is not in params.yaml")
        node[leaf] = value
    return params

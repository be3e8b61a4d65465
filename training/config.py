"""params.yaml, read and validated once: one typed settings model per group, and where each stage writes.

params.yaml holds every default; the models here have none, so a value lives in exactly one place. Every
group refuses keys it does not know (pydantic's `extra="forbid"`), and each entry of `models:` is checked
against the options of its `architecture`, so a typo stops the pipeline with one line naming it.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.datasets import DATASETS, FOLDERS, DatasetSpec, folders_spec, get_spec
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
CONTRAST_DIR = Path("data/contrast")  # the contrast dataset's test images, for the OOD score's AUROC
CHALLENGER_FILE = Path("challenger.json")  # the select stage's choice, which the gate stage weighs
CHAMPION_FILE = Path("champion.json")  # the served model: the gate stage's decision
OWN_DIR = Path("data/own")  # `data.dataset: folders`: the user's own dataset, as image folders
EXTRA_DIR = Path("data/extra")  # image folders of extra training data (`data.extra`), feedback's among them
FEEDBACK_DIR = EXTRA_DIR / "feedback"  # `make feedback-data`: labelled predictions of the prediction log
DISTILL_DIR = Path("distill")  # the distill stage's student: the challenger distilled to one view
DISTILL_WEIGHTS = DISTILL_DIR / "weights.pt"
DISTILL_FILE = Path("distill.json")  # the distill stage's figures, and whether the export stage exports the student
EXPORT_DIR = Path("export")

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Points = Annotated[float, Field(ge=0, le=100)]  # percentage points of accuracy
Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid"]
Init = Literal["he", "xavier", "zeros"]  # zeros makes every unit identical: the net cannot learn
Optimizer = Literal["sgd", "sgd_momentum", "adagrad", "adam", "adamw"]
Schedule = Literal["none", "cosine", "onecycle"]


def weights_path(name: str) -> Path:
    return MODELS_DIR / name / "weights.pt"


def summary_path(name: str) -> Path:
    return MODELS_DIR / name / "train.json"


class Group(BaseModel):
    """A params.yaml group: every key known, none missing, types checked (strictly: no bool for a number)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SplitFiles(Group):
    train: str
    test: str


class SubsetSizes(Group):
    train: Count  # stratified subsets for quick runs; 0 keeps every image
    test: Count


def count_or_fraction(size: float) -> float:
    """A split's size: a count of images (1 or more), or a fraction between 0 and 1."""
    if not (0 < size < 1 or (isinstance(size, int) and size >= 1)):
        raise ValueError("expected a count of images (1 or more) or a fraction between 0 and 1")
    return size


def under(folder: str, parent: Path, why: str) -> str:
    """`folder`, checked to lie in `parent` (a stage dependency, so that DVC sees its files change)."""
    path = Path(folder)
    if path.is_absolute() or parent not in path.parents:
        raise ValueError(f"this folder goes in {parent}/ ({why})")
    return folder


class FolderDataset(Group):
    """`data.dataset: folders`: the user's own images, `<folder>/<class name>/<image>`, 2 to 100 classes."""

    name: str  # names the MLflow experiment, the registered model and the BentoML model
    train: str
    test: str  # "": a seeded stratified `test_size` of `train` is the test set
    test_size: int | float
    hflip: bool  # whether a mirrored image is still of its class: the models' hflip and the mirror TTA view

    _test_size = field_validator("test_size")(count_or_fraction)

    @field_validator("name")
    @classmethod
    def _a_name_for_every_store(cls, name: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
            raise ValueError("lowercase letters, digits, '.', '_' and '-' (a BentoML model's name is made of it)")
        return name

    @field_validator("train", "test")
    @classmethod
    def _where_dvc_sees_them(cls, folder: str) -> str:
        return folder and under(folder, OWN_DIR, "the prepare stage's dependency")


class DataSettings(Group):
    dataset: str
    contrast: str  # a dataset unlike `dataset`, whose test images measure the OOD score: auto, a name, or ""
    mirror: str
    val_size: int | float  # a count of images, or a fraction when below 1
    seed: int
    subset: SubsetSizes
    csv: SplitFiles
    extra: list[str]  # image folders under data/extra/, `<folder>/<class name>/<image>`, added to the training data
    extra_holdout: Annotated[float, Field(gt=0, lt=1)]  # share of each extra folder held out as its own test set
    folders: FolderDataset

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name != FOLDERS:
            cls._official(name)
        return name

    @field_validator("contrast")
    @classmethod
    def _known_contrast(cls, name: str) -> str:
        if name not in ("auto", ""):
            cls._official(name)
        return name

    @staticmethod
    def _official(name: str) -> None:
        try:
            get_spec(name)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _one_source(self) -> DataSettings:
        if self.from_folders and (self.csv.train or self.csv.test):
            raise ValueError("data.csv holds the official datasets' classes; with dataset: folders, leave it empty")
        return self

    @field_validator("extra")
    @classmethod
    def _extra_under_data_extra(cls, folders: list[str]) -> list[str]:
        names = [Path(folder).name for folder in folders]
        for folder in folders:
            path = Path(folder)
            if path.is_absolute() or path.parent != EXTRA_DIR:
                raise ValueError(f"{folder!r}: an extra folder goes in {EXTRA_DIR}/ (the prepare stage's dependency)")
            if not re.fullmatch(r"[A-Za-z0-9_-]+", path.name):
                raise ValueError(f"{folder!r}: a folder name of letters, digits, - and _ (it names its held-out set)")
        if len(set(names)) != len(names):
            raise ValueError(f"two extra folders of one name: {names}")
        return folders

    _val_size = field_validator("val_size")(count_or_fraction)

    @property
    def from_folders(self) -> bool:
        return self.dataset == FOLDERS

    @property
    def name(self) -> str:
        """The dataset's name: an official one's, or `data.folders.name`."""
        return self.folders.name if self.from_folders else self.dataset

    @property
    def spec(self) -> DatasetSpec:
        if self.from_folders:
            return folders_spec(self.folders.name, self.folders.train, self.folders.hflip)
        return get_spec(self.dataset)

    @property
    def contrast_spec(self) -> DatasetSpec | None:
        """`contrast` resolved: auto is the other official dataset (MNIST digits for Fashion-MNIST and back), and
        none for image folders, which may hold anything."""
        if self.contrast == "auto":
            return None if self.from_folders else next(s for n, s in DATASETS.items() if n != self.dataset)
        return get_spec(self.contrast) if self.contrast else None


class TrainConfig(Group):
    """One model's training settings: the `train` group with the model's own overrides applied."""

    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Optimizer
    lr: Annotated[float, Field(gt=0)]
    momentum: Fraction
    weight_decay: Annotated[float, Field(ge=0)]
    schedule: Schedule
    label_smoothing: Fraction
    patience: Count  # epochs without validation improvement before stopping; 0 = never stop early
    min_delta: Annotated[float, Field(ge=0)]
    translate: Count  # random translation, in pixels
    hflip: bool  # only honoured where the dataset allows it
    erase: Fraction  # fraction of images with one random rectangle blacked out
    amp: bool  # bf16 autocast where the device computes bf16 natively (CUDA, AVX512/AMX CPUs)
    channels_last: bool
    compile: bool  # torch.compile the training step (minutes of compiling; pays off on GPUs)
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
    seed: int
    verbose: Literal["auto", 0, 1, 2]  # 0 silent, 1 progress bar, 2 one line per epoch; auto: bar on a terminal
    eval_batch_size: PositiveInt


class ModelOptions(Group):
    """What every zoo entry has: its architecture's options, and `train:` overrides of the shared group."""

    init: Init
    train: dict[str, Any] = Field(default_factory=dict)  # checked key by key in Params.train_config


class MlpLinear(ModelOptions):
    """784 -> hidden -> classes with no activation: a linear model however many layers it has."""

    architecture: Literal["mlp_linear"]
    hidden: PositiveInt


class Mlp(ModelOptions):
    architecture: Literal["mlp"]
    hidden: list[PositiveInt]
    activation: Activation
    dropout: Fraction
    batch_norm: bool


class CnnBasic(ModelOptions):
    architecture: Literal["cnn_basic"]
    activation: Activation
    dropout: Fraction
    batch_norm: bool


class CnnDeep(ModelOptions):
    architecture: Literal["cnn_deep"]
    widths: list[PositiveInt]
    dense: PositiveInt
    activation: Activation
    dropout: Fraction
    dense_dropout: Fraction
    batch_norm: bool
    global_pool: bool


class ResNet(ModelOptions):
    architecture: Literal["resnet"]
    stem: PositiveInt
    stem_stride: Literal[1, 2]
    widths: list[PositiveInt]
    blocks: list[PositiveInt]
    dropout: Fraction

    @model_validator(mode="after")
    def _a_block_count_per_width(self) -> ResNet:
        if len(self.widths) != len(self.blocks):
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} must have one entry per stage each")
        return self


Architecture = Annotated[MlpLinear | Mlp | CnnBasic | CnnDeep | ResNet, Field(discriminator="architecture")]


class DistributedSettings(Group):
    launcher: str


class TtaSettings(Group):
    """Test-time augmentation, one setting for the evaluate stage and the exported graph alike."""

    flip: bool  # the mirror images too (models trained with hflip only)
    shift: Count  # copies shifted this many pixels up, down, left and right (models trained with translate)

    @property
    def views(self) -> int:
        return (1 + 4 * (self.shift > 0)) * (1 + self.flip)

    def describe(self) -> str:
        kinds = ["mirror"] * self.flip + [f"{self.shift}-pixel shifts"] * (self.shift > 0)
        return f"{' and '.join(kinds)}: {self.views} views" if kinds else "none"


class DistillSettings(Group):
    """The challenger fine-tuned to give its test-time views' answers from one view (its own training recipe,
    without augmentation, from its trained weights), exported in its place when it is good enough."""

    epochs: Count  # 0: off
    lr: Annotated[float, Field(gt=0)]  # the one-cycle peak
    temperature: Annotated[float, Field(gt=0)]
    weight: Fraction  # the teacher's share of the loss; the rest is cross-entropy with the labels
    tolerance: Points  # validation points the one-view student may lose against the challenger with its views


class EvaluateSettings(Group):
    batch_size: PositiveInt
    misclassified: Count


class MlflowSettings(Group):
    experiment: str
    registered_model: str
    alias: str


class Int8Settings(Group):
    calibration_images: PositiveInt  # training images the static quantization calibrates on
    # test accuracy (a fraction) the int8 model may lose against fp32; below 0, what it must gain
    max_accuracy_drop: Annotated[float, Field(ge=-1, le=1)]
    min_agreement: Fraction  # fraction of test images on which int8 and fp32 must predict the same class


class OodSettings(Group):
    fit_images: PositiveInt  # training images the score's class means and covariances are fitted on
    false_positive_rate: Annotated[float, Field(gt=0, lt=1)]  # validation images the threshold flags
    parity_rtol: Annotated[float, Field(gt=0)]  # max |s_onnx - s_torch| / max(1, |s_torch|) over the test set


GateMode = Literal["promote", "shadow", "record"]
Alpha = Annotated[float, Field(gt=0, lt=1)]


class GateSettings(Group):
    mode: GateMode  # what a challenger that passes becomes: the champion, the `challenger` alias, or nothing
    experiment_mode: GateMode  # the mode under `dvc exp run`
    precision: Literal["auto", "fp32", "int8"]  # the file judged; auto: what the service serves on this machine
    tolerance: Points  # points the challenger may lose on the official test set...
    holdout_tolerance: Points  # ...and on each extra folder's held-out share...
    alpha: Alpha  # ...where McNemar's test finds the loss significant at this level


class PromoteSettings(Group):
    """`make promote`: the shadowed challenger against the champion on labelled live traffic."""

    min_labels: PositiveInt  # labelled predictions both models answered
    tolerance: Points  # points the challenger may lose on them...
    alpha: Alpha  # ...where McNemar's test finds the loss significant at this level


class MonitorSettings(Group):
    min_live_accuracy: Fraction
    min_new_labels: Count


class ExportSettings(Group):
    parity_atol: Annotated[float, Field(gt=0)]
    bentoml_model: str
    int8: Int8Settings
    ood: OodSettings


class Params(Group):
    """Every params.yaml group, validated; each zoo model's effective settings on demand."""

    data: DataSettings
    zoo: list[str]
    train: TrainConfig  # shared by every model; see train_config
    models: dict[str, Architecture]
    distributed: DistributedSettings
    tta: TtaSettings
    distill: DistillSettings
    evaluate: EvaluateSettings
    mlflow: MlflowSettings
    export: ExportSettings
    gate: GateSettings
    promote: PromoteSettings
    monitor: MonitorSettings

    @classmethod
    def from_dict(cls, values: Any) -> Params:
        """The validated params, or a ConfigError naming the first key that is wrong, in one line."""
        try:
            params = cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(describe_error(exc, cls)) from None
        missing = [name for name in params.zoo if name not in params.models]
        if missing:
            raise ConfigError(f"params.yaml: zoo names {missing}, with no entry under models ({list(params.models)})")
        for name in params.models:
            params.train_config(name)
        return params

    @classmethod
    def load(cls, path: Path = PARAMS_FILE) -> Params:
        return cls.from_dict(load_params(path))

    def model_entry(self, name: str) -> ModelOptions:
        if name not in self.models:
            raise ConfigError(f"params.yaml has no entry models.{name}")
        return self.models[name]

    def train_config(self, name: str) -> TrainConfig:
        """Shared `train` params, then the model's overrides; hflip only where the dataset allows it."""
        values = {**self.train.model_dump(), **self.model_entry(name).train}
        try:
            config = TrainConfig.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(describe_error(exc, TrainConfig, ("models", name, "train"))) from None
        return config.model_copy(update={"hflip": config.hflip and self.data.spec.hflip_ok})

    def tta_for(self, name: str) -> TtaSettings:
        """The test-time augmentation model `name` gets: the `tta` group's views, each only where the model
        learned from such images: mirrors with hflip (which the dataset must allow), shifts with translate."""
        config = self.train_config(name)
        shift = self.tta.shift if config.translate >= self.tta.shift else 0
        return TtaSettings(flip=self.tta.flip and config.hflip, shift=shift)

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment.format(dataset=self.data.name)

    @property
    def registered_model_name(self) -> str:
        return self.mlflow.registered_model.format(dataset=self.data.name)

    @property
    def bentoml_model_name(self) -> str:
        return self.export.bentoml_model.format(dataset=self.data.name)


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str | int], Any]:
    """Follow `loc` (pydantic's path to an error) from `root`: the params.yaml keys it names (a tagged
    union's tag left out) and the type it ends at."""
    node: Any = root
    keys: list[str | int] = []
    for part in loc:
        if typing.get_origin(node) is Annotated:  # a tagged union: `part` is the tag, not a key
            members = typing.get_args(typing.get_args(node)[0])
            node = next(m for m in members if part in typing.get_args(m.model_fields["architecture"].annotation))
            continue
        keys.append(part)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            node = field.annotation if field else None
        elif typing.get_origin(node) in (dict, list):
            node = typing.get_args(node)[-1]
    return keys, node


def _dotted(keys: list[str | int]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".") or "the top level"


def describe_error(error: ValidationError, root: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """Pydantic's first validation error as one line that names the key, its group and what it takes;
    `prefix` is where `root` sits in params.yaml, when it is not the whole file."""
    errors = error.errors()
    first, more = errors[0], f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    keys, _ = _walk(root, tuple(first["loc"]))
    keys = [*prefix, *keys]
    if first["type"] in ("extra_forbidden", "missing"):
        _, group = _walk(root, tuple(first["loc"])[:-1])
        where = _dotted(keys[:-1])
        if first["type"] == "missing":
            return f"params.yaml: {where} is missing {keys[-1]!r}{more}"
        allowed = ", ".join(sorted(group.model_fields))
        return f"params.yaml: unknown key {keys[-1]!r} in {where}; allowed: {allowed}{more}"
    if first["type"] in ("union_tag_not_found", "union_tag_invalid"):
        tags = typing.get_args(Architecture)[0]
        names = [typing.get_args(m.model_fields["architecture"].annotation)[0] for m in typing.get_args(tags)]
        tag = first.get("ctx", {}).get("tag")
        given = f" is {tag!r}" if tag else " is missing"
        return f"params.yaml: {_dotted(keys)}.architecture{given}; choose one of {names}{more}"
    value = first["input"]
    shown = "" if isinstance(value, dict) else f" is {value!r}"
    return f"params.yaml: {_dotted(keys)}{shown}: {first['msg'].removeprefix('Value error, ')}{more}"


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

"""The model a worker serves, and what names it: the same version in every answer (`model_version`, the
X-Model-Version header), in GET /model, in the `serving_model_info` gauge and in the prediction log."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import registry
from common.log_records import ModelName
from common.model_store import MODEL_FILES
from common.runtime import ModelFileError, OnnxClassifier, ProbeError
from serving.metrics import MODEL_INFO, count_predictions
from serving.settings import ServingSettings

log = logging.getLogger("bentoml.serving")


@dataclass(frozen=True)
class ServedModel:
    """A loaded, warmed model file; calling it runs a batch. `registered_version` is its version in the model
    registry where that is known (a model saved to BentoML's store alone has none: its tag's version names it)."""

    classifier: OnnxClassifier
    tag: str
    registered_version: int | None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """A batch's output rows, its answers counted in the prediction metrics: once a batch, on the model
        thread, rather than once a request on the event loop."""
        rows = self.classifier.outputs(images)
        columns = self.classifier.columns
        probabilities, flagged = columns.probabilities(rows), self.classifier.out_of_distribution(rows)
        count_predictions(self.classifier.class_names, probabilities.argmax(1), probabilities.max(1), flagged)
        return rows

    @property
    def version(self) -> str:
        return str(self.registered_version) if self.registered_version is not None else self.tag.split(":")[-1]

    @property
    def name(self) -> ModelName:
        return ModelName(self.tag, self.version, self.classifier.precision)

    def show(self, role: str, previous: ServedModel | None = None) -> None:
        """This model in the `serving_model_info` gauge (1), the one it replaces at 0."""
        if previous is not None:
            MODEL_INFO.labels(role, previous.version, previous.tag, previous.classifier.precision).set(0)
        MODEL_INFO.labels(role, self.version, self.tag, self.classifier.precision).set(1)


def open_model(path: str, settings: ServingSettings, expected_sha256: str | None) -> OnnxClassifier:
    """A model file on onnxruntime as the settings ask (device, threads), warmed for every batch it can get."""
    classifier = OnnxClassifier(
        path,
        device=settings.device,
        threads=settings.threads,
        expected_sha256=expected_sha256,
        bulk=(settings.bulk_threads, settings.max_batch_size),
    )
    classifier.warm_up(settings.max_batch_size, settings.max_batch_images)
    return classifier


class ReloadError(RuntimeError):
    """A registry version the worker could not swap in; `reason` (download, checksum, load, probe) labels
    serving_model_reload_failures_total."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def fetch_version(name: str, version: registry.Version, precision: str, folder: Path) -> Path:
    """A version's file of `precision`, downloaded and checked against the sha256 it was registered with."""
    file = MODEL_FILES[precision][0]
    if version.sha256(precision) is None:
        raise ReloadError("checksum", f"version {version.version} records no sha256 for its {file}")
    try:
        files = registry.download(name, version, (precision,), folder)
    except registry.ChecksumError as exc:
        raise ReloadError("checksum", str(exc)) from None
    except Exception as exc:  # an unreachable store, a missing artifact: MLflow's and the OS's errors
        raise ReloadError("download", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if precision not in files:
        raise ReloadError("download", f"version {version.version} has no {file}")
    return files[precision]


def load_version(
    name: str, version: registry.Version, current: ServedModel, settings: ServingSettings, folder: Path
) -> ServedModel:
    """A registry version as the worker serves it: the file of the precision it serves now, verified, loaded in
    a new onnxruntime session, warmed and checked on its probe batch; the classes must be the served ones."""
    started = time.perf_counter()
    precision = current.classifier.precision
    path = fetch_version(name, version, precision, folder)
    try:
        classifier = open_model(str(path), settings, version.sha256(precision))
    except ProbeError as exc:
        raise ReloadError("probe", str(exc)) from None
    except ModelFileError as exc:
        raise ReloadError("load", str(exc)) from None
    if classifier.class_names != current.classifier.class_names:
        raise ReloadError(
            "load", f"its classes {classifier.class_names} are not the served model's {current.classifier.class_names}"
        )
    log.info(
        "%s version %d downloaded, verified, loaded, warmed and probe-checked in %.1f s",
        name,
        version.version,
        time.perf_counter() - started,
    )
    return ServedModel(classifier, version.bentoml_tag, version.version)

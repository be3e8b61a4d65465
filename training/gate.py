"""The champion/challenger gate: the exported challenger against the registry's champion, both as the service
runs them (the file of the precision it serves, test-time augmentation and preprocessing inside), on the same
images: the official test set and each extra folder's held-out share. A split blocks the challenger only where
it loses more than that split's tolerance and McNemar's test finds the loss significant (training.paired)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from common.model_store import MODEL_FILES
from common.runtime import choose_precision, onnx_outputs
from training.config import GateMode, GateSettings
from training.data import Prepared
from training.errors import ConfigError
from training.paired import Paired, compare

TEST = "test"
MODE_VARIABLE = "GATE_MODE"  # `make retrain` sets it: the workspace's mode for that run, over gate.mode
EXPERIMENT_VARIABLE = "DVC_EXP_BASELINE_REV"  # DVC sets it for every `dvc exp run`: workspace, --temp, --queue


def gated_splits(prepared: Prepared) -> list[str]:
    """The official test set, then every extra folder's held-out set in the prepared data."""
    return [TEST, *sorted(key[2:] for key in prepared.arrays if key.startswith("x_holdout_"))]


def correctness(model: Path, prepared: Prepared) -> dict[str, np.ndarray]:
    """Which images of each gated split the ONNX file classifies right (an empty split is left out)."""
    right = {}
    for split in gated_splits(prepared):
        images, labels = prepared.images(split), prepared.labels(split)
        if len(labels):
            right[split] = onnx_outputs(model, images)["probabilities"].argmax(1) == labels
    return right


def judged_precision(setting: str, available: list[str]) -> str:
    """gate.precision resolved: `auto` is the file the service serves on this machine (int8 on a CPU, fp32 on
    a GPU), among those both models have."""
    if setting == "auto":
        return choose_precision("auto", "auto", available)
    return setting if setting in available else "fp32"


def mode(settings: GateSettings, environ: Mapping[str, str] = os.environ) -> tuple[GateMode, str]:
    """The mode of this run and where it comes from: gate.experiment_mode in a DVC experiment; else $GATE_MODE
    where set (`make retrain`), else gate.mode."""
    if environ.get(EXPERIMENT_VARIABLE):
        return settings.experiment_mode, "gate.experiment_mode (a DVC experiment)"
    given = environ.get(MODE_VARIABLE)
    if given:
        modes: tuple[GateMode, ...] = get_args(GateMode)
        if given not in modes:
            raise ConfigError(f"{MODE_VARIABLE}={given!r}: choose one of {', '.join(modes)}")
        return given, f"${MODE_VARIABLE}"
    return settings.mode, "gate.mode"


@dataclass
class Decision:
    passed: bool
    reason: str  # one line with the figures


def decide(
    challenger: dict[str, np.ndarray], champion: dict[str, np.ndarray] | None, settings: GateSettings
) -> tuple[Decision, dict[str, Paired]]:
    """Whether the challenger passes: on no split worse than the champion (the official test set with
    `tolerance` points, each held-out folder with `holdout_tolerance`, a loss counting only where McNemar's
    test gives p < `alpha`). A first model passes."""
    if champion is None:
        return Decision(True, f"no champion yet (challenger test {challenger[TEST].mean():.2%})"), {}
    paired = {split: compare(champion[split], challenger[split]) for split in challenger if split in champion}
    worse = [
        f"{split} {result.describe()}"
        for split, result in paired.items()
        if result.worse(settings.tolerance if split == TEST else settings.holdout_tolerance, settings.alpha)
    ]
    if worse:
        return Decision(False, "the challenger is worse on " + "; on ".join(worse)), paired
    return Decision(True, "; ".join(f"{split} {result.describe()}" for split, result in paired.items())), paired


def precisions(files: dict[str, Path]) -> list[str]:
    return [precision for precision in MODEL_FILES if precision in files]

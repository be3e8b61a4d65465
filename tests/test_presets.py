"""Presets: `python -m pipelines.preset full` prints `dvc exp run` overrides of keys params.yaml has."""

import subprocess
import sys

import pytest

from tests.conftest import REPO
from training.config import apply_overrides, load_params, preset_overrides
from training.errors import ConfigError


def test_full_preset_prints_dvc_overrides():
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.preset", "full"], cwd=REPO, capture_output=True, text=True, check=True
    )
    arguments = done.stdout.split()
    assert arguments[::2] == ["-S"] * (len(arguments) // 2)
    overrides = dict(a.split("=", 1) for a in arguments[1::2])
    assert overrides["models.resnet.blocks"] == "[1,2,2,2]"
    assert (
        int(overrides["models.resnet.train.epochs"])
        > load_params(REPO / "params.yaml")["models"]["resnet"]["train"]["epochs"]
    )


def test_unknown_keys_and_presets_are_refused():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match=r"'models\.resnet\.widht' is not in params\.yaml"):
        apply_overrides(params, {"models.resnet.widht": [1]})
    with pytest.raises(ConfigError, match=r"no preset 'fast'.*presets: \['full'\]"):
        preset_overrides("fast", REPO / "pipelines/presets")
    changed = apply_overrides(params, {"train.epochs": 99})
    assert changed["train"]["epochs"] == 99 and params["train"]["epochs"] != 99  # a copy

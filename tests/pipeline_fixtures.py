"""A real `dvc repro` in a copy of the repo on a tiny subset: the helpers the pipeline tests share."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

VENV_BIN = Path(sys.executable).parent
ZOO = ["mlp_relu_10", "cnn_basic"]


def edit_params(repo: Path, subset: dict, zoo: list[str], edit: Callable[[dict], None]) -> None:
    """The copy's params.yaml: the committed params on a stratified subset, a smaller zoo, the int8 gate
    loosened for models that barely learned (tests/test_quantize.py holds it to the real one), and `edit`."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["subset"] = subset
    params["zoo"] = zoo
    params["export"]["int8"].update(max_accuracy_drop=0.03, min_agreement=0.95)
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_params(repo: Path) -> None:
    """The committed params with overrides for a fast CPU run: a few hundred images, one epoch, two models."""
    edit_params(repo, {"train": 500, "test": 200}, ZOO, lambda p: p["train"].update(epochs=1, verbose=2))


def stage_env(shared_datasets: Path, bentoml_home: Path) -> dict:
    """The environment of `make run`, with the BentoML store in a temp folder, not the user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "BENTO"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",
        DATASET_MIRROR=f"{shared_datasets}/{{dataset}}",
        BENTOML_HOME=str(bentoml_home),
        BENTOML_DO_NOT_TRACK="true",
    )
    return env


def run(cmd: list[str], repo: Path, env: dict, timeout: int = 600) -> str:
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr

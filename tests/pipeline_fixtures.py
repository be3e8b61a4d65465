"""A real `dvc repro` in a copy of the repo on a tiny subset: the helpers the pipeline tests share."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
import yaml

from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
ZOO = ["mlp_relu_10", "cnn_basic"]
# what git holds after a run: the lock, and the outputs DVC leaves to git (`cache: false`)
COMMITTED_AFTER_A_RUN = (
    "params.yaml",
    "dvc.lock",
    "challenger.json",
    "distill.json",
    "champion.json",
    "export/export.json",
    "metrics",
    "plots",
    "reports",
)


def edit_params(repo: Path, subset: dict, zoo: list[str], edit: Callable[[dict], None]) -> None:
    """The copy's params.yaml: the committed params on a stratified subset, a smaller zoo, the int8 gate
    loosened for models that barely learned (tests/test_quantize.py holds it to the real one), and `edit`."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["subset"] = subset
    params["zoo"] = zoo
    params["export"]["int8"].update(max_accuracy_drop=0.03, min_agreement=0.95)
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def clone_of_a_run(repo: Path, dest: Path) -> Path:
    """A fresh clone of `repo` after its run was committed: the repo's files and what git holds of the run."""
    from tests.conftest import copy_repo

    clone = copy_repo(dest)
    for path in COMMITTED_AFTER_A_RUN:
        (clone / path).parent.mkdir(parents=True, exist_ok=True)
        if (repo / path).is_dir():
            shutil.copytree(repo / path, clone / path)
        else:
            shutil.copy2(repo / path, clone / path)
    return clone


def tiny_params(repo: Path) -> None:
    """The committed params with overrides for a fast CPU run: a few hundred images, one epoch, two models; trained
    with 1-pixel shifts, so that the challenger has five test-time views to distill, and any student exported."""

    def tiny(params: dict) -> None:
        params["train"].update(epochs=1, verbose=2, translate=1)
        params["distill"].update(epochs=1, tolerance=100.0)

    edit_params(repo, {"train": 500, "test": 200}, ZOO, tiny)


def zoo_runs(runs: list) -> list:
    """The MLflow runs of the zoo's models: the runs not nested in another (the distill stage nests its own in the
    challenger's)."""
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


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


def with_environment(repo: Path) -> Path:
    """The copy `repo` set up as `make setup` leaves a clone (the repo's own .venv and uv), so that `make <target>`
    runs there at once."""
    for folder in (".venv", ".tools"):
        (repo / folder).symlink_to(REPO / folder)
    return repo


def make(target: list[str], repo: Path, env: dict, timeout: int = 900) -> str:
    """`make <target>` in `repo`; it must succeed."""
    done = subprocess.run(["make", "-s", *target], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@contextlib.contextmanager
def make_target(target: list[str], env: dict[str, str], ready_url: str, log: Path, cwd: Path = REPO):
    """`make <target>` in `cwd`, ready when `ready_url` answers 200, then stopped with its children."""
    with open(log, "w") as out:
        process = subprocess.Popen(["make", "-s", *target], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(ready_url, timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(f"make {target[0]} not ready:\n{log.read_text()[-3000:]}")
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)

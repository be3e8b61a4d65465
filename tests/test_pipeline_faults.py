"""Ctrl-C in the middle of a training epoch, then `dvc repro` again: the interrupted MLflow run is marked
KILLED (never left RUNNING), nothing half-written is trusted, and the re-run completes with correct outputs."""
import json
import os
import signal
import subprocess
import time

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import copy_repo, require_shared_datasets
from tests.test_pipeline import VENV_BIN, run, stage_env

pytestmark = pytest.mark.slow
MODEL = "cnn_basic"
EPOCHS = 3


def interrupted_repro(repo, env) -> str:
    """Start `dvc repro`, wait for the end of epoch 1 of training, then SIGINT the whole process group
    (what Ctrl-C in a terminal does): the interrupt lands in the middle of epoch 2."""
    process = subprocess.Popen([str(VENV_BIN / "dvc"), "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, deadline = [], time.monotonic() + 600
    for line in process.stdout:
        output.append(line)
        if f"{MODEL} epoch 1/{EPOCHS}" in line:
            os.killpg(process.pid, signal.SIGINT)
            break
        assert time.monotonic() < deadline, "training never reached the end of epoch 1"
    output.extend(process.stdout)
    assert process.wait(timeout=120) != 0, "".join(output)
    return "".join(output)


def test_interrupted_training_then_repro_completes(tmp_path):
    shared_datasets = require_shared_datasets()
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["subset"] = {"train": 6000, "test": 200}
    params["zoo"] = [MODEL]
    params["train"].update(epochs=EPOCHS, verbose=2, patience=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env(shared_datasets, tmp_path / "bentoml")

    log = interrupted_repro(repo, env)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion-mnist")
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [(MODEL, "KILLED")], log
    assert not (repo / f"models/{MODEL}/weights.pt").exists()  # no half-trained weights left to trust

    run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert sorted(statuses.values()) == ["FINISHED", "KILLED"]
    metrics = json.loads((repo / f"metrics/{MODEL}.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    assert (repo / f"plots/curves/{MODEL}.csv").read_text().count("\n") == EPOCHS + 1
    assert json.loads((repo / "champion.json").read_text())["model"] == MODEL
    assert statuses[json.loads((repo / "champion.json").read_text())["run_id"]] == "FINISHED"
    assert "up to date" in run([str(VENV_BIN / "dvc"), "status"], repo, env)

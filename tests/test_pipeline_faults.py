"""Ctrl-C in the middle of a training epoch, then `dvc repro` again: the interrupted MLflow run is marked
KILLED (never left RUNNING), nothing half-written is trusted, and the re-run completes with correct outputs."""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import copy_repo, require_shared_datasets
from tests.pipeline_fixtures import VENV_BIN, edit_params, run, stage_env

pytestmark = pytest.mark.slow
MODEL = "cnn_basic"
EPOCHS = 3


def logged_epochs(database: Path) -> int:
    """Epochs whose validation accuracy the train stage has logged to MLflow so far (read-only peek)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'val_accuracy'").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def interrupted_repro(repo: Path, env: dict) -> str:
    """Start `dvc repro`, wait until epoch 1 of training is logged, then SIGINT the whole process group
    (what Ctrl-C in a terminal does): the interrupt lands in the middle of epoch 2."""
    log = repo.parent / "interrupted-repro.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(VENV_BIN / "dvc"), "repro"],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a terminal's Ctrl-C, even where the runner started us with SIGINT ignored
            # (as shells do for background jobs)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 600
        while logged_epochs(repo / "mlflow.db") < 1:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) != 0, log.read_text()
    return log.read_text()


def test_interrupted_training_then_repro_completes(tmp_path):
    shared_datasets = require_shared_datasets()
    repo = copy_repo(tmp_path / "repo")
    edit_params(
        repo, {"train": 12000, "test": 200}, [MODEL], lambda p: p["train"].update(epochs=EPOCHS, verbose=2, patience=0)
    )
    env = stage_env(shared_datasets, tmp_path / "bentoml")

    log = interrupted_repro(repo, env)
    assert f"{MODEL} epoch 2/{EPOCHS}" not in log, log  # interrupted during epoch 2
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


def test_a_typo_in_params_stops_dvc_repro_in_one_line_before_anything_trains(tmp_path):
    """`dropuot: 0.5` under models.cnn_deep_a: the first stage refuses the whole params.yaml, naming the key."""
    repo = copy_repo(tmp_path / "repo")
    edit_params(repo, {"train": 500, "test": 200}, ["mlp_relu_10", "cnn_deep_a"], lambda p: None)
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("  cnn_deep_a:\n", "  cnn_deep_a:\n    dropuot: 0.5\n", 1))
    env = stage_env(require_shared_datasets(), tmp_path / "bentoml")
    done = subprocess.run(
        [str(VENV_BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if " ERROR pipeline: " in line]
    assert len(errors) == 1 and "unknown key 'dropuot' in models.cnn_deep_a; allowed: activation," in errors[0]
    assert "Traceback" not in done.stderr and "epoch" not in done.stdout + done.stderr
    assert not (repo / "models").exists() and not (repo / "mlflow.db").exists()

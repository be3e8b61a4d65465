"""Data-parallel training: `torchrun --nproc_per_node=2` (gloo, CPU) runs the real train stage under DVC."""

import json
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import copy_repo, require_shared_datasets
from tests.pipeline_fixtures import VENV_BIN, edit_params, run, stage_env

pytestmark = pytest.mark.slow
MODEL = "resnet"
# Two ranks see exactly the images and augmentations one process sees; what differs is the order of
# floating-point sums and batch-norm statistics taken over half batches: a few of the 400 validation images.
TOLERANCE = 0.02


def test_torchrun_two_processes_match_one(tmp_path):
    shared_datasets = require_shared_datasets()
    repo = copy_repo(tmp_path / "repo")

    def small_resnet_under_torchrun(params: dict) -> None:
        params["models"][MODEL].update(stem=8, widths=[16, 32, 64], blocks=[1, 1, 1])
        params["models"][MODEL]["train"].update(epochs=4, batch_size=64, lr=0.1, verbose=2)
        params["distributed"]["launcher"] = "torchrun --standalone --nproc_per_node=2"

    edit_params(repo, {"train": 4000, "test": 200}, [MODEL], small_resnet_under_torchrun)
    env = stage_env(shared_datasets, tmp_path / "bentoml")

    log = run([str(VENV_BIN / "dvc"), "repro", f"train@{MODEL}"], repo, env)
    assert "torchrun --standalone --nproc_per_node=2 -m pipelines.train resnet" in log
    assert log.count(f"{MODEL} epoch 4/4") == 1  # only rank 0 reports
    two_ranks = json.loads((repo / f"models/{MODEL}/train.json").read_text())
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fashion-mnist").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["distributed.world_size"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "val_accuracy")) == 4

    run([sys.executable, "-m", "pipelines.train", MODEL], repo, env)
    one_process = json.loads((repo / f"models/{MODEL}/train.json").read_text())
    accuracies = (two_ranks["best_val_accuracy"], one_process["best_val_accuracy"])
    assert min(accuracies) > 0.6, accuracies  # it learned something, so the comparison means something
    assert abs(accuracies[0] - accuracies[1]) <= TOLERANCE, accuracies

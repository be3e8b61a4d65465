"""The loop a team runs, with its make targets, against a running service: `make run` in a copy of the repo (its
own MLflow store and BentoML home; the data cut to 5,000 training images and one model when the copy is made),
`make serve`, traffic the champion gets wrong (images rotated 90 degrees) labelled through POST /feedback,
`make feedback-data`, `make retrain` (the new model becomes the challenger, shadowed by the running service),
the same traffic again, `make promote` (the running service takes the new champion), `make rollback` (it
takes the old one back); and a worse challenger the gate keeps out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from benchmarks.local_server import free_port
from tests.browser import ARTIFACTS
from tests.conftest import copy_repo, require_shared_datasets
from tests.pipeline_fixtures import VENV_BIN, edit_params, make, make_target, run, stage_env, with_environment
from tests.registry_fixtures import every_worker, shadowed
from tests.serving_fixtures import predict_batch
from training.data import load_idx_pair
from training.datasets import TRAIN_IMAGES, TRAIN_LABELS

pytestmark = pytest.mark.slow
TOKEN = "retrain-test-token"
RESULTS = ARTIFACTS.parent / "retrain-loop.json"  # the gate's and the live figures, for people to read


def model_card(url: str) -> dict:
    return requests.get(f"{url}/model", timeout=30).json()


def champion(repo: Path) -> dict:
    return json.loads((repo / "champion.json").read_text())


def label(url: str, ids: list[str], labels: np.ndarray) -> None:
    for prediction_id, truth in zip(ids, labels.tolist(), strict=True):
        response = requests.post(
            f"{url}/feedback",
            json={"prediction_id": prediction_id, "label": truth},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert response.status_code == 201, response.text


def answered_by(url: str, images: np.ndarray, version: str, timeout: float = 30) -> list[dict]:
    """The images' answers, once they come from `version` (the running service follows the registry)."""
    deadline = time.monotonic() + timeout
    while True:
        answers = predict_batch(url, images)
        if {a["model_version"] for a in answers} == {version} or time.monotonic() > deadline:
            return answers
        time.sleep(1)


def accuracy(answers: list[dict], labels: np.ndarray) -> float:
    return float(np.mean([a["label"] for a in answers] == labels))


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    shared = require_shared_datasets()
    root = tmp_path_factory.mktemp("loop")
    repo = with_environment(copy_repo(root / "repo"))
    edit_params(repo, {"train": 5000, "test": 500}, ["mlp_512"], lambda p: p["train"].update(epochs=3, verbose=2))
    env = stage_env(shared, root / "bentoml")
    make(["run"], repo, env)
    x, y = load_idx_pair(shared / "fashion-mnist" / TRAIN_IMAGES, shared / "fashion-mnist" / TRAIN_LABELS, 10)
    rotated = np.ascontiguousarray(np.rot90(x[50_000:51_000], 1, axes=(2, 3)))
    return repo, env, rotated, y[50_000:51_000]


def test_feedback_retrain_shadow_promote_and_roll_back_a_running_service(loop, tmp_path):
    repo, env, rotated, labels = loop
    first = champion(repo)
    assert first["gate"]["decision"] == "promoted" and first["version"] == 1
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_env = {**env, "SERVING_FEEDBACK_TOKEN": TOKEN, "SERVING_REGISTRY_POLL_S": "1"}
    with make_target(["serve", f"PORT={port}"], serve_env, f"{url}/readyz", tmp_path / "serve.log", cwd=repo):
        assert model_card(url)["registered_version"] == 1 and model_card(url)["following_registry"]
        before = answered_by(url, rotated[:500], "1")
        label(url, [a["prediction_id"] for a in before], labels[:500])

        made = make(["feedback-data"], repo, env)
        assert "500 labels" in made, made
        retrained = make(["retrain"], repo, env)  # the feedback folder trains by default; the gate shadows
        record = champion(repo)
        assert record["version"] == 1 and record["gate"]["decision"] == "shadowed", retrained[-3000:]
        gate = record["gate"]
        assert "registered as version 2, alias 'challenger'" in gate["reason"]
        held_out = gate["paired"]["holdout_feedback"]
        assert held_out["challenger_accuracy"] > held_out["champion_accuracy"] + 0.1  # it learned the rotated images

        every_worker(url, "challenger", "2", 2)  # the running service tries version 2 on its traffic
        again = answered_by(url, rotated[500:], "1")
        label(url, [a["prediction_id"] for a in again], labels[500:])
        shadowed(repo / "logs" / "predictions", "2", 500)
        promoted = make(["promote"], repo, env)
        assert "version 2 on live traffic" in promoted, promoted
        assert champion(repo)["version"] == 2
        after = answered_by(url, rotated[:500], "2")  # no restart: the running service took it
        assert {a["model_version"] for a in after} == {"2"} and model_card(url)["registered_version"] == 2

        make(["rollback"], repo, env)
        back = answered_by(url, rotated[:500], "1")
        assert {a["model_version"] for a in back} == {"1"} and model_card(url)["registered_version"] == 1
    live = champion(repo)  # rolled back: version 1 again
    assert live["version"] == 1 and live["bentoml_tag"] == first["bentoml_tag"]
    figures = {
        "served_rotated_accuracy": {
            "version 1": accuracy(before, labels[:500]),
            "version 2": accuracy(after, labels[:500]),
        },
        "gate": gate,
    }
    assert figures["served_rotated_accuracy"]["version 2"] > figures["served_rotated_accuracy"]["version 1"] + 0.1
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
    again = run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)  # the gate re-runs: the rollback holds
    assert champion(repo)["version"] == 1, again[-2000:]
    assert "rolled back" in champion(repo)["gate"]["reason"]


def test_a_worse_challenger_is_kept_out(loop):
    repo, env, _, _ = loop
    before = champion(repo)
    edit_params(repo, {"train": 5000, "test": 500}, ["mlp_512"], lambda p: p["train"].update(epochs=3, lr=1.0e-6))
    log = run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)  # a model that learns nothing
    after = champion(repo)
    assert after["gate"]["decision"] == "kept", log[-2000:]
    assert after["version"] == before["version"] and after["bentoml_tag"] == before["bentoml_tag"]
    assert "the challenger is worse on test" in after["gate"]["reason"] and "McNemar p = " in after["gate"]["reason"]

"""The loop a team runs, against real processes: `dvc repro` in a copy of the repo (its own MLflow store and
BentoML home), `bentoml serve` of the champion, traffic the champion gets wrong (images rotated 90 degrees)
labelled through POST /feedback, the feedback as an image folder, a retrain the gate promotes, `make rollback`
back to the first champion; and a worse challenger the gate keeps out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from benchmarks.local_server import LocalServer
from tests.browser import ARTIFACTS
from tests.conftest import copy_repo, require_shared_datasets
from tests.pipeline_fixtures import VENV_BIN, edit_params, run, stage_env
from tests.serving_fixtures import predict_batch
from training.data import load_idx_pair
from training.datasets import TRAIN_IMAGES, TRAIN_LABELS

pytestmark = pytest.mark.slow
TOKEN = "retrain-test-token"
RESULTS = ARTIFACTS.parent / "retrain-loop.json"  # the gate's figures and the served accuracy, for people to read


def set_params(repo: Path, **groups: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for group, values in groups.items():
        params[group].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def served(repo: Path, env: dict, log: Path):
    return LocalServer(
        "serving.service:Classifier",
        log,
        cwd=repo,
        BENTOML_HOME=env["BENTOML_HOME"],
        SERVING_FEEDBACK_TOKEN=TOKEN,
        MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}",
    ).wait_ready()


def accuracy(server, images: np.ndarray, labels: np.ndarray) -> tuple[float, list[str]]:
    answers = predict_batch(server, images)
    return float(np.mean([a["label"] for a in answers] == labels)), [a["prediction_id"] for a in answers]


def model_card(server) -> dict:
    return requests.get(f"{server.url}/model", timeout=30).json()


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    shared = require_shared_datasets()
    root = tmp_path_factory.mktemp("loop")
    repo = copy_repo(root / "repo")
    edit_params(repo, {"train": 5000, "test": 500}, ["mlp_512"], lambda p: p["train"].update(epochs=3, verbose=2))
    set_params(repo, gate={"tolerance": 3.0})  # 500 test images of a model trained for seconds: 1.5 points is noise
    env = stage_env(shared, root / "bentoml")
    run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)
    x, y = load_idx_pair(shared / "fashion-mnist" / TRAIN_IMAGES, shared / "fashion-mnist" / TRAIN_LABELS, 10)
    rotated = np.ascontiguousarray(np.rot90(x[50_000:50_500], 1, axes=(2, 3)))
    return repo, env, rotated, y[50_000:50_500]


# the champion as MLflow gives it to anyone, against the exported file the service serves
PYFUNC_ANSWERS = """
import mlflow, numpy as np
from training.data import Prepared
from training.export import onnx_outputs
mlflow.set_tracking_uri("sqlite:///mlflow.db")
model = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier@champion")
images = Prepared.load("data/prepared/dataset.npz").images("test")
answers = model.predict(images)["probabilities"]
expected = onnx_outputs("export/model.onnx", images)["probabilities"]
same = (answers.argmax(1) == expected.argmax(1)).all() and np.abs(answers - expected).max() < 1e-6
print("same answers as export/model.onnx" if same else "different answers")
"""


def champion(repo: Path) -> dict:
    return json.loads((repo / "champion.json").read_text())


def test_feedback_retrain_promote_serve_and_roll_back(loop, tmp_path):
    repo, env, rotated, labels = loop
    first = champion(repo)
    assert first["gate"]["decision"] == "promoted" and first["version"] == 1
    registered = run([str(VENV_BIN / "python"), "-c", PYFUNC_ANSWERS], repo, env).strip().splitlines()[-1]
    assert registered == "same answers as export/model.onnx"  # the registry holds what is served
    with served(repo, env, tmp_path / "serve-1.log") as server:
        assert model_card(server)["registered_version"] == 1
        before, ids = accuracy(server, rotated, labels)
        for prediction_id, label in zip(ids, labels.tolist(), strict=True):
            response = requests.post(
                f"{server.url}/feedback",
                json={"prediction_id": prediction_id, "label": label},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            )
            assert response.status_code == 201, response.text
    made = run([str(VENV_BIN / "python"), "-m", "pipelines.feedback_data"], repo, env)
    run([str(VENV_BIN / "dvc"), "add", "--quiet", "data/extra/feedback"], repo, env)
    pngs = sorted((repo / "data/extra/feedback").glob("*/*.png"))
    assert len(pngs) == len({p.stem for p in pngs}) >= 495  # one file per distinct input (a few repeat)
    assert "500 labels" in made and f"{len(pngs)} added" in made, made
    assert (repo / "data/extra/feedback.dvc").is_file()

    set_params(repo, data={"extra": ["data/extra/feedback"]})
    retrained = run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)
    second = champion(repo)
    gate = second["gate"]
    assert gate["decision"] == "promoted" and second["version"] == 2, retrained[-2000:]
    challenger, old = gate["challenger"]["accuracy"], gate["champion"]["accuracy"]
    assert challenger["holdout_feedback"] > old["holdout_feedback"] + 0.1  # it learned the rotated images
    assert challenger["test"] >= old["test"] - 0.03
    with served(repo, env, tmp_path / "serve-2.log") as server:
        card = model_card(server)
        assert card["registered_version"] == 2 and card["bentoml_tag"] == second["bentoml_tag"]
        after, _ = accuracy(server, rotated, labels)
    assert after > before + 0.1
    figures = {"served_rotated_accuracy": {"before": before, "after": after}, "gate": gate}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))

    run([str(VENV_BIN / "python"), "-m", "pipelines.rollback"], repo, env)
    rolled = champion(repo)
    assert rolled["version"] == 1 and rolled["bentoml_tag"] == first["bentoml_tag"]
    with served(repo, env, tmp_path / "serve-3.log") as server:
        assert model_card(server)["registered_version"] == 1
        assert model_card(server)["bentoml_tag"] == first["bentoml_tag"]
    again = run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)  # the gate re-runs: the rollback holds
    assert champion(repo)["version"] == 1, again[-2000:]
    assert "rolled back" in champion(repo)["gate"]["reason"]


def test_a_worse_challenger_is_kept_out(loop, tmp_path):
    repo, env, _, _ = loop
    before = champion(repo)
    set_params(repo, train={"lr": 1.0e-6})  # a model that learns nothing
    log = run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)
    after = champion(repo)
    assert after["gate"]["decision"] == "kept", log[-2000:]
    assert after["version"] == before["version"] and after["bentoml_tag"] == before["bentoml_tag"]
    assert "kept the champion: the challenger scores test" in after["gate"]["reason"]
    with served(repo, env, tmp_path / "serve.log") as server:
        assert model_card(server)["bentoml_tag"] == before["bentoml_tag"]

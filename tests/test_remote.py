"""Sharing what was trained through a DVC remote: one clone pushes after its run, a fresh clone pulls and
serves that model with no training; a clone with nothing trained says so in one line when asked to serve."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import requests

from benchmarks.local_server import LocalServer
from tests.pipeline_fixtures import VENV_BIN, clone_of_a_run, run

pytestmark = pytest.mark.slow
DVC = str(VENV_BIN / "dvc")


def test_a_fresh_clone_serves_what_another_pushed_without_training(pipeline, tmp_path):
    repo, env, _ = pipeline
    remote = tmp_path / "remote"
    run([DVC, "remote", "modify", "--local", "shared", "url", str(remote)], repo, env)
    run([DVC, "commit", "--force"], repo, env)  # the lock as the team commits it (other tests re-ran stages here)
    run([DVC, "push"], repo, env)

    clone = clone_of_a_run(repo, tmp_path / "clone")
    store = {"BENTOML_HOME": str(tmp_path / "bentoml"), "SERVING_PRECISION": "fp32"}  # a new machine's empty store

    untrained = LocalServer("serving.service:Classifier", tmp_path / "untrained.log", cwd=clone, **store)
    with pytest.raises(RuntimeError, match="failed to start"):
        untrained.wait_ready(timeout=120)
    log = (tmp_path / "untrained.log").read_text()
    assert len(re.findall(r"serving: no trained model to serve: .*`make run`.*`make pull`", log)) == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    run([DVC, "remote", "modify", "--local", "shared", "url", str(remote)], clone, env)
    run([DVC, "pull"], clone, env)
    assert "up to date" in run([DVC, "status"], clone, env)
    server = LocalServer("serving.service:Classifier", tmp_path / "pulled.log", cwd=clone, **store).wait_ready()
    try:
        card = requests.get(f"{server.url}/model", timeout=10).json()
        assert card["bentoml_tag"] == json.loads((repo / "export" / "export.json").read_text())["bentoml_tag"]
        with np.load(clone / "data" / "prepared" / "dataset.npz") as data:
            images = data["x_test"][:64]
        answers = requests.post(f"{server.url}/predict_batch", json={"images": images[:, 0].tolist()}, timeout=60)
        pushed = ort.InferenceSession(str(repo / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
        expected = pushed.run(["probabilities"], {"images": images})[0]
        assert [a["label"] for a in answers.json()] == expected.argmax(1).tolist()
        np.testing.assert_allclose([a["confidence"] for a in answers.json()], expected.max(1), atol=1e-6)
    finally:
        server.close()

"""A challenger tried on live traffic, against real processes: `bentoml serve` following a real MLflow registry,
its `challenger` alias shadowed on every request, feedback through POST /feedback, `make monitor`'s report and
`make promote`'s decision. A worse challenger is refused, a better one promoted and served; one that fails
every batch, or whose process is killed, costs no answer."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import requests

from common.runtime import onnx_outputs
from tests.conftest import copy_repo
from tests.pipeline_fixtures import VENV_BIN
from tests.registry_fixtures import REGISTERED, every_worker, register_version, set_alias, shadowed
from tests.serving_fixtures import metric_samples, predict_batch, serving, small_model, small_net, store_model

pytestmark = pytest.mark.slow
TOKEN = "shadow-test-token"
WORKERS = 2


def fixed_batch(files: dict[str, Path], folder: Path, batch: int = 16) -> dict[str, Path]:
    """Copies of the model files whose graph takes batches of exactly `batch` images (its probe batch's size):
    it loads and passes its probe, then fails every other batch in onnxruntime."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = dict(files)
    for role in ("fp32", "int8"):
        proto = onnx.load(str(files[role]))
        graph = proto.graph
        name = graph.input[0].name
        for node in graph.node:
            node.input[:] = [f"{name}_fixed" if given == name else given for given in node.input]
        graph.initializer.append(
            onnx.helper.make_tensor("fixed_shape", onnx.TensorProto.INT64, [4], [batch, 1, 28, 28])
        )
        graph.node.insert(0, onnx.helper.make_node("Reshape", [name, "fixed_shape"], [f"{name}_fixed"]))
        copies[role] = folder / files[role].name
        onnx.save(proto, str(copies[role]))
    return copies


@pytest.fixture(scope="module")
def models(served_model, tmp_path_factory):
    """The champion (mlp_512 on 2,000 images, one epoch: about 73%), a worse challenger (500 images: about
    50%), a better one (the serving tests' model: about 84%) and one that fails every batch; the champion in a
    BentoML store of its own."""
    folder = tmp_path_factory.mktemp("shadow")
    champion, _ = small_model(folder / "champion", small_net(2000, 1), min_agreement=0.95)
    worse, _ = small_model(folder / "worse", small_net(500, 1), min_agreement=0.95)
    better = {role: served_model["files"][role] for role in ("fp32", "int8", "reference")}
    home = folder / "bentoml"
    return {
        "champion": champion,
        "worse": worse,
        "better": better,
        "broken": fixed_batch(better, folder / "broken"),
        "home": home,
        "tag": store_model(champion, home),
        "better_tag": served_model["tag"],
        "x": served_model["small"].x_test,
        "y": served_model["small"].y_test,
    }


def send_feedback(server, ids: list[str], labels: np.ndarray) -> None:
    def post(pair):
        prediction_id, label = pair
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = {"prediction_id": prediction_id, "label": int(label)}
        response = requests.post(f"{server.url}/feedback", json=body, headers=headers, timeout=30)
        assert response.status_code == 201, response.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, zip(ids, labels, strict=True)))


def replay(server, log_dir: Path, models: dict, part: slice, version: str) -> list[str]:
    """Labelled test images as traffic: answered, labelled through POST /feedback, shadowed by `version`."""
    answers = predict_batch(server.url, models["x"][part])
    ids = [a["prediction_id"] for a in answers]
    send_feedback(server, ids, models["y"][part])
    shadowed(log_dir, version, len(ids))
    return ids


def test_shadow_monitor_and_promote(models, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = register_version(uri, models["champion"], models["tag"])
    worse = register_version(uri, models["worse"], f"{REGISTERED}:worse")
    better = register_version(uri, models["better"], models["better_tag"])
    broken = register_version(uri, models["broken"], f"{REGISTERED}:broken")
    set_alias(uri, "champion", first)
    set_alias(uri, "challenger", worse)
    repo = copy_repo(tmp_path / "repo")
    env = {"MLFLOW_TRACKING_URI": uri}  # and BENTOML_HOME: the store that holds the champion
    log_dir = tmp_path / "predictions"

    def pipeline(*args: str) -> subprocess.CompletedProcess:
        command = [str(VENV_BIN / "python"), "-m", *args, "--log-dir", str(log_dir)]
        environment = {**os.environ, **env, "BENTOML_HOME": str(models["home"])}
        return subprocess.run(command, cwd=repo, env=environment, capture_output=True, text=True, timeout=300)

    with serving(
        {"home": models["home"]},
        tmp_path / "serve.log",
        SERVING_WORKERS=str(WORKERS),
        SERVING_PRECISION="fp32",  # answers that do not depend on how requests are batched: equal to offline ones
        SERVING_FOLLOW_REGISTRY="true",
        SERVING_REGISTERED_MODEL=REGISTERED,
        SERVING_REGISTRY_POLL_S="1",
        SERVING_SHADOW_SHARE="100",
        SERVING_FEEDBACK_TOKEN=TOKEN,
        SERVING_PREDICTION_LOG_DIR=str(log_dir),
        **env,
    ) as server:
        every_worker(server.url, "champion", "1", WORKERS)
        every_worker(server.url, "challenger", "2", WORKERS)
        replay(server, log_dir, models, slice(0, 2000), "2")

        monitored = pipeline("monitoring.report", "--out", str(tmp_path / "reports"))
        assert monitored.returncode == 0, monitored.stderr[-3000:]
        report = json.loads((tmp_path / "reports" / "latest.json").read_text())["shadow"]
        x, y = models["x"][:2000], models["y"][:2000]
        offline = {
            name: onnx_outputs(models[name]["fp32"], x)["probabilities"].argmax(1) for name in ("champion", "worse")
        }
        assert (report["champion_version"], report["challenger_version"]) == ("1", "2")
        assert report["paired_predictions"] == report["labelled"] == 2000
        assert report["agreement"] == pytest.approx(float(np.mean(offline["champion"] == offline["worse"])), abs=1e-12)
        assert report["champion"]["accuracy"] == pytest.approx(float(np.mean(offline["champion"] == y)), abs=1e-12)
        assert report["challenger"]["accuracy"] == pytest.approx(float(np.mean(offline["worse"] == y)), abs=1e-12)
        assert report["mcnemar"]["p_value"] < 1e-6 and report["challenger"]["p50_ms"] > 0
        assert "challenger version 2 shadowed 2000 predictions of version 1" in monitored.stdout

        refused = pipeline("pipelines.promote")
        assert refused.returncode == 1 and "not promoted: on live traffic version 2 scores" in refused.stderr
        set_alias(uri, "challenger", better)
        every_worker(server.url, "challenger", "3", WORKERS)
        replay(server, log_dir, models, slice(2000, 2300), "3")
        promoted = pipeline("pipelines.promote")
        assert promoted.returncode == 0, promoted.stderr[-3000:]
        every_worker(server.url, "champion", "3", WORKERS)  # the running service took the promoted version
        champion = json.loads((repo / "champion.json").read_text())
        assert champion["version"] == 3 and champion["gate"]["decision"] == "promoted"
        assert champion["gate"]["live"]["labelled"] == 300

        set_alias(uri, "challenger", broken)
        every_worker(server.url, "challenger", "4", WORKERS)
        answers = predict_batch(server.url, models["x"][:500])  # every batch of the challenger fails
        assert {a["model_version"] for a in answers} == {"3"}
        shadows = [
            p for p in psutil.Process(server.process.pid).children(recursive=True) if "serving.shadow" in p.cmdline()
        ]
        assert len(shadows) == WORKERS
        shadows[0].kill()  # a challenger that crashes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = requests.get(f"{server.url}/metrics", timeout=10).text
            failed_batches = metric_samples(metrics, "serving_shadow_failures_total")  # reported off the request path
            crashed = metric_samples(metrics, "serving_model_reload_failures_total")
            if crashed and failed_batches.get("serving_shadow_failures_total", 0) >= 2:
                break
            time.sleep(0.5)
        answers = predict_batch(server.url, models["x"][:500])
        assert {a["model_version"] for a in answers} == {"3"}
    assert metric_samples(metrics, "serving_shadow_failures_total")["serving_shadow_failures_total"] >= 2
    crashes = metric_samples(metrics, "serving_model_reload_failures_total")
    assert crashes == {'serving_model_reload_failures_total{alias="challenger",reason="crash"}': 1.0}

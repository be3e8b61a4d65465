"""Watching the served model, against a real `bentoml serve`: every answer logged once, feedback, Prometheus
reading the live accuracy, and `make monitor`'s report on windows of traffic like and unlike the training data."""

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
import tritonclient.http as triton
from mlflow import MlflowClient
from selenium.webdriver.common.by import By

from common.log_queries import read_feedback, read_predictions
from tests.browser import ARTIFACTS, chromium, screenshot, wait_for
from tests.conftest import REPO
from tests.prometheus_fixtures import Prometheus
from tests.serving_fixtures import MODEL_NAME, contrast_images, metric_samples, png, predict_batch, serving
from training.config import load_params

pytestmark = pytest.mark.slow
TOKEN = "a-feedback-token-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}
RATE = load_params(REPO / "params.yaml")["export"]["ood"]["false_positive_rate"]


@contextlib.contextmanager
def monitored(served_model, folder: Path, with_prometheus: bool):
    """The service with feedback on and its log in `folder`, and Prometheus scraping it where asked."""
    env = {"SERVING_FEEDBACK_TOKEN": TOKEN, "SERVING_PREDICTION_LOG_DIR": str(folder / "log")}
    with serving(served_model, folder / "serve.log", **env) as server:
        prometheus = Prometheus(f"127.0.0.1:{server.port}", folder).wait_ready() if with_prometheus else None
        try:
            yield server, prometheus, folder
        finally:
            if prometheus is not None:
                prometheus.close()


@pytest.fixture(scope="module")
def logged(served_model, tmp_path_factory):
    with monitored(served_model, tmp_path_factory.mktemp("monitoring"), with_prometheus=False) as service:
        yield service


def send_feedback(server, prediction_id: str, label, headers=AUTH) -> requests.Response:
    body = {"prediction_id": prediction_id, "label": label}
    return requests.post(f"{server.url}/feedback", json=body, headers=headers, timeout=30)


def logged_rows(folder: Path, ids: list[str]) -> dict[str, dict]:
    """The log's records of these predictions, once the writer has flushed them (within a fraction of a second)."""
    for _ in range(30):
        rows = {r["id"]: r for r in read_predictions(folder / "log") if r["id"] in ids}
        if len(rows) == len(ids):
            break
        time.sleep(0.3)
    return rows


def monitor(folder: Path, served_model, *arguments: str) -> dict:
    """`make monitor` on the test's log: its JSON report."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(served_model["home"]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "DO_NOT_TRACK": "1",
    }
    command = [sys.executable, "-m", "monitoring.report", "--log-dir", str(folder / "log")]
    done = subprocess.run(
        [*command, "--out", str(folder / "reports"), *arguments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "predictions" in done.stdout and "latest.html" in done.stdout
    return json.loads((folder / "reports" / "latest.json").read_text())


def test_every_answer_carries_an_id_and_is_logged_exactly_once_on_every_route(logged, served_model):
    server, _, folder = logged
    image = served_model["x"][0]
    answers = [requests.post(f"{server.url}/predict", files={"image": ("x.png", png(image[0]))}, timeout=30).json()]
    answers += predict_batch(server.url, served_model["x"][:3])
    with open(folder / "x.png", "wb") as f:
        f.write(png(image[0]))
    with bentoml.SyncHTTPClient(server.url) as client:
        answers.append(client.predict(image=folder / "x.png"))
        answers += client.predict_batch(images=served_model["x"][:2, 0].tolist())
    client_oip = triton.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton.InferInput("images", [2, 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(served_model["x"][:2])
    oip_ids = [i.decode() for i in client_oip.infer(MODEL_NAME, [tensor]).as_numpy("prediction_id")]
    ids = [a["prediction_id"] for a in answers] + oip_ids
    assert all(isinstance(a["ood_score"], float) and isinstance(a["out_of_distribution"], bool) for a in answers)
    rows = logged_rows(folder, ids)
    assert sorted(rows) == sorted(ids) and len(ids) == 9
    routes = sorted(r["route"] for r in rows.values())
    expected = ["/predict", *["/predict_batch"] * 3, "/api/predict", *["/api/predict_batch"] * 2, *["/v2/infer"] * 2]
    assert routes == sorted(expected)
    first = rows[answers[0]["prediction_id"]]
    assert first["model_input"] == image.tobytes() and first["label"] == answers[0]["label"]
    assert first["model_tag"] == served_model["tag"] and first["precision"] == "int8"
    assert first["ood_score"] == pytest.approx(answers[0]["ood_score"], rel=1e-5)
    # each worker writes files of its own, named by the token that starts its ids (open ones are folders of parts)
    names = [p.name for p in (folder / "log").glob("predictions/*/*/*.parquet")]
    names += [p.name for p in (folder / "log").glob(".open/*")]
    assert all(any(name.startswith(i[:16]) for name in names) for i in ids)


def test_feedback_is_stored_and_refused_as_it_should(logged, served_model):
    server, _, folder = logged
    answer = predict_batch(server.url, served_model["x"][:1])[0]
    truth = int(served_model["y"][0])
    assert send_feedback(server, answer["prediction_id"], truth, headers={}).status_code == 401
    wrong = send_feedback(server, answer["prediction_id"], truth, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert "feedback token" in wrong.json()["error"]
    assert send_feedback(server, answer["prediction_id"], 10).status_code == 400
    assert "not a class index" in send_feedback(server, answer["prediction_id"], 10).json()["error"]
    assert "is not a class of the model" in send_feedback(server, answer["prediction_id"], "Hat").json()["error"]
    assert send_feedback(server, answer["prediction_id"], True).status_code == 400
    assert send_feedback(server, "not-an-id", 1).status_code == 400
    unknown = send_feedback(server, "0" * 32, 1)
    assert unknown.status_code == 404 and "no logged prediction" in unknown.json()["error"]
    stored = send_feedback(server, answer["prediction_id"], "Sneaker")
    assert stored.status_code == 201, stored.text
    assert stored.json() == {
        "prediction_id": answer["prediction_id"],
        "label": 7,
        "class_name": "Sneaker",
        "predicted_label": answer["label"],
        "correct": answer["label"] == 7,
    }
    assert send_feedback(server, answer["prediction_id"], truth).status_code == 201  # replaces the first
    assert read_feedback(folder / "log")[answer["prediction_id"]] == truth


def test_three_windows_of_traffic_live_accuracy_and_prometheus(served_model, tmp_path):
    """Held-out Fashion-MNIST test images, then MNIST digits, then Fashion-MNIST rotated a quarter turn, 1,000
    of each; feedback with the true labels of 500 of the first, on a service that has had no other."""
    with monitored(served_model, tmp_path, with_prometheus=True) as (server, prometheus, folder):
        windows_and_feedback(server, prometheus, folder, served_model)


def windows_and_feedback(server, prometheus, folder: Path, served_model) -> None:
    small = served_model["small"]
    fashion, labels = small.x_test[1000:2000], small.y_test[1000:2000]
    windows = {
        "fashion-mnist": fashion,
        "mnist": contrast_images()[:1000],
        "rotated": np.ascontiguousarray(np.rot90(small.x_test[2000:3000], 1, axes=(2, 3))),
    }
    figures = {}
    answers = predict_batch(server.url, windows["fashion-mnist"])
    with ThreadPoolExecutor(8) as pool:
        sent = pool.map(lambda i: send_feedback(server, answers[i]["prediction_id"], int(labels[i])), range(500))
        statuses = [response.status_code for response in sent]
    assert statuses == [201] * 500
    truth = float(np.mean([answers[i]["label"] == labels[i] for i in range(500)]))
    for name, images in windows.items():
        if name != "fashion-mnist":
            answers = predict_batch(server.url, images)
        report = monitor(folder, served_model, "--last", "1000")
        flagged = float(np.mean([a["out_of_distribution"] for a in answers]))
        figures[name] = {k: report[k] for k in ("drift_detected", "drift_score", "ood_share", "live_accuracy")}
        assert report["predictions"] == 1000 and report["ood_share"] == pytest.approx(flagged)
        show_report(folder / "reports" / "latest.html", f"monitoring-report-{name}", folder)
        if name == "fashion-mnist":
            assert not report["drift_detected"], report["checks"]["embedding_drift"]
            assert flagged <= 1.5 * RATE  # the calibrated share of in-distribution images, give or take
            assert report["feedback"] == 500 and abs(report["live_accuracy"] - truth) <= 0.005
            ratio = prometheus.wait_for("image_classifier:live_accuracy:ratio", lambda v: abs(v - truth) <= 0.005)
            figures[name]["prometheus_live_accuracy"] = ratio
            figures[name]["true_accuracy"] = truth
        else:
            assert report["drift_detected"], report["checks"]["embedding_drift"]
            assert report["feedback"] == 0 and report["live_accuracy"] is None
    assert figures["mnist"]["ood_share"] > 0.5  # most digits are flagged out of distribution
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "monitoring-windows.json").write_text(json.dumps(figures, indent=2))
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion-mnist-monitoring")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3 and {"drift_score", "ood_share"} <= set(runs[0].data.metrics)
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    counted = sum(metric_samples(metrics, "serving_predictions_total").values())
    assert counted >= 3000


def show_report(html: Path, name: str, folder: Path) -> None:
    """The HTML report in headless Chromium, offline: it draws its widgets, and a screenshot is kept."""
    with chromium(folder / name) as driver:
        driver.get(html.as_uri())
        wait_for(driver, lambda d: "Drift in embeddings" in d.find_element(By.TAG_NAME, "body").text, "the report")
        screenshot(driver, name)


def test_an_unwritable_log_keeps_answering_and_counts_the_drops(served_model, tmp_path):
    blocked = tmp_path / "log"
    blocked.write_text("a file where the log's folder should be")
    env = {"SERVING_PREDICTION_LOG_DIR": str(blocked), "SERVING_WORKERS": "1"}
    with serving(served_model, tmp_path / "serve.log", **env) as server:
        answers = predict_batch(server.url, served_model["x"][:300])
        assert len(answers) == 300
        for _ in range(30):
            dropped = metric_samples(requests.get(f"{server.url}/metrics", timeout=10).text, "serving_prediction_log")
            if sum(v for k, v in dropped.items() if k.startswith("serving_prediction_log_dropped_total")) >= 300:
                break
            time.sleep(0.5)
        assert sum(v for k, v in dropped.items() if k.startswith("serving_prediction_log_dropped_total")) == 300
    assert (tmp_path / "serve.log").read_text().count("prediction log: dropping records") == 1

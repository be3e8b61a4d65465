"""The service follows the registry while it runs, against real processes: `bentoml serve` with 2 workers, a
real MLflow store, 16 clients for 60 s. The champion alias moves to version 2 (a promotion), back to 1 (a
rollback), then to a version whose file is corrupt: every answer is a 200 naming the version that gave it,
each worker takes a new version within seconds, the corrupt one never answers and is counted."""

from __future__ import annotations

import json
import time

import pytest
import requests

from common.log_queries import read_predictions
from tests.browser import ARTIFACTS
from tests.registry_fixtures import (
    REGISTERED,
    RecordedLoad,
    every_worker,
    p99,
    promote,
    register_version,
    roll_back,
    set_alias,
    variant,
)
from tests.serving_fixtures import metric_samples, serving

pytestmark = pytest.mark.slow
POLL_S = 1.0
FIGURES = ARTIFACTS.parent / "follow-registry.json"  # the figures of this run, for people to read


def switched(answers, since: float, version: str) -> dict[str, float]:
    """Per worker, seconds from `since` to its first answer from `version` (a request sent after `since`)."""
    first: dict[str, float] = {}
    for answer in sorted(answers, key=lambda a: a.sent + a.seconds):
        if answer.sent >= since and answer.version == version and answer.worker not in first:
            first[answer.worker] = answer.sent + answer.seconds - since
    return first


def test_promote_roll_back_and_a_corrupt_version_under_load(served_model, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    files = {role: served_model["files"][role] for role in ("fp32", "int8", "reference")}
    first = register_version(uri, files, served_model["tag"])
    second = register_version(uri, variant(files, tmp_path / "v2", "retrained"), f"{REGISTERED}:retrained")
    corrupt = register_version(uri, variant(files, tmp_path / "v3", "damaged"), f"{REGISTERED}:damaged", True)
    set_alias(uri, "champion", first)
    log_dir = tmp_path / "predictions"
    with serving(
        served_model,
        tmp_path / "serve.log",
        SERVING_WORKERS="2",
        SERVING_FOLLOW_REGISTRY="true",
        SERVING_REGISTERED_MODEL=REGISTERED,
        SERVING_REGISTRY_POLL_S=str(POLL_S),
        MLFLOW_TRACKING_URI=uri,
        SERVING_PREDICTION_LOG_DIR=str(log_dir),
    ) as server:
        every_worker(
            server.url, "champion", "1", workers=2
        )  # version 1 is the very model the store held: named, not reloaded
        load = RecordedLoad(server.url, served_model["x"], clients=16, seconds=60)
        start = time.monotonic()
        load.start()
        events = {}
        for at, version, move in (
            (15, "2", lambda: promote(uri, second, first)),
            (30, "1", lambda: roll_back(uri)),
            (45, str(corrupt.version), lambda: set_alias(uri, "champion", corrupt)),
        ):
            time.sleep(max(0.0, start + at - time.monotonic()))
            events[version] = time.monotonic()
            move()
        load.join(timeout=120)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        card = requests.get(f"{server.url}/model", timeout=10).json()
        time.sleep(1)  # the last records reach the log

    answers = load.answers
    workers = {a.worker for a in answers}
    assert len(answers) > 1000 and len(workers) == 2
    assert {a.status for a in answers} == {200}
    assert all(a.version == a.body_version for a in answers)  # the header and the body agree
    assert {a.version for a in answers} == {"1", "2"}  # the corrupt version never answered

    to_second, back_to_first = switched(answers, events["2"], "2"), switched(answers, events["1"], "1")
    assert set(to_second) == set(back_to_first) == workers
    assert max(to_second.values()) <= 10 and max(back_to_first.values()) <= 10
    for worker in workers:  # once switched, a worker answers with the new version only
        after = [a for a in answers if a.worker == worker and a.sent > events["2"] + to_second[worker] + 1]
        assert {a.version for a in after if a.sent < events["1"]} == {"2"}
    failures = metric_samples(metrics, "serving_model_reload_failures_total")
    assert failures == {'serving_model_reload_failures_total{alias="champion",reason="checksum"}': 2.0}
    info = {k: v for k, v in metric_samples(metrics, "serving_model_info").items() if 'role="champion"' in k}
    served = [k for k, v in info.items() if v == 1]
    assert len(served) == 2 and all('version="1"' in k and served_model["tag"] in k for k in served)
    assert card["model_version"] == "1" and card["registered_version"] == 1

    logged = {r["id"]: r["model_version"] for r in read_predictions(log_dir)}
    assert all(logged[a.prediction_id] == a.version for a in answers)  # the prediction log agrees

    swapping = [
        a for a in answers if any(t <= a.sent < t + max(to_second.values()) + 1 for t in (events["2"], events["1"]))
    ]
    quiet = [a for a in answers if a.sent < events["2"] - 1 or events["2"] + 12 < a.sent < events["1"] - 1]
    figures = {
        "answers": len(answers),
        "requests_per_s": len(answers) / 60,
        "seconds_to_switch": {"to_2": to_second, "back_to_1": back_to_first},
        "p99_ms": {"during_swaps": p99(swapping) * 1000, "without": p99(quiet) * 1000},
        "reload_failures": failures,
    }
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2))
    assert p99(swapping) <= 2 * p99(quiet), figures

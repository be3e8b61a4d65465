"""MLflow at team scale: `make mlflow-server`'s tracking server, with MLflow's authentication, on a real
PostgreSQL (Debian's, installed where missing and started on loopback) that needs its generated password, with
proxied artifacts in the team's bucket (SeaweedFS, as `make storage` runs it), and the tiny `dvc repro` logging
to it as the admin."""

import json
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
import requests
from mlflow import MlflowClient

from benchmarks.local_server import ChildServer, free_port
from common.private_files import read_private
from tests.conftest import copy_repo
from tests.pipeline_fixtures import VENV_BIN, ZOO, run, stage_env, tiny_params, zoo_runs
from training.errors import PipelineError
from training.tracking_server import (
    ADMIN,
    AUTH_DATABASE,
    LocalPostgres,
    artifacts_destination,
    secret_files,
    server_command,
    server_env,
)

pytestmark = pytest.mark.slow
TIMINGS = ("train_seconds", "images_per_second")
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=10"


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, storage):
    """A PostgreSQL cluster of its own (in a folder the postgres user can reach), the server's home with its
    secrets, and `mlflow server` with authentication on them and its artifacts in the bucket, as `make
    mlflow-server` starts it where `make storage` runs."""
    data_dir = Path(tempfile.mkdtemp(prefix="mlflow-postgres-"))
    home = tmp_path_factory.mktemp("mlflow-home")
    try:
        database = LocalPostgres(data_dir, secret_files(home)["postgres"], port=free_port())
    except PipelineError as exc:
        pytest.skip(f"no PostgreSQL for the tracking server test: {exc}")
    backend = database.start()
    env, made = server_env(home, database.uri(AUTH_DATABASE))
    assert made  # the first start makes the admin's password
    folder = tmp_path_factory.mktemp("mlflow-server")
    artifacts = artifacts_destination(None, storage.env["STORAGE_URL"])
    command = server_command(backend, artifacts, "127.0.0.1", "{port}")
    server = ChildServer(command, folder / "log", "/health", env={**env, **database.env, **storage.env})
    try:
        yield {
            "server": server.wait_ready(timeout=180),
            "backend": backend,
            "database": database,
            "home": home,
            "admin": (ADMIN, read_private(secret_files(home)["admin"])),
            "storage": storage,
        }
    finally:
        server.close()
        database.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_every_request_needs_a_users_password(team_server):
    url, (user, password) = team_server["server"].url, team_server["admin"]
    for path in (SEARCH, "/", "/api/2.0/mlflow-artifacts/artifacts"):  # REST API, UI, artifact proxy
        assert requests.get(url + path, timeout=10).status_code == 401, path
        assert requests.get(url + path, auth=(user, password + "x"), timeout=10).status_code == 401, path
    assert requests.get(url + SEARCH, auth=(user, password), timeout=10).status_code == 200
    assert requests.get(url + "/", auth=(user, password), timeout=10).status_code == 200


def test_a_page_elsewhere_cannot_drive_the_server_through_a_browser(team_server):
    url, admin = team_server["server"].url, team_server["admin"]
    create = f"{url}/api/2.0/mlflow/experiments/create"
    refused = requests.post(
        create, json={"name": "from-elsewhere"}, auth=admin, headers={"Origin": "http://evil.example"}, timeout=10
    )
    assert refused.status_code == 403
    rebound = requests.get(url + SEARCH, auth=admin, headers={"Host": "evil.example:5000"}, timeout=10)
    assert rebound.status_code == 403  # DNS rebinding: a name that is not the server's


def test_a_new_user_reads_nothing_until_granted_and_never_deletes_with_read(team_server):
    url, admin = team_server["server"].url, team_server["admin"]
    created = requests.post(
        f"{url}/api/2.0/mlflow/experiments/create", json={"name": "team-experiment"}, auth=admin, timeout=10
    )
    experiment_id = created.json()["experiment_id"]
    alice = ("alice", "a-long-password-for-alice-1")
    user = requests.post(
        f"{url}/api/2.0/mlflow/users/create", json={"username": alice[0], "password": alice[1]}, auth=admin, timeout=10
    )
    assert user.status_code == 200, user.text
    get = f"{url}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
    assert requests.get(get, auth=alice, timeout=10).status_code == 403
    granted = requests.post(
        f"{url}/api/3.0/mlflow/users/permissions/grant",
        json={"username": alice[0], "resource_type": "experiment", "resource_id": experiment_id, "permission": "READ"},
        auth=admin,
        timeout=10,
    )
    assert granted.status_code == 200, granted.text
    assert requests.get(get, auth=alice, timeout=10).json()["experiment"]["name"] == "team-experiment"
    delete = requests.post(
        f"{url}/api/2.0/mlflow/experiments/delete", json={"experiment_id": experiment_id}, auth=alice, timeout=10
    )
    assert delete.status_code == 403
    assert requests.get(get, auth=admin, timeout=10).json()["experiment"]["lifecycle_stage"] == "active"


def test_the_database_needs_its_password(team_server):
    database, backend = team_server["database"], team_server["backend"]
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(backend, passfile="/dev/null", connect_timeout=10)
    with psycopg.connect(backend, passfile=str(database.password_file), connect_timeout=10) as connection:
        assert connection.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in secret_files(team_server["home"]).values())


def test_the_tiny_pipeline_logs_everything_to_the_server_as_its_admin(team_server, pipeline, shared_datasets, tmp_path):
    """Every run, metric history, dataset input and artifact lands on the server, and the metrics equal those of
    the same params logged to the local store (the session's tiny pipeline): same params, same metrics on CPU."""
    server, backend, (user, password) = team_server["server"], team_server["backend"], team_server["admin"]
    repo = copy_repo(tmp_path / "repo")
    tiny_params(repo)
    env = {
        **stage_env(shared_datasets, tmp_path / "bentoml"),
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": password,
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # the tiny runs last seconds, not minutes
    }
    pipeline_log = run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)
    assert not (repo / "mlflow.db").exists()  # nothing went to the local store
    local_repo = pipeline[0]
    for model in ZOO:
        here, there = (json.loads((root / f"metrics/{model}.json").read_text()) for root in (repo, local_repo))
        assert without_timings(here) == without_timings(there), model

    client = MlflowClient(server.url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", user)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        experiment = client.get_experiment_by_name("fashion-mnist")
        every_run = client.search_runs([experiment.experiment_id])
        assert {r.info.status for r in every_run} == {"FINISHED"}
        runs = {r.info.run_name: r for r in zoo_runs(every_run)}
        assert sorted(runs) == sorted(ZOO)
        for run_ in runs.values():
            history = client.get_metric_history(run_.info.run_id, "val_accuracy")
            assert [m.step for m in history] == [1]  # one epoch in the tiny params
            assert any(name.startswith("system/cpu_utilization") for name in run_.data.metrics)
            assert run_.data.metrics["test_accuracy"] == pytest.approx(
                json.loads((repo / f"metrics/{run_.info.run_name}.json").read_text())["test_accuracy"]
            )
            contexts = {i.tags[0].value: i.dataset for i in run_.inputs.dataset_inputs}
            assert sorted(contexts) == ["test", "train", "validation"]
            assert {d.name for d in contexts.values()} == {"fashion-mnist"}
            # the confusion matrix, stored by the server and downloaded through it
            png = Path(client.download_artifacts(run_.info.run_id, "evaluation/confusion_matrix.png", str(tmp_path)))
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        champion = client.get_model_version_by_alias("fashion-mnist-classifier", "champion")
        assert champion.run_id in {r.info.run_id for r in runs.values()}
        folder = f"onnx/{champion.tags['bentoml_tag'].split(':')[1]}"  # the export stage's, in a folder of its own
        exported = {a.path for a in client.list_artifacts(champion.run_id, folder)}
        assert exported == {f"{folder}/model.onnx", f"{folder}/model.int8.onnx", f"{folder}/reference.npz"}
        assert "int8_gate.int8_argmax_agreement" in client.get_run(champion.run_id).data.metrics
    in_bucket = team_server["storage"].keys("mlflow-artifacts/")
    for run_ in runs.values():  # stored in the bucket, under the run's experiment and id
        suffix = f"/{run_.info.run_id}/artifacts/evaluation/confusion_matrix.png"
        assert [key for key in in_bucket if key.endswith(suffix)], (run_.info.run_name, in_bucket[:20])

    database = team_server["database"]
    with psycopg.connect(backend, passfile=str(database.password_file)) as connection:  # really in PostgreSQL
        assert connection.execute("SELECT count(*) FROM runs").fetchone()[0] == len(every_run)
    # no secret in any log: the server's, PostgreSQL's, the pipeline's
    secrets = [read_private(path).rsplit(":", 1)[-1] for path in secret_files(team_server["home"]).values()]
    logs = {
        "mlflow server": server.log_path.read_text(),
        "postgresql": (database.data_dir / "server.log").read_text(),
        "dvc repro": pipeline_log,
    }
    assert not [(name, n) for name, text in logs.items() for n, s in enumerate(secrets) if s in text]

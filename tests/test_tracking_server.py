"""MLflow at team scale: `make mlflow-server`'s tracking server on a real PostgreSQL (Debian's, installed
where missing and started on loopback), with proxied artifacts, and the tiny `dvc repro` logging to it."""

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
import requests
from mlflow import MlflowClient

from benchmarks.local_server import ChildServer, free_port
from tests.conftest import copy_repo
from tests.pipeline_fixtures import VENV_BIN, ZOO, run, stage_env, tiny_params
from training.errors import PipelineError
from training.tracking_server import LocalPostgres, server_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    """A PostgreSQL cluster of its own (in a folder the postgres user can reach) and `mlflow server` on it."""
    data_dir = Path(tempfile.mkdtemp(prefix="mlflow-postgres-"))
    try:
        database = LocalPostgres(data_dir, port=free_port())
    except PipelineError as exc:
        pytest.skip(f"no PostgreSQL for the tracking server test: {exc}")
    backend = database.start()
    folder = tmp_path_factory.mktemp("mlflow-server")
    command = server_command(backend, folder / "artifacts", "127.0.0.1", "{port}")
    server = ChildServer(command, folder / "log", "/health")
    try:
        yield server.wait_ready(timeout=180), backend
    finally:
        server.close()
        database.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_the_tiny_pipeline_logs_everything_to_a_postgresql_backed_server(postgres_server, shared_datasets, tmp_path):
    server, backend = postgres_server
    repo = copy_repo(tmp_path / "repo")
    tiny_params(repo)
    env = {
        **stage_env(shared_datasets, tmp_path / "bentoml"),
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # the tiny runs last seconds, not minutes
    }
    run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)
    assert not (repo / "mlflow.db").exists()  # nothing went to the local store

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("fashion-mnist")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(ZOO) and {r.info.status for r in runs.values()} == {"FINISHED"}
    for run_ in runs.values():
        history = client.get_metric_history(run_.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1]  # one epoch in the tiny params
        assert any(name.startswith("system/cpu_utilization") for name in run_.data.metrics)
        contexts = {i.tags[0].value: i.dataset for i in run_.inputs.dataset_inputs}
        assert sorted(contexts) == ["test", "train", "validation"]
        assert {d.name for d in contexts.values()} == {"fashion-mnist"}
        # the confusion matrix, stored by the server and downloaded through it
        png = Path(client.download_artifacts(run_.info.run_id, "evaluation/confusion_matrix.png", str(tmp_path)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    champion = client.get_model_version_by_alias("fashion-mnist-classifier", "champion")
    assert champion.run_id in {r.info.run_id for r in runs.values()}
    exported = {a.path for a in client.list_artifacts(champion.run_id, "onnx")}
    # the export stage, off the server
    assert exported == {"onnx/model.onnx", "onnx/model.int8.onnx", "onnx/reference.npz"}
    assert "int8_gate.int8_argmax_agreement" in client.get_run(champion.run_id).data.metrics

    with psycopg.connect(backend) as connection, connection.cursor() as cursor:  # really in PostgreSQL
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == len(ZOO)
    assert requests.get(f"{server.url}/health", timeout=5).ok

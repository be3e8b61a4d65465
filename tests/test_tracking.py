"""Where MLflow runs go, also from the temp copies `dvc exp run --temp/--queue` works in."""

import pytest

from training import tracking
from training.errors import PipelineError


def test_repo_root_inside_a_dvc_experiment_temp_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project/.dvc/tmp/exps/tmpab12cd"))
    assert tracking.repo_root() == tmp_path / "project"


def test_default_store_is_sqlite_at_the_repo_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project/.dvc/tmp/exps/tmpab12cd"))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/project/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


def test_environment_variable_switches_to_a_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_nested_params():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": "1",
        "a.c.d": "[1, 2]",
        "e": "None",
    }


def test_resuming_a_run_the_store_lacks_is_a_clear_error(monkeypatch, tmp_path):
    """A model trained against another store (or a deleted mlflow.db): one line naming the store, no traceback."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    tracking.setup("fashion-mnist")
    with (
        pytest.raises(PipelineError, match=rf"run 0+, .* not in the tracking store sqlite:///{tmp_path}/mlflow.db"),
        tracking.start_run(run_id="0" * 32),
    ):
        pass


def test_a_password_in_a_tracking_uri_never_reaches_a_message():
    assert tracking.shown_uri("postgresql+psycopg://mlflow:p%40ss:w0rd@127.0.0.1:5432/mlflow") == (
        "postgresql+psycopg://mlflow:***@127.0.0.1:5432/mlflow"
    )
    assert tracking.shown_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"

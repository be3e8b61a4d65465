"""MLflow conventions: where runs go, what every run is tagged with, how params are flattened."""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from training.errors import PipelineError

# `dvc exp run --temp/--queue` runs each experiment in a copy of the repo under this folder
DVC_EXPERIMENT_TEMP = "/.dvc/tmp/exps/"
DIGEST_CHARS = 12  # of a dataset's sha256, as MLflow shows digests (its store holds at most 36)


def repo_root() -> Path:
    """The user's repository, also from inside the temp copy an experiment runs in."""
    here = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve().as_posix()
    return Path(here.split(DVC_EXPERIMENT_TEMP)[0])


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI (a remote server) when set, else a SQLite store at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def shown_uri(uri: str | None = None) -> str:
    """A tracking URI (the active one by default) fit for a message: a password in it replaced by `***`."""
    uri = uri or mlflow.get_tracking_uri()
    return re.sub(r"(//[^/:@]*):[^/@]*@", r"\1:***@", uri)


def setup(experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        # a local store keeps artifacts beside the database, so `make ui` can show them
        location = (repo_root() / "mlartifacts" / experiment).as_uri() if uri.startswith("sqlite:") else None
        try:
            experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            created = mlflow.get_experiment_by_name(experiment)
            if created is None:
                raise
            experiment_id = created.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(dataset_sha256: str) -> dict[str, str]:
    return {
        "git.commit": git_commit(),
        "dvc.stage": os.environ.get("DVC_STAGE", "none"),
        "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "dataset.sha256": dataset_sha256,
    }


def dataset_source(home: str) -> DatasetSource:
    """An official dataset's home URL, or an image folder's path, as MLflow's source of a dataset input."""
    if home.startswith(("http://", "https://")):
        return HTTPDatasetSource(home)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice (for "" and file://) and says so
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(home)


def log_datasets(name: str, digests: dict[str, str], home: str) -> None:
    """The prepared splits as the active run's MLflow dataset inputs (the runs list's Dataset column and
    filter): the dataset's name, each split's digest, where its images come from as source, the split as
    context."""
    for split, digest in digests.items():
        source = dataset_source(home)
        dataset = MetaDataset(source, name=name, digest=digest[:DIGEST_CHARS])  # type: ignore[abstract]
        mlflow.log_input(dataset, context=split)


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow wants them: dotted keys, string values."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@contextmanager
def start_run(**kwargs):
    """mlflow.start_run that marks an interrupted run KILLED and a crashed one FAILED, never RUNNING.
    Resuming a run the store does not have (another store, or a deleted mlflow.db) is a clear error."""
    if kwargs.get("run_id"):
        try:
            mlflow.get_run(kwargs["run_id"])
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise PipelineError(
                f"MLflow run {kwargs['run_id']}, logged when the model was trained, is not in the "
                f"tracking store {shown_uri()}: point MLFLOW_TRACKING_URI at the store "
                "it was logged to, or retrain the model (`dvc repro --force train@<model>`)"
            ) from None
    run = mlflow.start_run(**kwargs)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_evaluation(
    run_id: str, scores: dict[str, float], report: dict, class_names: list[str], artifacts: Path
) -> None:
    """An evaluated model's test metrics and evaluation artifacts, in the run that trained it (validation
    metrics are there already, per epoch)."""
    with start_run(run_id=run_id):
        mlflow.log_metrics({k: v for k, v in scores.items() if k.startswith("test_")})
        mlflow.log_metrics({f"test_f1.{cls}": report[cls]["f1"] for cls in class_names})
        mlflow.log_artifacts(str(artifacts), artifact_path="evaluation")


def log_report(run_id: str, report_file: Path, figures_dir: Path) -> None:
    """The pipeline report beside the chosen model's own evaluation (the report's links keep working there),
    its run tagged as the pipeline's challenger."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "challenger", "true")
    client.log_artifact(run_id, str(report_file), "pipeline_report")
    client.log_artifacts(run_id, str(figures_dir), f"pipeline_report/{figures_dir.name}")


def log_export(run_id: str, files: list[Path], folder: str, figures: dict[str, dict]) -> None:
    """The exported files (fp32 and int8 ONNX, the monitoring reference) in `folder` of the challenger's run, and
    the export's figures (parity, the int8 gate, the out-of-distribution score per file): `{group}.{name}`
    metrics."""
    with start_run(run_id=run_id):
        for path in files:
            mlflow.log_artifact(str(path), artifact_path=folder)
        mlflow.log_metrics(
            {f"{group}.{k}": float(v) for group, values in figures.items() for k, v in flatten(values).items()}
        )

"""Where the served model comes from: the local BentoML store; else the export stage's files where a clone
pulled them from the team's DVC remote (`make pull`) and they are the champion; else the MLflow Model
Registry, which holds every served version."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from common import registry
from common.model_store import (
    EXPORT_RECORD,
    STORED_FILES,
    ModelMissingError,
    read_record,
    save_onnx,
    served_record,
    workspace_store,
)


def restore_model(tag: str, files: dict[str, Path], source: str = "registry") -> None:
    """Save `files` ({role: path}) into the local store under that very `tag`, unless it holds it already."""
    try:
        bentoml.models.get(tag)
    except NotFound:
        save_onnx(files, tag, {"source": source})


def ensure_model(tag: str) -> None:
    """BentoML model `tag` in the local store: restored, under that very tag, from export/ where the export
    stage's record names it (a clone that pulled it), else from the registry version champion.json names."""
    try:
        bentoml.models.get(tag)
        return
    except NotFound:
        pass
    if tag.endswith(":latest"):
        raise ModelMissingError(
            f"no trained model to serve: BentoML model {tag} is not in the local store; train one with `make run`, "
            "or fetch the team's from the DVC remote with `make pull`"
        )
    export_dir = EXPORT_RECORD.parent
    files = {role: export_dir / name for role, (name, _) in STORED_FILES.items() if (export_dir / name).is_file()}
    if "fp32" in files and read_record(EXPORT_RECORD).get("bentoml_tag") == tag:
        restore_model(tag, files, "dvc pull")
        return
    served = served_record()
    nowhere = (
        f"no trained model to serve: BentoML model {tag} is not in the local store, nor in {export_dir.name}/"
        "{registry}; train one with `make run`, or fetch the team's from the DVC remote with `make pull`"
    )
    uri = os.environ.get("MLFLOW_TRACKING_URI") or workspace_store()
    if served.get("bentoml_tag") != tag or not uri:  # never a new, empty mlflow.db as a side effect
        raise ModelMissingError(nowhere.format(registry=""))
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        version = registry.Version(served["version"], served["run_id"], {"bentoml_tag": tag})
        with tempfile.TemporaryDirectory() as folder:
            restore_model(
                tag, registry.download(served["registered_model"], version, tuple(STORED_FILES), Path(folder))
            )
    except Exception as exc:  # an unreachable server, a store without that version: say so, in one line
        reason = f" or the registry ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        raise ModelMissingError(nowhere.format(registry=reason)) from None

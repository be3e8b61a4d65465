"""The MLflow Model Registry holds what is served: each version is the exported ONNX file (mlflow.onnx flavour;
`mlflow.pyfunc.load_model` answers as the service does), tagged with its BentoML tag and figures. The alias
`mlflow.alias` (champion) is the served version, `previous` the one it replaced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from training import tracking
from training.errors import PipelineError

PREVIOUS = "previous"
SERVED_MODEL = "served_model"  # the ONNX model's name in its run's artifacts
EXTRA_FILES = "onnx"  # the int8 file and the monitoring reference, in the run's artifacts (export stage)


@dataclass
class Version:
    """A registered version of the served model: what champion.json and `make rollback` need."""

    version: int
    run_id: str
    tags: dict[str, str]

    @property
    def bentoml_tag(self) -> str:
        return self.tags["bentoml_tag"]


def _version(found: ModelVersion) -> Version:
    return Version(int(found.version), found.run_id or "", dict(found.tags))


def by_alias(name: str, alias: str) -> Version | None:
    """The version `alias` points at, or None (no such model, no such alias)."""
    try:
        return _version(mlflow.MlflowClient().get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def is_served_model(version: Version | None) -> bool:
    """Whether a version is an exported ONNX model (a registry may hold older PyTorch versions)."""
    return version is not None and "bentoml_tag" in version.tags


def download(name: str, version: Version, folder: Path) -> dict[str, Path]:
    """A version's files by role, as the BentoML store keeps them: the registered fp32 ONNX file, and the int8
    file and monitoring reference from its run, where the export stage logged them."""
    from serving.model_store import INT8_FILE, ONNX_FILE, REFERENCE_FILE

    folder.mkdir(parents=True, exist_ok=True)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(folder)))
    files = {"fp32": model_dir / ONNX_FILE}
    for role, file in (("int8", INT8_FILE), ("reference", REFERENCE_FILE)):
        try:
            files[role] = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=version.run_id, artifact_path=f"{EXTRA_FILES}/{file}", dst_path=str(folder / role)
                )
            )
        except MlflowException:
            if role == "reference":
                raise PipelineError(f"{name} version {version.version}: its run has no {EXTRA_FILES}/{file}") from None
    return files


def register(name: str, run_id: str, onnx_file: Path, tags: dict[str, str]) -> Version:
    """The ONNX file as a new version of `name`, logged in the challenger's run, with `tags`."""
    import onnx

    from training.tracking import start_run

    with start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_file)),
            name=SERVED_MODEL,
            registered_model_name=name,
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return _version(client.get_model_version(name, version))


def version_tags(challenger: dict, exported: dict, onnx_sha256: str) -> dict[str, str]:
    """What a version says about itself: enough to write champion.json and restore it into BentoML's store."""
    return {
        "model": challenger["model"],
        "dataset": challenger["dataset"],
        "val_accuracy": str(challenger["val_accuracy"]),
        "test_accuracy": str(challenger["test_accuracy"]),
        "parameters": str(challenger["parameters"]),
        "bentoml_tag": exported["bentoml_tag"],
        "onnx_sha256": onnx_sha256,
        "git_commit": exported.get("git_commit", "unknown"),
    }


def served_record(name: str, alias: str, version: Version) -> dict:
    """champion.json's description of the served version."""
    tags = version.tags
    return {
        "model": tags["model"],
        "dataset": tags["dataset"],
        "run_id": version.run_id,
        "val_accuracy": float(tags["val_accuracy"]),
        "test_accuracy": float(tags["test_accuracy"]),
        "parameters": int(tags["parameters"]),
        "registered_model": name,
        "version": version.version,
        "alias": alias,
        "bentoml_tag": version.bentoml_tag,
    }


def served_versions(name: str) -> list[Version]:
    found = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    return sorted((v for v in map(_version, found) if is_served_model(v)), key=lambda v: v.version)


def rolled_back_version(name: str, onnx_sha256: str) -> int | None:
    """The version holding this very ONNX file, if `make rollback` retired it: the gate never promotes it again."""
    for version in served_versions(name):
        if version.tags.get("onnx_sha256") == onnx_sha256 and version.tags.get("rolled_back"):
            return version.version
    return None


def promote(name: str, alias: str, version: Version, champion: Version | None) -> None:
    """`alias` to `version`; `previous` to the version it replaced."""
    client = mlflow.MlflowClient()
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
    client.set_registered_model_alias(name, alias, str(version.version))


def roll_back(name: str, alias: str, when: str) -> tuple[Version, Version]:
    """`alias` back to `previous`, and `previous` to the promoted version before that, if any; the retired
    version tagged `rolled_back`. Returns (the version now served, the one rolled back from)."""
    client = mlflow.MlflowClient()
    current, previous = by_alias(name, alias), by_alias(name, PREVIOUS)
    if current is None or previous is None:
        raise PipelineError(
            f"nothing to roll back to: {name} has no {alias if current is None else PREVIOUS!r} alias "
            f"in {tracking.shown_uri()}"
        )
    older = [
        v
        for v in served_versions(name)
        if v.version < previous.version and v.tags.get("gate.decision") == "promoted" and not v.tags.get("rolled_back")
    ]
    client.set_registered_model_alias(name, alias, str(previous.version))
    client.set_model_version_tag(name, str(current.version), "rolled_back", when)
    if older:
        client.set_registered_model_alias(name, PREVIOUS, str(older[-1].version))
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    return previous, current

"""The MLflow Model Registry holds what is served: each version is the exported ONNX file (mlflow.onnx flavour,
with a signature and an input example; `mlflow.pyfunc.load_model` answers as the service does), tagged with
its BentoML tag, its files' checksums and figures. The alias `mlflow.alias` (champion) is the served version,
`previous` the one it replaced, `challenger` a version tried on live traffic before it serves."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from common.files import sha256_file
from common.model_store import STORED_FILES
from common.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    RUN_FILES,
    Version,
    by_alias,
    download,
    run_files,
    version_of,
)
from common.runtime import INPUT_NAME, onnx_outputs
from training import tracking
from training.errors import PipelineError

SERVED_MODEL = "served_model"  # the ONNX model's name in its run's artifacts
EXAMPLE_IMAGES = 2  # test images in each version's input example

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS", "RUN_FILES", "Version", "by_alias", "download"]


def is_served_model(version: Version | None) -> bool:
    """Whether a version is an exported ONNX model (a registry may hold older PyTorch versions)."""
    return version is not None and "bentoml_tag" in version.tags


def checksums(files: dict[str, Path]) -> dict[str, str]:
    """Every exported file's sha256, as a version's tags (and the BentoML store's metadata) name them."""
    return {STORED_FILES[role][1]: sha256_file(path) for role, path in files.items()}


def signature(onnx_file: Path, example: np.ndarray):
    """The served graph's signature: uint8 images [-1,1,28,28] in; logits, probabilities, the OOD score and the
    embedding out, named as the graph names them, inferred from its answers to `example`."""
    from mlflow.models import infer_signature

    return infer_signature({INPUT_NAME: example}, onnx_outputs(onnx_file, example))


def register(name: str, run_id: str, onnx_file: Path, example: np.ndarray, tags: dict[str, str]) -> Version:
    """The ONNX file as a new version of `name`, logged in the challenger's run with its signature and
    `example` images as input example, with `tags`."""
    import onnx

    with tracking.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_file)),
            name=SERVED_MODEL,
            registered_model_name=name,
            signature=signature(onnx_file, example),
            input_example={INPUT_NAME: example},
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version_of(client.get_model_version(name, version))


def register_files(name: str, files: dict[str, Path], example: np.ndarray, tags: dict[str, str]) -> Version:
    """Exported files (by role) as a new version of `name`, in a run of their own in the active experiment: the
    int8 file and the monitoring reference where the export stage logs them, the fp32 file registered."""
    with tracking.start_run() as run:
        for role in ("int8", "reference"):
            if role in files:
                mlflow.log_artifact(str(files[role]), run_files(tags["bentoml_tag"]))
    return register(name, run.info.run_id, files["fp32"], example, tags)


def version_tags(challenger: dict, exported: dict, files: dict[str, Path]) -> dict[str, str]:
    """What a version says about itself: enough to write champion.json, restore it into BentoML's store and
    verify each of its files. Its accuracies are those of the exported network (the challenger's, or its
    distilled student's)."""
    return {
        "model": challenger["model"],
        "dataset": challenger["dataset"],
        "val_accuracy": str(exported["val_accuracy"]),
        "test_accuracy": str(exported["test_accuracy"]),
        "parameters": str(challenger["parameters"]),
        "bentoml_tag": exported["bentoml_tag"],
        "git_commit": exported.get("git_commit", "unknown"),
        **checksums(files),
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
    return sorted((v for v in map(version_of, found) if is_served_model(v)), key=lambda v: v.version)


def rolled_back_version(name: str, onnx_sha256: str) -> int | None:
    """The version holding this very ONNX file, if `make rollback` retired it: the gate never promotes it again."""
    for version in served_versions(name):
        if version.sha256("fp32") == onnx_sha256 and version.tags.get("rolled_back"):
            return version.version
    return None


def promote(name: str, alias: str, version: Version, champion: Version | None) -> None:
    """`alias` to `version`; `previous` to the version it replaced; a `challenger` alias on `version` removed."""
    client = mlflow.MlflowClient()
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
    client.set_registered_model_alias(name, alias, str(version.version))
    challenger = by_alias(name, CHALLENGER)
    if challenger is not None and challenger.version == version.version:
        client.delete_registered_model_alias(name, CHALLENGER)


def shadow(name: str, version: Version) -> None:
    """`challenger` to `version`: the service tries it on live traffic beside the champion."""
    mlflow.MlflowClient().set_registered_model_alias(name, CHALLENGER, str(version.version))


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

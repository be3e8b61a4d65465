"""The BentoML model store: where the export stage puts the ONNX model and the service finds it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import bentoml

from common.files import sha256_file

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REFERENCE_FILE = "reference.npz"  # what monitoring compares served traffic with: the validation split's outputs
# each file the BentoML model holds, by precision, and the metadata key of its checksum
MODEL_FILES = {"fp32": (ONNX_FILE, "onnx_sha256"), "int8": (INT8_FILE, "int8_sha256")}
STORED_FILES = {**MODEL_FILES, "reference": (REFERENCE_FILE, "reference_sha256")}
WORKSPACE = Path(__file__).resolve().parents[1]  # the project; in a built bento, its copy of serving/'s parent
EXPORT_RECORD = WORKSPACE / "export" / "export.json"  # the export stage's last model (the challenger)
SERVED_RECORD = WORKSPACE / "champion.json"  # the model the gate stage (or `make rollback`) decided to serve


def in_workspace() -> bool:
    """Whether the service runs in the project (`make serve`), not in a built bento."""
    return (WORKSPACE / "dvc.yaml").is_file()


def workspace_store() -> str | None:
    """The workspace's MLflow store (`make run` writes mlflow.db), as a tracking URI, where it exists."""
    store = WORKSPACE / "mlflow.db"
    return f"sqlite:///{store}" if in_workspace() and store.is_file() else None


class ModelMissingError(RuntimeError):
    """Nothing trained to serve here; the message names the ways out."""


def default_model_tag() -> str:
    """The workspace's champion (champion.json), so serving and `bentoml build` use exactly the model the
    registry's champion alias names, not whatever an experiment saved last; in a built bento (no workspace
    around it; BentoML's model store is then the bento's own), the one model it packages."""
    if not in_workspace():
        packaged = bentoml.models.list()
        if len(packaged) == 1:
            return str(packaged[0].tag)
    try:
        return json.loads(SERVED_RECORD.read_text())["bentoml_tag"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelMissingError(
            f"no model chosen to serve: {SERVED_RECORD.name} names none ({type(exc).__name__}); `make run` trains "
            "one and the gate stage picks it, `make pull` fetches the team's, or set BENTO_MODEL_TAG"
        ) from None


def read_record(path: Path) -> dict[str, Any]:
    """A JSON record (champion.json, export.json), or {} where there is none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def served_record() -> dict[str, Any]:
    """champion.json: the model the gate stage or `make rollback` chose (in a built bento, its copy)."""
    return read_record(SERVED_RECORD)


def read_metadata(path: Path | str) -> dict[str, Any]:
    """An ONNX file's metadata_props, JSON values decoded."""
    import onnx  # export time only: a bento serves without it

    return decode_metadata({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})


def decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    """ONNX metadata values are strings; the export stage JSON-encodes every non-string value."""
    decoded = {}
    for key, value in props.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def save_onnx(files: dict[str, Path], name: str, labels: dict[str, str] | None = None) -> str:
    """Save the exported files (by role: "fp32", "int8", "reference") as a new version of BentoML model `name`,
    with the fp32 file's ONNX metadata, every file's checksum (checked when served) and labels from that
    metadata (dataset, model, run id, accuracy) plus `labels`; return the tag."""
    metadata = read_metadata(files["fp32"])
    metadata.update({STORED_FILES[role][1]: sha256_file(path) for role, path in files.items()})
    described = {
        "dataset": metadata["dataset"],
        "model": metadata["model_name"],
        "run_id": metadata["mlflow_run_id"],
        "accuracy": f"{metadata['test_accuracy']:.4f}",
    }
    with bentoml.models.create(name, labels={**described, **(labels or {})}, metadata=metadata) as model:
        for role, path in files.items():
            shutil.copyfile(path, model.path_of(STORED_FILES[role][0]))
    return str(model.tag)

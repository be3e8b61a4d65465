"""Where the served model comes from: the local BentoML store, or the export stage's files where a clone
pulled them from the team's DVC remote (`make pull`) instead of training."""

from __future__ import annotations

import bentoml
from bentoml.exceptions import NotFound

from serving.model_store import EXPORT_RECORD, MODEL_FILES, STORED_FILES, save_onnx


class ModelMissingError(RuntimeError):
    """Nothing trained to serve here; the message names the ways out."""


def ensure_model(tag: str) -> None:
    """BentoML model `tag` in the local store. Where it is missing but the export stage's files are here (a
    clone that pulled them), they are saved into the store under that very tag, the one export/export.json
    records, so that serving, `bentoml build` and the record agree."""
    try:
        bentoml.models.get(tag)
        return
    except NotFound:
        pass
    export_dir = EXPORT_RECORD.parent
    files = {role: export_dir / name for role, (name, _) in STORED_FILES.items() if (export_dir / name).is_file()}
    if "fp32" not in files or tag.endswith(":latest"):
        raise ModelMissingError(
            f"no trained model to serve: BentoML model {tag} is not in the local store and "
            f"{export_dir.name}/{MODEL_FILES['fp32'][0]} is missing; train one with `make run`, "
            "or fetch the team's from the DVC remote with `make pull`"
        )
    save_onnx(files, tag, {"source": "dvc pull"})

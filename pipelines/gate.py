"""gate stage: the exported challenger against the registry's `champion`, both as served (the fp32 ONNX file), on
the official test set and each extra folder's held-out images; promoted (registered as a new version of the
served model, `champion` moved to it and `previous` to the one it replaced) only if it is not worse on the test
set by more than `gate.tolerance` points and not worse on any held-out folder. champion.json names the model
that is served, with both models' figures and the decision; the challenger's MLflow run gets them as tags."""

import logging
import tempfile
from pathlib import Path

import mlflow

from pipelines._stage import run
from serving.files import read_json, sha256_file, write_json
from serving.model_source import restore_model
from training import registry, tracking
from training.config import CHALLENGER_FILE, CHAMPION_FILE, DATASET_FILE, EXPORT_DIR, Params
from training.data import Prepared
from training.errors import PipelineError
from training.gate import Decision, accuracies, decide

log = logging.getLogger("gate")


def main() -> None:
    params = Params.load()
    name, alias = params.registered_model_name, params.mlflow.alias
    challenger = read_json(CHALLENGER_FILE)
    exported = read_json(EXPORT_DIR / "export.json")
    prepared = Prepared.load(DATASET_FILE)
    tracking.setup(params.experiment_name)
    champion = registry.by_alias(name, alias)
    if not registry.is_served_model(champion):
        champion = None  # none yet, or a version from before the registry held the served model
    onnx_sha256 = sha256_file(exported["onnx"])
    challenger_scores = accuracies(Path(exported["onnx"]), prepared)
    champion_scores = None
    if champion is not None:
        with tempfile.TemporaryDirectory() as folder:
            files = registry.download(name, champion, Path(folder))
            champion_scores = accuracies(files["fp32"], prepared)
            restore_model(champion.bentoml_tag, files)  # served from here on: the BentoML store must hold it
    decision = decide(challenger_scores, champion_scores, params.gate.tolerance)
    rolled_back = registry.rolled_back_version(name, onnx_sha256)
    if champion is not None and champion.tags.get("onnx_sha256") == onnx_sha256:
        decision = Decision(False, f"kept the champion: the challenger is version {champion.version}, the same file")
    elif decision.promote and rolled_back is not None:
        decision = Decision(
            False, f"kept the champion: the challenger is version {rolled_back}, rolled back with `make rollback`"
        )
    figures = {f"gate.challenger.{split}_accuracy": v for split, v in challenger_scores.items()}
    figures |= {f"gate.champion.{split}_accuracy": v for split, v in (champion_scores or {}).items()}
    if decision.promote and not params.gate.promote:
        decision = Decision(False, f"would have {decision.reason}; not promoted, as gate.promote is false")
    tags = {"gate.decision": "promoted" if decision.promote else "kept", "gate.reason": decision.reason}
    with tracking.start_run(run_id=challenger["run_id"]):
        mlflow.log_metrics(figures)
        mlflow.set_tags(tags)
    if decision.promote:
        version = registry.register(
            name,
            challenger["run_id"],
            Path(exported["onnx"]),
            registry.version_tags(challenger, exported, onnx_sha256) | tags,
        )
        registry.promote(name, alias, version, champion)
        served = version
    elif champion is not None:
        served = champion
    else:
        raise PipelineError(f"{decision.reason}, and there is no champion to serve instead")
    gate = {
        "decision": tags["gate.decision"],
        "reason": decision.reason,
        "tolerance_points": params.gate.tolerance,
        "challenger": {"model": challenger["model"], "run_id": challenger["run_id"], "accuracy": challenger_scores},
        "champion": None if champion is None else {"version": champion.version, "accuracy": champion_scores},
    }
    write_json({**registry.served_record(name, alias, served), "gate": gate}, CHAMPION_FILE)
    log.info("%s; serving %s version %s (%s)", decision.reason, name, served.version, served.bentoml_tag)


if __name__ == "__main__":
    run(main)

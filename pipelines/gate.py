"""gate stage: the exported challenger against the registry's `champion`, both as the service serves them (the
int8 file on a CPU, fp32 on a GPU: `gate.precision`), on the official test set and each extra folder's
held-out images, with McNemar's test on the images only one of them gets right; a challenger that passes is
registered (with a signature and an input example) and, by `gate.mode`, promoted (`champion` moved to it,
`previous` to the one it replaced), shadowed (the `challenger` alias: tried on live traffic until
`make promote`) or only recorded, which is what a `dvc exp run` does unless `gate.experiment_mode` says
otherwise. champion.json names the model that is served, with both models' figures and the decision; the
challenger's MLflow run gets them as tags and metrics."""

import logging
import tempfile
from pathlib import Path

import mlflow

from common.files import read_json, sha256_file, write_json
from common.model_source import restore_model
from common.model_store import STORED_FILES
from pipelines._stage import run
from training import registry, tracking
from training.config import CHALLENGER_FILE, CHAMPION_FILE, DATASET_FILE, EXPORT_DIR, Params
from training.data import Prepared
from training.errors import PipelineError
from training.gate import TEST, Decision, correctness, decide, judged_precision, mode, precisions

log = logging.getLogger("gate")
OUTCOMES = {"promote": "promoted", "shadow": "shadowed", "record": "recorded"}  # a passing challenger, by mode


def exported_files(exported: dict) -> dict[str, Path]:
    """The export stage's files by role (an int8 file only where it passed its own gate)."""
    found = {"fp32": exported["onnx"], "int8": exported.get("int8_onnx"), "reference": exported.get("reference")}
    return {role: Path(path) for role, path in found.items() if path and Path(path).is_file()}


def accuracy_table(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{precision: {split: accuracy}} from {precision: {split: right answers}}."""
    return {
        precision: {split: float(right.mean()) for split, right in splits.items()}
        for precision, splits in results.items()
    }


def main() -> None:
    params = Params.load()
    name, alias = params.registered_model_name, params.mlflow.alias
    gate_mode, mode_source = mode(params.gate)
    challenger = read_json(CHALLENGER_FILE)
    exported = read_json(EXPORT_DIR / "export.json")
    prepared = Prepared.load(DATASET_FILE)
    tracking.setup(params.experiment_name)
    champion = registry.by_alias(name, alias)
    if not registry.is_served_model(champion):
        champion = None  # none yet, or a version from before the registry held the served model
    files = exported_files(exported)
    onnx_sha256 = sha256_file(files["fp32"])
    challenger_results = {p: correctness(files[p], prepared) for p in precisions(files)}
    champion_results = None
    same_file = champion is not None and champion.sha256("fp32") == onnx_sha256
    if champion is not None and not same_file:
        with tempfile.TemporaryDirectory() as folder:
            champion_files = registry.download(name, champion, tuple(STORED_FILES), Path(folder))
            champion_results = {p: correctness(champion_files[p], prepared) for p in precisions(champion_files)}
            restore_model(champion.bentoml_tag, champion_files)  # served from here on: the BentoML store must hold it
    available = [p for p in precisions(files) if champion_results is None or p in champion_results]
    judged = judged_precision(params.gate.precision, available)
    decision, paired = decide(
        challenger_results[judged], None if champion_results is None else champion_results[judged], params.gate
    )
    rolled_back = registry.rolled_back_version(name, onnx_sha256)
    if same_file:
        decision = Decision(False, f"the challenger is version {champion.version}, the same file")  # type: ignore[union-attr]
    elif decision.passed and rolled_back is not None:
        decision = Decision(False, f"the challenger is version {rolled_back}, rolled back with `make rollback`")
    outcome = OUTCOMES[gate_mode] if decision.passed else "kept"
    if decision.passed and gate_mode == "shadow" and champion is None:
        outcome = "promoted"  # nothing to try it against: the first model serves
    reason = f"{outcome} ({gate_mode} mode, from {mode_source}): {decision.reason}"
    tags = {"gate.decision": outcome, "gate.reason": reason, "gate.precision": judged}
    with tracking.start_run(run_id=challenger["run_id"]):
        for precision, splits in accuracy_table(challenger_results).items():
            mlflow.log_metrics({f"gate.challenger.{precision}.{split}_accuracy": v for split, v in splits.items()})
        for precision, splits in accuracy_table(champion_results or {}).items():
            mlflow.log_metrics({f"gate.champion.{precision}.{split}_accuracy": v for split, v in splits.items()})
        mlflow.log_metrics({f"gate.{split}.mcnemar_p": result.p_value for split, result in paired.items()})
        mlflow.set_tags(tags)
    served = champion
    if outcome in ("promoted", "shadowed"):
        example = prepared.images(TEST)[: registry.EXAMPLE_IMAGES]
        version_tags = registry.version_tags(challenger, exported, files) | tags
        version = registry.register(name, challenger["run_id"], files["fp32"], example, version_tags)
        if outcome == "promoted":
            registry.promote(name, alias, version, champion)
            served = version
        else:
            registry.shadow(name, version)
            reason += f"; registered as version {version.version}, alias {registry.CHALLENGER!r}: `make promote`"
    gate = {
        "decision": outcome,
        "reason": reason,
        "mode": gate_mode,
        "precision": judged,
        "rule": params.gate.model_dump(include={"tolerance", "holdout_tolerance", "alpha"}),
        "challenger": {
            "model": challenger["model"],
            "run_id": challenger["run_id"],
            "accuracy": accuracy_table(challenger_results),
        },
        "champion": None
        if champion is None
        else {"version": champion.version, "accuracy": accuracy_table(champion_results or {})},
        "paired": {split: result.figures() for split, result in paired.items()},
    }
    if served is None:
        if outcome != "recorded":
            raise PipelineError(f"{reason}, and there is no champion to serve instead")
        write_json({"registered_model": name, "version": None, "gate": gate}, CHAMPION_FILE)
        log.info("%s; nothing is served yet", reason)
        return
    write_json({**registry.served_record(name, alias, served), "gate": gate}, CHAMPION_FILE)
    log.info("%s; serving %s version %s (%s)", reason, name, served.version, served.bentoml_tag)


if __name__ == "__main__":
    run(main)

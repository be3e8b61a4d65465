"""export stage: the champion as one self-contained ONNX file, parity-checked, in MLflow and BentoML."""
import logging

import mlflow

from pipelines._stage import run
from training import tracking
from training.checkpoint import load_trained, read_json, write_json
from training.config import (CARD_FILE, CHAMPION_FILE, DATASET_FILE, EXPORT_DIR, dataset_spec, experiment_name,
                             flip_tta, load_params)
from training.data import Prepared
from training.export import check_parity, export_onnx

log = logging.getLogger("export")


def main() -> None:
    params = load_params()
    card = read_json(CARD_FILE)
    champion = read_json(CHAMPION_FILE)
    tta = flip_tta(params, "export", champion["model"])
    net = load_trained(champion["model"], params, card, flip_tta=tta)
    metadata = {
        "model_name": champion["model"],
        "dataset": card["dataset"],
        "class_names": card["class_names"],
        "upload_fit": dataset_spec(params).upload_fit,
        "mlflow_run_id": champion["run_id"],
        "registered_model": champion["registered_model"],
        "registered_version": champion["version"],
        "git_commit": tracking.git_commit(),
        "val_accuracy": champion["val_accuracy"],
        "test_accuracy": champion["test_accuracy"],
        "parameters": champion["parameters"],
        "test_time_augmentation": "flip" if tta else "none",
    }
    log.info("exporting %s to ONNX%s", champion["model"], " with flip TTA in the graph" if tta else "")
    path = export_onnx(net, EXPORT_DIR / "model.onnx", metadata)
    parity = check_parity(net, path, Prepared.load(DATASET_FILE).images("test"),
                          atol=params["export"]["parity_atol"], progress=True)
    log.info("parity on %d test images: max |p_onnx - p_torch| = %.2e, argmax disagreements: %d",
             parity["images"], parity["max_abs_probability_diff"], parity["argmax_disagreements"])

    tracking.setup(experiment_name(params))
    with tracking.start_run(run_id=champion["run_id"]):
        mlflow.log_artifact(str(path), artifact_path="onnx")
        mlflow.log_metrics({f"onnx_parity.{k}": float(v) for k, v in parity.items()})

    from serving.model_store import save_onnx  # bentoml is heavy; import only when exporting

    tag = save_onnx(path, params["export"]["bentoml_model"].format(dataset=card["dataset"]), labels={
        "dataset": card["dataset"], "model": champion["model"], "run_id": champion["run_id"],
        "accuracy": f"{champion['test_accuracy']:.4f}",
    })
    write_json({"bentoml_tag": tag, "onnx": str(path), "parity": parity, **metadata}, EXPORT_DIR / "export.json")
    log.info("exported %s to %s and the BentoML store as %s", champion["model"], path, tag)


if __name__ == "__main__":
    run(main)

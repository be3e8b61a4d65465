"""export stage: the champion as one self-contained ONNX file, parity-checked, in MLflow and BentoML."""

import logging

from pipelines._stage import run
from serving.files import read_json, write_json
from serving.model_store import save_onnx
from training import tracking
from training.checkpoint import load_trained
from training.config import CARD_FILE, CHAMPION_FILE, DATASET_FILE, EXPORT_DIR, Params
from training.data import Prepared
from training.export import check_parity, export_onnx, onnx_metadata

log = logging.getLogger("export")


def main() -> None:
    params = Params.load()
    card = read_json(CARD_FILE)
    champion = read_json(CHAMPION_FILE)
    tta = params.tta_for(champion["model"])
    net = load_trained(champion["model"], params, card, tta)
    metadata = onnx_metadata(champion, card, params.data.spec.upload_fit, tta.describe(), tracking.git_commit())
    log.info("exporting %s to ONNX, test-time augmentation in the graph: %s", champion["model"], tta.describe())
    path = export_onnx(net, EXPORT_DIR / "model.onnx", metadata)
    parity = check_parity(
        net, path, Prepared.load(DATASET_FILE).images("test"), atol=params.export.parity_atol, progress=True
    )
    log.info(
        "parity on %d test images: max |p_onnx - p_torch| = %.2e, argmax disagreements: %d",
        parity["images"],
        parity["max_abs_probability_diff"],
        parity["argmax_disagreements"],
    )

    tracking.setup(params.experiment_name)
    tracking.log_export(champion["run_id"], path, parity)
    tag = save_onnx(
        path,
        params.bentoml_model_name,
        labels={
            "dataset": card["dataset"],
            "model": champion["model"],
            "run_id": champion["run_id"],
            "accuracy": f"{champion['test_accuracy']:.4f}",
        },
    )
    write_json({"bentoml_tag": tag, "onnx": str(path), "parity": parity, **metadata}, EXPORT_DIR / "export.json")
    log.info("exported %s to %s and the BentoML store as %s", champion["model"], path, tag)


if __name__ == "__main__":
    run(main)

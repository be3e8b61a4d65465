"""export stage: the champion in two self-contained ONNX files, test-time augmentation, normalisation and
metadata inside (uint8 pixels `[N,1,28,28]` in, logits and probabilities out): `model.onnx` (fp32,
parity-checked against PyTorch on every test image) and `model.int8.onnx` (static QDQ quantization calibrated
on training images, kept only if it passes the accuracy gate against fp32); both logged to the champion's
MLflow run and saved in the BentoML model store."""

import logging

import numpy as np

from pipelines._stage import run
from serving.files import read_json, write_json
from serving.model_store import save_onnx
from training import tracking
from training.checkpoint import load_trained
from training.config import CARD_FILE, CHAMPION_FILE, DATASET_FILE, EXPORT_DIR, Params
from training.data import Prepared
from training.export import check_parity, export_onnx, onnx_metadata
from training.quantize import QuantizationGateError, int8_gate, onnx_probabilities, quantize_int8

log = logging.getLogger("export")


def main() -> None:
    params = Params.load()
    card = read_json(CARD_FILE)
    champion = read_json(CHAMPION_FILE)
    prepared = Prepared.load(DATASET_FILE)
    tta = params.tta_for(champion["model"])
    net = load_trained(champion["model"], params, card, tta)
    metadata = onnx_metadata(champion, card, params.data.spec.upload_fit, tta.describe(), tracking.git_commit())
    log.info("exporting %s to ONNX, test-time augmentation in the graph: %s", champion["model"], tta.describe())
    path = export_onnx(net, EXPORT_DIR / "model.onnx", metadata)
    test_images, test_labels = prepared.images("test"), prepared.labels("test")
    parity, fp32_probabilities = check_parity(net, path, test_images, atol=params.export.parity_atol, progress=True)
    log.info(
        "parity on %d test images: max |p_onnx - p_torch| = %.2e, argmax disagreements: %d",
        parity["images"],
        parity["max_abs_probability_diff"],
        parity["argmax_disagreements"],
    )

    settings = params.export.int8
    train_images = prepared.images("train")
    chosen = np.random.default_rng(params.data.seed).choice(
        len(train_images), min(settings.calibration_images, len(train_images)), replace=False
    )
    log.info("quantizing to int8, calibrated on %d training images", len(chosen))
    int8_path = quantize_int8(path, EXPORT_DIR / "model.int8.onnx", train_images[np.sort(chosen)])
    try:
        gate = int8_gate(
            fp32_probabilities,
            onnx_probabilities(int8_path, test_images),
            test_labels,
            settings.max_accuracy_drop,
            settings.min_agreement,
        )
    except QuantizationGateError:
        int8_path.unlink()  # never left where serving or `dvc commit` could take it
        raise
    log.info(
        "int8 gate passed: test accuracy %.4f (fp32 %.4f), argmax agreement %.4f",
        gate["int8_test_accuracy"],
        gate["fp32_test_accuracy"],
        gate["int8_argmax_agreement"],
    )

    tracking.setup(params.experiment_name)
    tracking.log_export(champion["run_id"], [path, int8_path], parity, gate)
    tag = save_onnx(
        {"fp32": path, "int8": int8_path},
        params.bentoml_model_name,
        labels={
            "dataset": card["dataset"],
            "model": champion["model"],
            "run_id": champion["run_id"],
            "accuracy": f"{champion['test_accuracy']:.4f}",
        },
    )
    record = {"bentoml_tag": tag, "onnx": str(path), "int8_onnx": str(int8_path), "parity": parity, "int8_gate": gate}
    write_json({**record, **metadata}, EXPORT_DIR / "export.json")
    log.info("exported %s to %s and the BentoML store as %s", champion["model"], path, tag)


if __name__ == "__main__":
    run(main)

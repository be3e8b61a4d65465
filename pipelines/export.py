"""export stage: the challenger in two self-contained ONNX files, test-time augmentation, normalisation and
metadata inside (uint8 pixels `[N,1,28,28]` in, logits and probabilities out): `model.onnx` (fp32,
parity-checked against PyTorch on every test image) and `model.int8.onnx` (static QDQ quantization calibrated
on training images, kept only if it passes the accuracy gate against fp32); both logged to its
MLflow run and saved in the BentoML model store, for the gate stage to weigh."""

import logging

from pipelines._stage import run
from serving.files import read_json, write_json
from serving.model_store import save_onnx
from training import tracking
from training.bundle import build_bundle
from training.checkpoint import load_augmented
from training.config import CARD_FILE, CHALLENGER_FILE, CONTRAST_DIR, DATASET_FILE, EXPORT_DIR, Params
from training.data import IDX_IMAGES_MAGIC, Prepared, read_idx
from training.datasets import TEST_IMAGES
from training.export import onnx_metadata

log = logging.getLogger("export")


def main() -> None:
    params = Params.load()
    card = read_json(CARD_FILE)
    challenger = read_json(CHALLENGER_FILE)
    tta = params.tta_for(challenger["model"])
    metadata = onnx_metadata(challenger, card, params.data.spec.upload_fit, tta.describe(), tracking.git_commit())
    contrast_spec = params.data.contrast_spec
    contrast = read_idx(CONTRAST_DIR / TEST_IMAGES, IDX_IMAGES_MAGIC)[:, None] if contrast_spec else None
    log.info("exporting %s to ONNX, test-time augmentation in the graph: %s", challenger["model"], tta.describe())
    bundle = build_bundle(
        load_augmented(challenger["model"], params, card),
        Prepared.load(DATASET_FILE),
        contrast,
        params.export,
        metadata,
        EXPORT_DIR,
        params.data.seed,
        params.evaluate.batch_size,
    )
    tracking.setup(params.experiment_name)
    tracking.log_export(challenger["run_id"], list(bundle.files.values()), bundle.figures)
    tag = save_onnx(bundle.files, params.bentoml_model_name)
    ood = params.export.ood
    record = {
        "bentoml_tag": tag,
        "onnx": str(bundle.files["fp32"]),
        "int8_onnx": str(bundle.files["int8"]),
        "reference": str(bundle.files["reference"]),
        "parity": bundle.figures["onnx_parity"],
        "int8_gate": bundle.figures["int8_gate"],
        "ood": {
            "score": "relative Mahalanobis distance of the embedding",
            "fit_images": ood.fit_images,
            "false_positive_rate": ood.false_positive_rate,
            "contrast_dataset": contrast_spec.name if contrast_spec else None,
            **bundle.figures["ood"],
        },
    }
    write_json({**record, **metadata}, EXPORT_DIR / "export.json")
    log.info("exported %s to %s and the BentoML store as %s", challenger["model"], EXPORT_DIR, tag)


if __name__ == "__main__":
    run(main)

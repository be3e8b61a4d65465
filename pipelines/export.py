"""export stage: the challenger (or its one-view student, where the distill stage chose it) in two self-contained
ONNX files, test-time augmentation, normalisation and metadata inside (uint8 pixels `[N,1,28,28]` in, logits and
probabilities out): `model.onnx` (fp32, parity-checked against PyTorch on every test image) and `model.int8.onnx`
(static QDQ quantization calibrated on training images, kept only if it passes the accuracy gate against fp32);
saved in the BentoML model store and logged to the challenger's MLflow run in a folder of their own (a run
exported again keeps each export's files), for the gate stage to weigh."""

import logging

from common.files import read_json, write_json
from common.model_store import save_onnx
from common.registry import run_files
from pipelines._stage import run
from training import tracking
from training.bundle import build_bundle
from training.checkpoint import load_augmented, load_trained
from training.config import (
    CARD_FILE,
    CHALLENGER_FILE,
    CONTRAST_DIR,
    DATASET_FILE,
    DISTILL_FILE,
    DISTILL_WEIGHTS,
    EXPORT_DIR,
    Params,
    TtaSettings,
)
from training.data import IDX_IMAGES_MAGIC, Prepared, read_idx
from training.datasets import TEST_IMAGES
from training.export import onnx_metadata
from training.models import TestTimeAugmented

log = logging.getLogger("export")


def exported_model(params: Params, card: dict, challenger: dict) -> tuple[TestTimeAugmented, dict, str]:
    """What is exported: the challenger with its test-time views, or its student with one view where the distill
    stage chose it; with the figures and the views its metadata names."""
    name, distilled = challenger["model"], read_json(DISTILL_FILE)
    if not distilled["exported"]:
        tta = params.tta_for(name)
        return load_augmented(name, params, card), challenger, tta.describe()
    student = load_trained(name, params, card, DISTILL_WEIGHTS)
    scores = {"val_accuracy": distilled["student_val_accuracy"], "test_accuracy": distilled["student_test_accuracy"]}
    views = f"none (distilled from {distilled['teacher_views']} views)"
    return TestTimeAugmented(student, TtaSettings(flip=False, shift=0)).eval(), challenger | scores, views


def main() -> None:
    params = Params.load()
    card = read_json(CARD_FILE)
    challenger = read_json(CHALLENGER_FILE)
    net, figures, views = exported_model(params, card, challenger)
    metadata = onnx_metadata(figures, card, params.data.spec.upload_fit, views, tracking.git_commit())
    contrast_spec = params.data.contrast_spec
    contrast = read_idx(CONTRAST_DIR / TEST_IMAGES, IDX_IMAGES_MAGIC)[:, None] if contrast_spec else None
    log.info("exporting %s to ONNX, test-time augmentation in the graph: %s", challenger["model"], views)
    bundle = build_bundle(
        net,
        Prepared.load(DATASET_FILE),
        contrast,
        params.export,
        metadata,
        EXPORT_DIR,
        params.data.seed,
        params.evaluate.batch_size,
    )
    tag = save_onnx(bundle.files, params.bentoml_model_name)
    tracking.setup(params.experiment_name)
    tracking.log_export(challenger["run_id"], list(bundle.files.values()), run_files(tag), bundle.figures)
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

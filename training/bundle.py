"""The files the service runs, from a trained model: the fp32 ONNX file with its out-of-distribution score fitted
on training images and parity-checked against PyTorch, its int8 twin behind the accuracy gate, each file's OOD
threshold calibrated on validation images, a probe batch of validation images with each file's answers in that
file's metadata (checked wherever the file is loaded), and the monitoring reference (the validation split as each file
sees it). What the export stage writes; the tests build their small served model the same way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.model_store import INT8_FILE, ONNX_FILE, REFERENCE_FILE
from common.probe import METADATA_KEY as PROBE_KEY
from common.probe import PROBE_IMAGES, probe_record
from common.runtime import onnx_outputs
from common.statistics import input_statistics
from training.config import ExportSettings
from training.data import Prepared, save_npz
from training.export import ServingModel, add_metadata, check_parity, export_onnx
from training.models import TestTimeAugmented
from training.ood import RelativeMahalanobis, calibrate, features
from training.quantize import QuantizationGateError, int8_gate, quantize_int8

log = logging.getLogger("export")
REFERENCE_OUTPUTS = ("probabilities", "ood_score", "embedding")


@dataclass
class Bundle:
    files: dict[str, Path]  # by role: fp32, int8, reference (common.model_store.STORED_FILES)
    figures: dict[str, dict]  # onnx_parity, int8_gate, ood (per precision)


def seeded_draw(count: int, size: int, seed: int) -> np.ndarray:
    """`size` of `count` indices (all where there are fewer), sorted, the same for the same seed."""
    return np.sort(np.random.default_rng(seed).choice(count, min(size, count), replace=False))


def build_bundle(
    net: TestTimeAugmented,
    data: Prepared,
    contrast: np.ndarray | None,
    settings: ExportSettings,
    metadata: dict[str, object],
    folder: Path,
    seed: int,
    batch_size: int,
) -> Bundle:
    """Write the served files into `folder`; raise a PipelineError where parity or the int8 gate fails (no int8
    file is left behind then). `contrast`: images unlike the data's, whose scores give the OOD AUROC."""
    train_images, train_labels = data.images("train"), data.labels("train")
    fit = seeded_draw(len(train_images), settings.ood.fit_images, seed)
    log.info("fitting the out-of-distribution score on the embeddings of %d training images", len(fit))
    _, embeddings = features(net, train_images[fit], batch_size)
    classes = len(metadata["class_names"])  # type: ignore[arg-type]
    model = ServingModel(net, RelativeMahalanobis(embeddings, train_labels[fit], classes))
    path = export_onnx(model, folder / ONNX_FILE, metadata)
    test_images, test_labels = data.images("test"), data.labels("test")
    parity, fp32_test = check_parity(
        model, path, test_images, atol=settings.parity_atol, score_rtol=settings.ood.parity_rtol, progress=True
    )
    log.info(
        "parity on %d test images: max |p_onnx - p_torch| = %.2e, OOD scores within %.2e, argmax disagreements: %d",
        parity["images"],
        parity["max_abs_probability_diff"],
        parity["max_relative_ood_score_diff"],
        parity["argmax_disagreements"],
    )

    chosen = seeded_draw(len(train_images), settings.int8.calibration_images, seed)
    log.info("quantizing to int8, calibrated on %d training images", len(chosen))
    int8_path = quantize_int8(path, folder / INT8_FILE, train_images[chosen])
    int8_test = onnx_outputs(int8_path, test_images)
    try:
        gate = int8_gate(
            fp32_test["probabilities"],
            int8_test["probabilities"],
            test_labels,
            settings.int8.max_accuracy_drop,
            settings.int8.min_agreement,
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

    val_images = data.images("val")
    probe = seeded_draw(len(val_images), PROBE_IMAGES, seed)
    reference = {"input_statistics": input_statistics(val_images)}
    scores: dict[str, dict[str, float]] = {}
    for precision, file, test in (("fp32", path, fp32_test), ("int8", int8_path, int8_test)):
        validation = onnx_outputs(file, val_images)
        contrast_scores = None if contrast is None else onnx_outputs(file, contrast)["ood_score"]
        figures = calibrate(
            validation["ood_score"], test["ood_score"], contrast_scores, settings.ood.false_positive_rate
        )
        recorded = probe_record(
            val_images[probe],
            validation["probabilities"][probe],
            validation["ood_score"][probe],
            settings.parity_atol,
            settings.ood.parity_rtol,
        )
        add_metadata(file, {"ood_threshold": figures["threshold"], PROBE_KEY: recorded})
        reference.update({f"{precision}_{key}": validation[key] for key in REFERENCE_OUTPUTS})
        scores[precision] = figures
        log.info(
            "%s OOD score: threshold %.2f flags %.1f%% of validation and %.1f%% of test images%s",
            precision,
            figures["threshold"],
            100 * figures["validation_flagged"],
            100 * figures["test_flagged"],
            f", {100 * figures['contrast_flagged']:.1f}% of the contrast images (AUROC {figures['auroc']:.4f})"
            if contrast is not None
            else "",
        )
    reference_path = folder / REFERENCE_FILE
    save_npz(reference, reference_path)
    files = {"fp32": path, "int8": int8_path, "reference": reference_path}
    return Bundle(files, {"onnx_parity": parity, "int8_gate": gate, "ood": scores})

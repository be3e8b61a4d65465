"""The int8 twin of the exported model: onnxruntime's static quantization (QDQ, per-channel int8 weights)
calibrated on training images, and the gate that keeps it only where it scores as the fp32 model does."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from common.runtime import INPUT_NAME
from training.errors import PipelineError
from training.export import save_checked

CALIBRATION_BATCH = 64


class QuantizationGateError(PipelineError):
    """The int8 model scores measurably worse than the fp32 one: it must not be served."""


class _CalibrationBatches(CalibrationDataReader):
    """uint8 images [N,1,28,28], fed to the graph batch by batch while the calibrator records ranges."""

    def __init__(self, images: np.ndarray):
        self.batches = iter(np.array_split(images, max(1, len(images) // CALIBRATION_BATCH)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}


def ood_only_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes that compute the out-of-distribution score from the embedding and nothing else: left in fp32,
    since an int8 quadratic form of a few hundred dimensions would blur the very distances it ranks."""
    producers = {output: node for node in model.graph.node for output in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producers.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    return sorted(ancestors("ood_score") - ancestors("logits"))


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> Path:
    """Write the int8 model: 8-bit activations and weights (weights per output channel) with QDQ nodes, so
    any execution provider can run it, the out-of-distribution head left in fp32; the fp32 file's metadata,
    `precision` set to int8."""
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and folding, as onnxruntime advises
        quantized = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            _CalibrationBatches(calibration_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # uint8 activations with int8 weights: what onnxruntime's x86 int8 kernels run fast (2.3x fp32
            # on this project's CPU); int8 activations ran at a third of fp32's speed there
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # weights in 7 bits: x86 CPUs without VNNI (AVX2 only) add pairs of uint8 x int8 products in int16,
            # which full-range weights overflow; on such an AMD EPYC the int8 file agreed with fp32 on 98.7% of
            # the test images and lost 0.3 points, and with 7-bit weights on 99.7%, losing none
            reduce_range=True,
            nodes_to_exclude=ood_only_nodes(onnx.load(str(prepared))),
        )
        proto = onnx.load(str(quantized))
    props = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    props["precision"] = "int8"
    props["calibration_images"] = str(len(calibration_images))
    save_checked(proto, int8_path, props)
    return int8_path


def int8_gate(
    fp32_probabilities: np.ndarray,
    int8_probabilities: np.ndarray,
    labels: np.ndarray,
    max_accuracy_drop: float,
    min_agreement: float,
) -> dict[str, float]:
    """The gate's figures on the test set; raise unless int8 accuracy is within `max_accuracy_drop` of fp32
    and the two models' argmax agree on at least `min_agreement` of the images."""
    fp32_predicted, int8_predicted = fp32_probabilities.argmax(1), int8_probabilities.argmax(1)
    figures = {
        "fp32_test_accuracy": float((fp32_predicted == labels).mean()),
        "int8_test_accuracy": float((int8_predicted == labels).mean()),
        "int8_argmax_agreement": float((fp32_predicted == int8_predicted).mean()),
    }
    figures["int8_accuracy_drop"] = figures["fp32_test_accuracy"] - figures["int8_test_accuracy"]
    if figures["int8_accuracy_drop"] > max_accuracy_drop or figures["int8_argmax_agreement"] < min_agreement:
        raise QuantizationGateError(
            f"the int8 model fails the gate on {len(labels)} test images: accuracy "
            f"{figures['int8_test_accuracy']:.2%} against fp32 {figures['fp32_test_accuracy']:.2%} "
            f"(a drop of {figures['int8_accuracy_drop'] * 100:.2f} points, at most {max_accuracy_drop * 100:.2f} "
            f"allowed), argmax agreement {figures['int8_argmax_agreement']:.2%} (at least {min_agreement:.2%} "
            "required); export.int8 in params.yaml sets the calibration and the gate"
        )
    return figures

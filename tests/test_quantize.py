"""The int8 export: static QDQ quantization calibrated on training images, and the gate against fp32."""

import copy

import onnx
import pytest
import torch
from onnx import numpy_helper

from common.model_store import read_metadata
from common.runtime import onnx_outputs
from tests.serving_fixtures import contrast_images, export_small, small_net
from training.ood import auroc
from training.quantize import QuantizationGateError, int8_gate, ood_only_nodes, quantize_int8


def probabilities(path, images):
    return onnx_outputs(path, images)["probabilities"]


MAX_DROP, MIN_AGREEMENT = 0.002, 0.995  # params.yaml's export.int8
# A model trained for seconds has many images its top two classes nearly tie on: int8 flips about 0.7%
# of them (the champion, trained for real, 0.2%), so its gate asks for 99% agreement.
SMALL_MODEL_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def small():
    return small_net()


def test_the_int8_model_scores_as_the_fp32_one_and_says_it_is_int8(small, tmp_path):
    fp32 = export_small(small.net, small, tmp_path / "model.onnx")
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", small.x_train[:512])
    figures = int8_gate(
        probabilities(fp32, small.x_test),
        probabilities(int8, small.x_test),
        small.y_test,
        MAX_DROP,
        SMALL_MODEL_AGREEMENT,
    )
    assert figures["int8_argmax_agreement"] >= SMALL_MODEL_AGREEMENT
    assert figures["int8_accuracy_drop"] <= MAX_DROP
    assert figures["fp32_test_accuracy"] > 0.8  # a trained model, so the agreement means something
    metadata = read_metadata(int8)
    assert metadata["precision"] == "int8" and metadata["calibration_images"] == 512
    assert metadata["model_name"] == "mlp_512" and metadata["class_names"][9] == "Ankle boot"
    graph = onnx.load(str(int8)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    # 7-bit weights: two products of a uint8 and a weight of at most 64 add up within int16, as x86 int8
    # kernels without VNNI add them
    assert weights and all(abs(w.astype(int)).max() <= 64 for w in weights)
    head = sum(t.ByteSize() for t in onnx.load(str(fp32)).graph.initializer if t.name.startswith("ood_score."))
    # int8 weights: a quarter of the bytes, plus scales; the OOD head stays fp32
    assert int8.stat().st_size - head < (fp32.stat().st_size - head) / 3


def test_an_int8_model_that_loses_accuracy_fails_the_gate_with_its_figures(small, tmp_path):
    """One of 512 hidden units becomes a huge constant that the next layer ignores: the fp32 model scores
    as before, but that unit stretches the layer's 8-bit range until every other activation rounds to
    the same few values."""
    net = copy.deepcopy(small.net)
    first, second = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][:2]
    with torch.no_grad():
        first.weight[0], first.bias[0] = 0.0, 1e5
        second.weight[:, 0] = 0.0
    fp32 = export_small(net, small, tmp_path / "model.onnx")
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", small.x_train[:512])
    fp32_probabilities = probabilities(fp32, small.x_test)
    original = probabilities(export_small(small.net, small, tmp_path / "original.onnx"), small.x_test)
    accuracy = [(p.argmax(1) == small.y_test).mean() for p in (fp32_probabilities, original)]
    assert abs(accuracy[0] - accuracy[1]) < 0.01  # the fp32 model is as good as before
    with pytest.raises(QuantizationGateError, match=r"accuracy .* drop of .* points.*argmax agreement"):
        int8_gate(fp32_probabilities, probabilities(int8, small.x_test), small.y_test, MAX_DROP, MIN_AGREEMENT)


def test_the_ood_score_stays_in_fp32_and_ranks_as_the_fp32_files_does(small, tmp_path):
    fp32 = export_small(small.net, small, tmp_path / "model.onnx")
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", small.x_train[:512])
    head = set(ood_only_nodes(onnx.load(str(fp32))))
    assert head and {n.op_type for n in onnx.load(str(fp32)).graph.node if n.name in head} >= {"MatMul"}
    graph = onnx.load(str(int8)).graph
    producers = {output: node for node in graph.node for output in node.output}
    score_node = producers["ood_score"]
    assert "QuantizeLinear" not in {producers[i].op_type for i in score_node.input if i in producers}
    digits = contrast_images()[:2000]
    scores = {
        name: (onnx_outputs(f, small.x_test[:2000])["ood_score"], onnx_outputs(f, digits)["ood_score"])
        for name, f in (("fp32", fp32), ("int8", int8))
    }
    figures = {name: auroc(*pair) for name, pair in scores.items()}
    assert figures["fp32"] > 0.9 and abs(figures["int8"] - figures["fp32"]) < 0.01, figures

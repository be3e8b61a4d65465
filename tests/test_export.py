"""ONNX export: self-contained file, dynamic batch axis, metadata round trip, parity check."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from serving.model_store import read_metadata
from tests.conftest import REPO, zoo_model
from training.config import TtaSettings, load_params
from training.export import ParityError, check_parity, export_onnx
from training.models import TestTimeAugmented

PARITY_ATOL = load_params(REPO / "params.yaml")["export"]["parity_atol"]
METADATA = {
    "model_name": "cnn_basic",
    "dataset": "fashion-mnist",
    "class_names": [f"c{i}" for i in range(10)],
    "mlflow_run_id": "abc123",
    "git_commit": "deadbeef",
    "val_accuracy": 0.9,
    "test_accuracy": 0.89,
    "upload_fit": 28,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = zoo_model("cnn_basic", mean=0.3, std=0.35, batch_norm=True).eval()
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "model.onnx", METADATA)
    return net, path


def test_one_self_contained_file_that_passes_the_full_check(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["logits", "probabilities"]


def test_metadata_round_trip(exported):
    _, path = exported
    metadata = read_metadata(path)
    assert {k: metadata[k] for k in METADATA} == METADATA
    assert metadata["input_spec"]["shape"] == ["N", 1, 28, 28]
    assert metadata["input_spec"]["dtype"] == "uint8"


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_dynamic_batch_axis_and_preprocessing_inside_the_graph(exported, batch):
    net, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
    logits, probabilities = session.run(None, {"images": images})
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, atol=PARITY_ATOL)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_parity_check_passes_for_the_exported_model(exported):
    net, path = exported
    images = np.random.default_rng(0).integers(0, 256, (500, 1, 28, 28), dtype=np.uint8)
    result, probabilities = check_parity(net, path, images, atol=PARITY_ATOL, batch_size=128)
    assert result["argmax_disagreements"] == 0 and result["max_abs_probability_diff"] <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probabilities, session.run(["probabilities"], {"images": images})[0], atol=1e-6)


def test_parity_check_fails_when_the_graph_differs(exported):
    _, path = exported
    other = zoo_model("cnn_basic", mean=0.3, std=0.35, batch_norm=True).eval()  # other weights
    images = np.random.default_rng(0).integers(0, 256, (200, 1, 28, 28), dtype=np.uint8)
    with pytest.raises(ParityError, match="ONNX and PyTorch disagree"):
        check_parity(other, path, images, atol=PARITY_ATOL)


def test_tta_travels_inside_the_exported_graph(tmp_path):
    """A residual net exported with test-time augmentation: the graph itself averages over the ten views."""
    torch.manual_seed(0)
    resnet = zoo_model("resnet", mean=0.3, std=0.35, stem=8, widths=[8, 16, 16], blocks=[1, 1, 1])
    net = TestTimeAugmented(resnet, TtaSettings(flip=True, shift=1)).eval()
    path = export_onnx(net, tmp_path / "model.onnx", METADATA)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    logits, _ = session.run(None, {"images": images})
    mirrored, _ = session.run(None, {"images": np.ascontiguousarray(images[..., ::-1])})
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, atol=PARITY_ATOL)
    np.testing.assert_allclose(logits, mirrored, atol=PARITY_ATOL)

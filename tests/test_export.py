"""ONNX export: self-contained file, dynamic batch axis, every output (the OOD score and embedding too),
metadata round trip, parity check."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from common.model_store import read_metadata
from common.runtime import OUTPUT_NAMES
from tests.conftest import REPO, zoo_model
from training.config import TtaSettings, load_params
from training.export import ParityError, ServingModel, add_metadata, check_parity, export_onnx
from training.models import TestTimeAugmented
from training.ood import RelativeMahalanobis, features

PARITY_ATOL = load_params(REPO / "params.yaml")["export"]["parity_atol"]
SCORE_RTOL = load_params(REPO / "params.yaml")["export"]["ood"]["parity_rtol"]
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


NO_VIEWS = TtaSettings(flip=False, shift=0)


def serving_model(net: torch.nn.Sequential, tta: TtaSettings = NO_VIEWS) -> ServingModel:
    """`net` with its OOD score fitted on the embeddings of random images, labelled at random."""
    augmented = TestTimeAugmented(net.eval(), tta).eval()
    rng = np.random.default_rng(0)
    _, embeddings = features(augmented, rng.integers(0, 256, (300, 1, 28, 28), dtype=np.uint8), 256)
    return ServingModel(augmented, RelativeMahalanobis(embeddings, np.arange(300) % 10, 10)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = serving_model(zoo_model("cnn_basic", mean=0.3, std=0.35, batch_norm=True))
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", METADATA)
    return model, path


def test_one_self_contained_file_that_passes_the_full_check(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["logits", "probabilities", "ood_score", "embedding"]


def test_metadata_round_trip(exported):
    _, path = exported
    metadata = read_metadata(path)
    assert {k: metadata[k] for k in METADATA} == METADATA
    assert metadata["input_spec"]["shape"] == ["N", 1, 28, 28]
    assert metadata["input_spec"]["dtype"] == "uint8"


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_dynamic_batch_axis_and_preprocessing_inside_the_graph(exported, batch):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    images = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
    logits, probabilities, score, embedding = session.run(None, {"images": images})
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(images))]
    np.testing.assert_allclose(logits, expected[0], atol=PARITY_ATOL)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert score.shape == (batch,) and embedding.shape == (batch, 128)  # cnn_basic's dense layer
    np.testing.assert_allclose(score, expected[2], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(embedding, expected[3], atol=1e-4)


def test_parity_check_passes_for_the_exported_model(exported):
    model, path = exported
    images = np.random.default_rng(0).integers(0, 256, (500, 1, 28, 28), dtype=np.uint8)
    result, outputs = check_parity(model, path, images, atol=PARITY_ATOL, score_rtol=SCORE_RTOL, batch_size=128)
    assert result["argmax_disagreements"] == 0 and result["max_abs_probability_diff"] <= 1e-4
    assert result["max_relative_ood_score_diff"] <= SCORE_RTOL
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"images": images})[0]
    np.testing.assert_allclose(outputs["probabilities"], probabilities, atol=1e-6)


def test_parity_check_fails_when_the_graph_differs(exported):
    model, path = exported
    other = serving_model(zoo_model("cnn_basic", mean=0.3, std=0.35, batch_norm=True))  # other weights
    images = np.random.default_rng(0).integers(0, 256, (200, 1, 28, 28), dtype=np.uint8)
    with pytest.raises(ParityError, match="ONNX and PyTorch disagree"):
        check_parity(other, path, images, atol=PARITY_ATOL, score_rtol=SCORE_RTOL)
    other_score = ServingModel(model.net, serving_model(zoo_model("cnn_basic")).ood_score)  # another OOD fit
    with pytest.raises(ParityError, match="max_relative_ood_score_diff"):
        check_parity(other_score, path, images, atol=PARITY_ATOL, score_rtol=SCORE_RTOL)


def test_tta_travels_inside_the_exported_graph(tmp_path):
    """A residual net exported with test-time augmentation: the graph itself averages over the ten views."""
    torch.manual_seed(0)
    resnet = zoo_model("resnet", mean=0.3, std=0.35, stem=8, widths=[8, 16, 16], blocks=[1, 1, 1])
    model = serving_model(resnet, TtaSettings(flip=True, shift=1))
    path = export_onnx(model, tmp_path / "model.onnx", METADATA)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    logits, _, score, embedding = session.run(None, {"images": images})
    mirrored = session.run(None, {"images": np.ascontiguousarray(images[..., ::-1])})
    with torch.no_grad():
        expected = model.net(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, atol=PARITY_ATOL)
    np.testing.assert_allclose(logits, mirrored[0], atol=PARITY_ATOL)
    np.testing.assert_allclose(embedding, mirrored[3], atol=1e-4)  # the embedding is averaged over the views too
    np.testing.assert_allclose(score, mirrored[2], rtol=1e-3, atol=1e-3)


def test_metadata_added_after_export_keeps_the_graph(exported, tmp_path):
    _, path = exported
    copy = tmp_path / "model.onnx"
    copy.write_bytes(path.read_bytes())
    add_metadata(copy, {"ood_threshold": 12.5})
    assert read_metadata(copy)["ood_threshold"] == 12.5 and read_metadata(copy)["model_name"] == "cnn_basic"
    assert onnx.load(str(copy)).graph == onnx.load(str(path)).graph

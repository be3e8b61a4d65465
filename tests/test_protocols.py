"""The ecosystem's clients against a real `bentoml serve`: BentoML's own HTTP clients, and Triton's official
client (tritonclient.http) speaking the Open Inference Protocol, JSON and binary tensors."""

import asyncio
import re

import bentoml
import numpy as np
import pytest
import requests
import tritonclient.http as triton
from bentoml.exceptions import BentoMLException
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.serving_fixtures import MODEL_NAME, png, serving, small_metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    """On the fp32 file, whose answers do not depend on how requests were batched together."""
    with serving(served_model, tmp_path_factory.mktemp("logs") / "serve.log", SERVING_PRECISION="fp32") as srv:
        yield srv


@pytest.fixture(scope="module")
def images(served_model) -> np.ndarray:
    return served_model["x"][:256]  # uint8 [256, 1, 28, 28]


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def answer(prediction: dict) -> dict:
    """A prediction but its id: two requests for one image get two ids and the same answer."""
    return {k: v for k, v in prediction.items() if k != "prediction_id"}


def answers(predictions: list[dict]) -> list[dict]:
    assert len({p["prediction_id"] for p in predictions}) == len(predictions)
    return [answer(p) for p in predictions]


def test_bentoml_client_predicts_as_the_http_routes(server, images, tmp_path):
    paths = []
    for i, image in enumerate(images[:100]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(image[0]))
    with bentoml.SyncHTTPClient(server.url) as client:
        for path in paths:
            expected = requests.post(f"{server.url}/predict", files={"image": path.read_bytes()}, timeout=30).json()
            assert answer(client.predict(image=path)) == answer(expected)
        with Image.open(paths[0]) as image:
            assert answer(client.predict(image=image)) == answer(client.predict(image=paths[0]))
        pixels = images[:100, 0].tolist()
        expected = requests.post(f"{server.url}/predict_batch", json={"images": pixels}, timeout=30).json()
        assert answers(client.predict_batch(images=pixels)) == answers(expected)


def test_bentoml_async_client_predicts_as_the_http_routes(server, images):
    pixels = images[:8, 0].tolist()

    async def ask():
        async with bentoml.AsyncHTTPClient(server.url) as client:
            return await client.predict_batch(images=pixels)

    expected = requests.post(f"{server.url}/predict_batch", json={"images": pixels}, timeout=30).json()
    assert answers(asyncio.run(ask())) == answers(expected)


def test_bentoml_client_errors_name_the_problem(server, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with bentoml.SyncHTTPClient(server.url) as client:
        with pytest.raises(BentoMLException, match="less than or equal to 255"):
            client.predict_batch(images=[[[300] * 28] * 28])
        with pytest.raises(BentoMLException, match="the image file is empty"):
            client.predict(image=empty)


def test_open_inference_protocol_health_and_metadata(triton_client, server, served_model):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL_NAME)
    assert not triton_client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    metadata = triton_client.get_model_metadata(MODEL_NAME)
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == {
        "logits": ("FP32", [-1, 10]),
        "probabilities": ("FP32", [-1, 10]),
        "ood_score": ("FP32", [-1]),
        "out_of_distribution": ("BOOL", [-1]),
        "prediction_id": ("BYTES", [-1]),
    }
    assert metadata["parameters"]["class_names"] == small_metadata()["class_names"]
    version = served_model["tag"].split(":")[1]
    assert metadata["versions"] == [version]
    assert triton_client.is_model_ready(MODEL_NAME, model_version=version)


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
def test_tritonclient_infer_gives_predict_batch_probabilities(triton_client, server, images, binary):
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    names = ("probabilities", "logits", "ood_score", "out_of_distribution", "prediction_id")
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in names]
    result = triton_client.infer(MODEL_NAME, [tensor], outputs=outputs, request_id="req-1")
    probabilities, logits = result.as_numpy("probabilities"), result.as_numpy("logits")
    assert result.get_response()["id"] == "req-1"
    assert probabilities.shape == logits.shape == (256, 10) and probabilities.dtype == np.float32
    batch = requests.post(f"{server.url}/predict_batch", json={"images": images[:, 0].tolist()}, timeout=60).json()
    assert [p["label"] for p in batch] == probabilities.argmax(1).tolist() == logits.argmax(1).tolist()
    top = np.array([p["confidence"] for p in batch])
    np.testing.assert_allclose(probabilities.max(1), top, atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.as_numpy("ood_score"), [p["ood_score"] for p in batch], rtol=1e-5, atol=1e-4)
    assert result.as_numpy("out_of_distribution").tolist() == [p["out_of_distribution"] for p in batch]
    ids = [i.decode() if isinstance(i, bytes) else i for i in result.as_numpy("prediction_id")]
    assert len(set(ids)) == 256 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_tritonclient_fp32_pixels_give_the_uint8_answers(triton_client, images):
    def infer(array: np.ndarray, datatype: str) -> np.ndarray:
        tensor = triton.InferInput("images", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return triton_client.infer(MODEL_NAME, [tensor]).as_numpy("probabilities")

    np.testing.assert_array_equal(infer(images[:16].astype(np.float32), "FP32"), infer(images[:16], "UINT8"))


def test_tritonclient_errors_are_4xx_with_a_reason(triton_client, images):
    tensor = triton.InferInput("images", [16, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images[:16, 0])
    with pytest.raises(InferenceServerException, match=r"input shape \[16, 28, 28\] must be \[N, 1, 28, 28\]"):
        triton_client.infer(MODEL_NAME, [tensor])
    tensor = triton.InferInput("images", list(images[:4].shape), "UINT8")
    tensor.set_data_from_numpy(images[:4])
    with pytest.raises(InferenceServerException, match="unknown model no-such-model"):
        triton_client.infer("no-such-model", [tensor])
    with pytest.raises(InferenceServerException, match="unknown output 'scores'"):
        triton_client.infer(MODEL_NAME, [tensor], outputs=[triton.InferRequestedOutput("scores")])


@pytest.mark.parametrize(
    ("tensor", "status", "message"),
    [
        ({"name": "x", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}, 400, "unknown input 'x'"),
        ({"name": "images", "datatype": "INT64", "shape": [1, 1, 28, 28], "data": [0] * 784}, 400, "INT64"),
        ({"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 783}, 400, "holds 783"),
        ({"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [256] * 784}, 400, "0-255"),
        ({"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}, 400, "whole numbers"),
        ({"name": "images", "datatype": "UINT8", "shape": [0, 1, 28, 28], "data": []}, 400, "send 1 to"),
    ],
)
def test_bad_tensors_get_an_open_inference_protocol_error(server, tensor, status, message):
    response = requests.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json={"inputs": [tensor]}, timeout=10)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_binary_data_of_the_wrong_size_is_refused(server):
    header = b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], '
    header += b'"parameters": {"binary_data_size": 784}}]}'
    response = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        data=header + bytes(700),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert response.status_code == 400 and "700 bytes" in response.json()["error"], response.text

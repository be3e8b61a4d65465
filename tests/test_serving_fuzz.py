"""Generated malformed requests against a real `bentoml serve`: never a 5xx, and the service still answers
correctly afterwards. Hypothesis builds the requests (derandomized, so a failure reproduces)."""

import json
import socket

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving_fixtures import png, serving

pytestmark = pytest.mark.slow
EXAMPLES = 900
MAX_BODY = 1024 * 1024

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=40,
)
pixel_rows = st.lists(
    st.one_of(st.integers(-300, 300), st.floats(-1, 300, allow_nan=False), st.booleans()), min_size=0, max_size=30
)
near_images = st.one_of(  # almost-valid images: wrong sizes, values out of range, wrong nesting
    st.lists(pixel_rows, min_size=0, max_size=30),
    st.lists(st.integers(-5, 300), min_size=780, max_size=790),
    st.builds(lambda n, v: [[v] * 28] * n, st.integers(0, 30), st.integers(-2, 260)),
)
batch_bodies = st.one_of(
    st.builds(lambda images: json.dumps({"images": images}).encode(), st.lists(near_images, max_size=3)),
    st.builds(lambda value: json.dumps(value).encode(), json_values),
    st.binary(max_size=300),
)
multipart_parts = st.lists(
    st.tuples(
        st.sampled_from(["image", "images", "file", "", 'image"', "imáge"]),
        st.one_of(st.none(), st.sampled_from(["x.png", "", "../../etc/passwd", 'a"b.png'])),
        st.one_of(st.binary(max_size=400), st.just(png(np.zeros((28, 28)))[:40]), st.just(b"GIF89a" + b"\0" * 30)),
    ),
    max_size=3,
)


def multipart(parts: list, boundary: str) -> bytes:
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


predict_requests = st.one_of(
    st.builds(
        lambda parts, b: ("/predict", f"multipart/form-data; boundary={b}", multipart(parts, b)),
        multipart_parts,
        st.sampled_from(["xyz", "----b", "a" * 70]),
    ),
    st.tuples(
        st.just("/predict"),
        st.sampled_from(
            ["multipart/form-data", "multipart/form-data; boundary=", "image/png", "application/json", "text/plain", ""]
        ),
        st.binary(max_size=300),
    ),
)
batch_requests = st.tuples(
    st.just("/predict_batch"),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "text/plain",
            "application/vnd.bentoml+pickle",
            "multipart/form-data",
            "",
        ]
    ),
    batch_bodies,
)
oip_tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["images", "input", "", 7]),
        "datatype": st.sampled_from(["UINT8", "FP32", "INT64", "BYTES", None]),
        "shape": st.one_of(
            st.lists(st.integers(-2, 30), max_size=5), st.sampled_from([[1, 1, 28, 28], [2, 1, 28, 28], [0, 1, 28, 28]])
        ),
        "data": st.one_of(near_images, st.lists(st.integers(-5, 300), min_size=784, max_size=784), json_values),
        "parameters": st.one_of(json_values, st.builds(lambda n: {"binary_data_size": n}, st.integers(-1, 2000))),
    },
)
oip_outputs = st.none() | st.lists(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"name": st.sampled_from(["probabilities", "logits", "scores"])}, optional={"parameters": json_values}
        ),
    ),
    max_size=3,
)


def oip_request(name: str, tensors: list, outputs: list | None, binary: bytes, header_length: str | None) -> tuple:
    header = json.dumps({"inputs": tensors} | ({} if outputs is None else {"outputs": outputs})).encode()
    length = {} if header_length is None else {"inference-header-content-length": header_length or str(len(header))}
    return f"/v2/models/{name}/infer", "application/octet-stream", header + binary, length


oip_requests = st.builds(  # Open Inference Protocol: JSON tensors, or a JSON header and binary tensor data
    oip_request,
    st.sampled_from(["fashion-mnist-classifier", "mnist-classifier", "x"]),
    st.lists(oip_tensors, max_size=2),
    oip_outputs,
    st.one_of(st.just(b""), st.binary(max_size=900), st.just(bytes(784))),
    st.one_of(st.none(), st.just(""), st.sampled_from(["-1", "0", "99999", "abc"])),
)
bentoml_api_requests = st.tuples(  # BentoML's own API routes, for its clients
    st.sampled_from(["/api/predict_batch", "/api/predict"]),
    st.sampled_from(["application/json", "multipart/form-data; boundary=xyz", ""]),
    batch_bodies,
)
TOKEN = "fuzz-token"
feedback_bodies = st.one_of(
    st.builds(
        lambda prediction_id, label: json.dumps({"prediction_id": prediction_id, "label": label}).encode(),
        st.one_of(st.text(max_size=40), st.just("0" * 32), st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
        st.one_of(st.integers(-3, 12), st.sampled_from(["Dress", "dress", "", "7"]), json_values),
    ),
    st.builds(lambda value: json.dumps(value).encode(), json_values),
    st.binary(max_size=200),
)
feedback_requests = st.tuples(  # POST /feedback: near-valid labels and ids, with and without the right token
    st.just("/feedback"),
    st.sampled_from(["application/json", "text/plain", ""]),
    feedback_bodies,
    st.sampled_from(
        [{}, {"authorization": f"Bearer {TOKEN}"}, {"authorization": "Bearer nope"}, {"authorization": TOKEN}]
    ),
)
other_requests = st.tuples(
    st.sampled_from(["/predict/", "/predict_batch?images=1", "/model", "/infer", "/%00", "/docs.json"]),
    st.sampled_from(["application/json", ""]),
    st.binary(max_size=100),
)


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    with serving(
        served_model,
        tmp_path_factory.mktemp("logs") / "serve.log",
        SERVING_MAX_BODY_BYTES=str(MAX_BODY),
        SERVING_FEEDBACK_TOKEN=TOKEN,
    ) as srv:
        yield srv


def test_malformed_requests_never_get_a_5xx(server, served_model):
    statuses = []
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(
        st.one_of(
            predict_requests, batch_requests, oip_requests, bentoml_api_requests, feedback_requests, other_requests
        )
    )
    def send(request):
        path, content_type, body, *extra_headers = request
        headers = {"content-type": content_type} if content_type else {}
        headers.update(*extra_headers)
        response = session.post(server.url + path, data=body, headers=headers, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (path, content_type, body[:200], response.text)
        ours = path.split("?")[0] in ("/predict", "/predict_batch", "/feedback") or path.startswith("/v2/")
        if 400 <= response.status_code < 500 and ours:
            assert response.json()["error"], response.text  # a message that names the problem

    send()
    assert len(statuses) >= 750
    assert sum(400 <= s < 500 for s in statuses) > 0.9 * len(statuses)
    # still answers a good request correctly
    good = requests.post(f"{server.url}/predict", files={"image": ("x.png", png(served_model["x"][0, 0]))}, timeout=30)
    assert good.status_code == 200 and good.json()["label"] == int(
        served_model["offline"]["int8"]["probabilities"][0].argmax()
    )


def test_malformed_http_gets_a_4xx_and_the_service_keeps_serving(server, served_model):
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(raw)
            reply = s.recv(200)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), (raw[:40], reply)
    good = requests.post(f"{server.url}/predict", files={"image": ("x.png", png(served_model["x"][1, 0]))}, timeout=30)
    assert good.status_code == 200

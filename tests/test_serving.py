"""The BentoML service, against a real `bentoml serve` process on loopback."""

import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from benchmarks.local_server import LocalServer
from benchmarks.phone_photos import phone_photo
from common.model_store import read_metadata
from tests.lock_fixtures import REQUIREMENTS, pinned, unlocked_or_missing
from tests.serving_fixtures import MODEL_NAME, metric_samples, png, serving

pytestmark = pytest.mark.slow
MAX_BODY = 4 * 1024 * 1024
# What a fresh machine has on its PATH before the project installs anything.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def model(served_model):
    return served_model


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The service on the fp32 file: its answers do not depend on how requests were batched together, so
    each can be compared exactly with the file run offline (the int8 file's can flip a near-tie)."""
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with serving(model, log, SERVING_MAX_BODY_BYTES=str(MAX_BODY), SERVING_PRECISION="fp32") as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(model):
    """What the fp32 file says offline about the 1,000 test images."""
    return model["offline"]["fp32"]["probabilities"]


def test_binds_only_where_told(server):
    listening = [
        c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
    ]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_pickle_bodies_are_refused(server):
    import pickle

    response = requests.post(
        f"{server.url}/predict_batch",
        data=pickle.dumps({"images": [[0] * 784]}),
        timeout=10,
        headers={"content-type": "application/vnd.bentoml+pickle"},
    )
    assert response.status_code == 415, response.text


def test_health_endpoints(server):
    assert requests.get(f"{server.url}/livez", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert "bentoml_service_request_total" in requests.get(f"{server.url}/metrics", timeout=5).text


def test_model_card(server, model):
    response = requests.get(f"{server.url}/model", timeout=5, allow_redirects=False)
    assert response.status_code == 200  # no redirect to /model/: `curl .../model` just works
    card = response.json()
    assert card["model_name"] == "mlp_512"
    assert card["bentoml_tag"] == model["tag"]
    assert card["dataset"] == "fashion-mnist"
    assert card["class_names"][9] == "Ankle boot"
    assert card["mlflow_run_id"] == "test-run" and card["git_commit"] == "test-commit"
    assert card["execution_provider"] == ("CUDAExecutionProvider" if _has_gpu() else "CPUExecutionProvider")
    assert card["precision"] == "fp32" and card["provider_fallback"] is None
    assert {"val_accuracy", "test_accuracy"} <= set(card)


def run_in_repo(command: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`command` run in the repository; it must succeed."""
    done = subprocess.run(
        command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _has_gpu() -> bool:
    return subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0


def test_predict_a_png_of_a_test_image(server, model, offline):
    response = requests.post(f"{server.url}/predict", files={"image": ("shoe.png", png(model["x"][0, 0]))}, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == int(offline[0].argmax())
    assert (
        body["class_name"]
        == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"][
            body["label"]
        ]
    )
    assert body["confidence"] == pytest.approx(float(offline[0].max()), abs=1e-5)
    assert body["top_k"][0]["class_name"] == body["class_name"]
    assert len(body["top_k"]) == 3
    scores = model["offline"]["fp32"]["ood_score"]
    assert body["ood_score"] == pytest.approx(float(scores[0]), rel=1e-4, abs=1e-3)
    threshold = read_metadata(model["files"]["fp32"])["ood_threshold"]
    assert body["out_of_distribution"] is bool(scores[0] > threshold)
    assert re.fullmatch(r"[0-9a-f]{32}", body["prediction_id"])


def test_predict_details_give_every_probability_and_the_model_input(server, model, offline):
    """What the demo page draws: all classes in order and the 28x28 pixels the model took."""
    response = requests.post(
        f"{server.url}/predict?details=true", files={"image": ("x.png", png(model["x"][1, 0]))}, timeout=10
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["class_name"] for p in body["probabilities"]][:2] == ["T-shirt/top", "Trouser"]
    np.testing.assert_allclose([p["probability"] for p in body["probabilities"]], offline[1], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(body["model_input"]), model["x"][1, 0])
    plain = requests.post(f"{server.url}/predict", files={"image": ("x.png", png(model["x"][1, 0]))}, timeout=10)
    assert set(plain.json()) == {  # the default answer stays small
        "prediction_id",
        "label",
        "class_name",
        "confidence",
        "top_k",
        "ood_score",
        "out_of_distribution",
        "model_version",
    }
    assert plain.headers["X-Model-Version"] == plain.json()["model_version"] == model["tag"].split(":")[1]


def test_the_direct_route_and_the_app_route_give_the_same_answer(server, model):
    """A plain upload is answered ahead of the FastAPI app; with a query string or a chunked body the same
    request goes through it: same answer, same headers, same limits."""
    data = png(model["x"][2, 0])

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        yield data
        yield b"\r\n--b--\r\n"

    direct = requests.post(f"{server.url}/predict", files={"image": ("x.png", data)}, timeout=10)
    answers = [
        direct,
        requests.post(f"{server.url}/predict?details=false", files={"image": ("x.png", data)}, timeout=10),
        requests.post(
            f"{server.url}/predict",
            data=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
            timeout=10,
        ),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    without_ids = [{k: v for k, v in a.json().items() if k != "prediction_id"} for a in answers]
    assert without_ids[0] == without_ids[1] == without_ids[2]
    assert {a.headers["X-Model-Version"] for a in answers} == {direct.json()["model_version"]}
    assert len({a.json()["prediction_id"] for a in answers}) == 3
    refused = requests.post(f"{server.url}/predict", files={"image": ("x.png", b"not an image")}, timeout=10)
    assert refused.status_code == 400 and "not an image" in refused.json()["error"]


def test_demo_page_is_served_without_anything_from_the_internet(server):
    page = requests.get(f"{server.url}/ui", timeout=5)  # redirected to /ui/
    assert page.status_code == 200 and page.url.endswith("/ui/") and "Try the classifier" in page.text
    texts = [page.text]
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = requests.get(f"{server.url}/ui/{asset}", timeout=5)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        texts.append(response.text)
    assert not [text for text in texts if re.search(r"https?://", text)]  # no CDN or font: nothing from elsewhere
    assert requests.get(f"{server.url}/ui/missing.js", timeout=5).status_code == 404
    assert "/ui" in requests.get(f"{server.url}/docs.json", timeout=5).json()["paths"]  # linked from the docs


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "GIF", "WEBP"])
def test_predict_other_formats_sizes_and_light_backgrounds(server, model, offline, fmt):
    """A large colour photo-like image, dark object on white: inverted, trimmed, scaled, centred."""
    index = int(np.flatnonzero(model["y"] == 1)[0])  # a trouser: the clearest class
    big = Image.fromarray(255 - model["x"][index, 0]).resize((280, 420)).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, format=fmt)
    response = requests.post(
        f"{server.url}/predict", files={"image": (f"x.{fmt.lower()}", buffer.getvalue())}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json()["class_name"] == "Trouser"


def test_predict_batch_returns_one_result_per_image_in_order(server, model, offline):
    images = model["x"][:50, 0].tolist()
    images[1] = np.asarray(images[1]).reshape(784).tolist()  # 784 flat values are accepted too
    response = requests.post(f"{server.url}/predict_batch", json={"images": images}, timeout=30)
    assert response.status_code == 200, response.text
    labels = [r["label"] for r in response.json()]
    assert labels == offline[:50].argmax(1).tolist()


def test_served_accuracy_equals_offline_onnx_accuracy(server, model, offline):
    """1,000 test images as PNG uploads, 16 at a time, against the ONNX model run offline."""

    def post(i):
        r = requests.post(f"{server.url}/predict", files={"image": ("x.png", png(model["x"][i, 0]))}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["label"]

    with ThreadPoolExecutor(16) as pool:
        served = np.array(list(pool.map(post, range(len(model["y"])))))
    offline_labels = offline.argmax(1)
    assert (served == offline_labels).all()
    assert (served == model["y"]).mean() == (offline_labels == model["y"]).mean()
    batch = requests.post(f"{server.url}/predict_batch", json={"images": model["x"][:, 0].tolist()}, timeout=60)
    assert [r["label"] for r in batch.json()] == offline_labels.tolist()


def test_concurrent_requests_are_batched(server, model):
    def post(i):
        return requests.post(
            f"{server.url}/predict", files={"image": ("x.png", png(model["x"][i % 100, 0]))}, timeout=60
        ).status_code

    with ThreadPoolExecutor(64) as pool:
        assert set(pool.map(post, range(512))) == {200}
    samples = metric_samples(requests.get(f"{server.url}/metrics", timeout=5).text, "serving_batch_size")
    count = sum(v for k, v in samples.items() if "_count" in k)
    size_one = sum(v for k, v in samples.items() if 'le="1.0"' in k)
    assert count > 0 and size_one < count, samples  # some batches held more than one image


def _bad_png() -> bytes:
    data = png(np.random.default_rng(0).integers(0, 256, (28, 28)))
    return data[: len(data) * 3 // 4]


BAD_UPLOADS = {
    "not an image": (b"hello, I am text", "not an image"),
    "zero bytes": (b"", "empty"),
    "truncated": (None, "truncated or corrupt"),
    "decompression bomb": (None, "over the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_400_with_a_message(server, case):
    data, message = BAD_UPLOADS[case]
    if case == "truncated":
        data = _bad_png()
    elif case == "decompression bomb":
        buffer = io.BytesIO()
        Image.new("L", (9000, 9000)).save(buffer, format="PNG")  # 81 Mpixel, a few KB compressed
        data = buffer.getvalue()
    response = requests.post(f"{server.url}/predict", files={"image": ("x.png", data)}, timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.text


BAD_BATCHES = {
    "wrong shape": ({"images": [[1, 2, 3]]}, "28x28 or 784"),
    "ragged": ({"images": [[[0] * 28] * 27 + [[0] * 3]]}, "ragged"),
    "over 255": ({"images": [[[300] * 28] * 28]}, "integers 0-255"),
    "negative": ({"images": [[[-1] * 28] * 28]}, "integers 0-255"),
    "fractional": ({"images": [[[0.5] * 28] * 28]}, "integers 0-255"),
    "not finite": ('{"images": [[' + ",".join(["NaN"] * 784) + "]]}", "not valid JSON"),
    "not JSON": ("{images: [", "not valid JSON"),
    "booleans": ({"images": [[[True] * 28] * 28]}, "non-numeric"),
    "not an object": ([[[0] * 28] * 28], "send a JSON object"),
    "strings": ({"images": [[["a"] * 28] * 28]}, "non-numeric"),
    "empty list": ({"images": []}, "non-empty"),
    "too many images": ({"images": [[0] * 784] * 1025}, "the limit is 1024"),
    "missing field": ({"pictures": []}, "images"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batches_are_400_with_a_message(server, case):
    body, message = BAD_BATCHES[case]
    response = requests.post(
        f"{server.url}/predict_batch",
        timeout=30,
        headers={"content-type": "application/json"},
        data=body if isinstance(body, str) else json.dumps(body),
    )
    assert response.status_code == 400, response.text
    assert message in response.text


def test_body_over_the_size_limit_is_413(server):
    data = np.random.default_rng(0).bytes(MAX_BODY + 1000)
    response = requests.post(f"{server.url}/predict", files={"image": ("x.png", data)}, timeout=30)
    assert response.status_code == 413 and "request body too large" in response.text

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(5):
            yield b"0" * (MAX_BODY // 4)

    response = requests.post(
        f"{server.url}/predict_batch", data=chunks(), timeout=30, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "request body too large" in response.text


def test_wrong_content_type_is_415_and_missing_field_400(server, model):
    missing = requests.post(f"{server.url}/predict", files={"picture": ("x.png", png(model["x"][0, 0]))}, timeout=10)
    assert missing.status_code == 400 and "missing multipart field `image`" in missing.text
    extra = requests.post(
        f"{server.url}/predict",
        timeout=10,
        files={"image": ("x.png", png(model["x"][0, 0])), "more": ("y", b"\x89binary")},
    )
    assert extra.status_code == 400 and "unexpected multipart fields ['more']" in extra.text
    as_text = requests.post(f"{server.url}/predict", files={"image": (None, "not a file")}, timeout=10)
    assert as_text.status_code == 400 and "must be a file upload" in as_text.text
    as_json = requests.post(f"{server.url}/predict", json={"image": "x.png"}, timeout=10)
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["error"], as_json.text
    plain_text = requests.post(
        f"{server.url}/predict_batch", data="images=1", timeout=10, headers={"content-type": "text/plain"}
    )
    assert plain_text.status_code == 415 and "application/json" in plain_text.json()["error"], plain_text.text
    raw_png = requests.post(
        f"{server.url}/predict", data=png(model["x"][0, 0]), timeout=10, headers={"content-type": "image/png"}
    )
    assert raw_png.status_code == 415, raw_png.text
    broken = requests.post(
        f"{server.url}/predict",
        data=b"--xyz\r\nnot multipart",
        timeout=10,
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert broken.status_code == 400, broken.text


@pytest.mark.parametrize("route", ["/predict", "/api/predict"])
def test_two_files_in_the_image_field_are_400_naming_it(server, model, route):
    image = png(model["x"][0, 0])
    response = requests.post(
        f"{server.url}{route}", files=[("image", ("a.png", image)), ("image", ("b.png", image))], timeout=30
    )
    assert response.status_code == 400 and "2 files in multipart field `image`" in response.text, response.text


@pytest.mark.parametrize("orientation", [6, 8])
def test_phone_photos_stored_sideways_classify_like_their_upright_twins(server, model, orientation):
    """JPEGs whose pixels a phone stored sideways, with the EXIF orientation that turns them upright."""

    def label(i: int, stored: int) -> int:
        photo = phone_photo(model["x"][i, 0], stored, seed=i)
        response = requests.post(
            f"{server.url}/predict", files={"image": ("photo.jpg", photo, "image/jpeg")}, timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()["label"]

    with ThreadPoolExecutor(8) as pool:
        upright = np.array(list(pool.map(lambda i: label(i, 1), range(200))))
        sideways = np.array(list(pool.map(lambda i: label(i, orientation), range(200))))
    assert (upright == sideways).mean() >= 0.97
    truth = model["y"][:200]
    assert abs(int((upright == truth).sum()) - int((sideways == truth).sum())) <= 2  # within 1 point


ROUTES = [
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/docs.json"),
    ("GET", "/model"),
    ("GET", "/ui/"),
    ("GET", "/v2/health/live"),
    ("POST", "/predict"),
    ("POST", "/predict_batch"),
    ("POST", "/api/predict"),
    ("POST", "/api/predict_batch"),
]


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_headers_over_the_limit_are_431_on_every_route(server, method, route):
    padding = {"x-padding": "a" * 20_000}  # over the 16 KiB default, not near uvicorn's own limits
    response = requests.request(method, f"{server.url}{route}", headers=padding, data=b"x" * 10, timeout=30)
    assert response.status_code == 431, response.text
    assert "request headers too large" in response.json()["error"] and "16,384 bytes" in response.text
    assert requests.request("GET", f"{server.url}/livez", timeout=10).status_code == 200


def test_an_8_mb_header_is_431_too(server):
    response = requests.get(f"{server.url}/model", headers={"x-padding": "a" * 8_000_000}, timeout=60)
    assert response.status_code == 431


def test_one_bad_request_never_fails_the_others_batched_with_it(server, model, offline):
    """Bad uploads are refused before batching, so the good requests sent with them all succeed."""

    def post(i):
        data = _bad_png() if i % 4 == 0 else png(model["x"][i, 0])
        r = requests.post(f"{server.url}/predict", files={"image": ("x.png", data)}, timeout=60)
        return i, r.status_code, r.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(post, range(64)))
    assert {status for i, status, _ in results if i % 4 == 0} == {400}
    good = [(i, status, body) for i, status, body in results if i % 4]
    assert {status for _, status, _ in good} == {200}
    assert all(body["label"] == int(offline[i].argmax()) for i, _, body in good)


def test_openapi_docs_have_request_examples(server):
    assert "swagger" in requests.get(f"{server.url}/", timeout=5).text.lower()
    spec = requests.get(f"{server.url}/docs.json", timeout=5).json()
    assert {"/predict", "/predict_batch"} <= set(spec["paths"])
    assert "examples" in str(spec["paths"]["/predict_batch"]) or "example" in str(spec["paths"]["/predict_batch"])


def test_bentoml_build_packages_the_model_and_the_bento_serves(model, tmp_path):
    """The environment alone builds the bento: with only system directories on the PATH (not even
    .venv/bin), no uv or pip that a developer installed by hand can stand in for a missing dependency."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(model["home"]),
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTO_MODEL_TAG": f"{MODEL_NAME}:latest",
        "PATH": SYSTEM_PATH,
    }
    bentoml = str(Path(sys.executable).parent / "bentoml")
    done = run_in_repo([bentoml, "build", "--output", "tag"], env, timeout=600)
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run([bentoml, "get", tag, "-o", "json"], env=env, capture_output=True, text=True, check=True)
    assert model["tag"] in info.stdout
    # the container image BentoML generates for the bento switches to an unprivileged user
    name, version = tag.split(":")
    bento = model["home"] / "bentos" / name / version
    code = {path.relative_to(bento / "src").parts[0] for path in (bento / "src").rglob("*.py")}
    assert code == {"serving", "common"}, code  # the service and the package it shares with training, no more
    # it installs exactly the versions of uv.lock: every package pinned, none it pulls in left out
    pins = pinned((bento / "env" / "python" / "requirements.txt").read_text())
    assert pins == pinned(REQUIREMENTS.read_text()) and unlocked_or_missing(pins) == []
    assert not (bento / "env" / "python" / "requirements.lock.txt").exists()  # nothing re-resolved at build
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "ENV BENTOML_DO_NOT_TRACK=" in dockerfile and "ENV ORT_DISABLE_TELEMETRY=" in dockerfile  # telemetry off
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), dockerfile
    assert re.search(r"^FROM nvidia/cuda:12\.\S+-cudnn-runtime", dockerfile, flags=re.MULTILINE), (
        dockerfile
    )  # GPU-ready
    built = LocalServer(tag, tmp_path / "bento-serve.log", BENTOML_HOME=str(model["home"])).wait_ready()
    try:
        card = requests.get(f"{built.url}/model", timeout=10).json()
        assert card["bentoml_tag"] == model["tag"] and card["precision"] == "int8"
        assert card["following_registry"] is False  # an image serves the model it packages
        image = png(model["x"][0, 0])
        assert requests.post(f"{built.url}/predict", files={"image": ("x.png", image)}, timeout=30).status_code == 200
        assert "Try the classifier" in requests.get(f"{built.url}/ui/", timeout=10).text  # the page is in the bento
    finally:
        built.close()


@pytest.mark.skipif(_has_gpu(), reason="on a GPU the default precision is fp32")
def test_the_default_on_the_cpu_serves_int8_as_accurate_as_offline(model, tmp_path):
    """SERVING_PRECISION unset: int8. 1,000 test images as PNG uploads, 16 at a time: the answers of the int8
    file run offline, but for near-ties that the batch a request landed in tips (its float parts round
    differently per batch size), and the same accuracy within 0.5 points."""

    def post(i):
        r = requests.post(f"{server.url}/predict", files={"image": ("x.png", png(model["x"][i, 0]))}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["label"]

    with serving(model, tmp_path / "serve.log") as server:
        card = requests.get(f"{server.url}/model", timeout=10).json()
        with ThreadPoolExecutor(16) as pool:
            served = np.array(list(pool.map(post, range(len(model["y"])))))
    assert card["precision"] == "int8" and card["execution_provider"] == "CPUExecutionProvider"
    offline_labels = model["offline"]["int8"]["probabilities"].argmax(1)
    assert (served == offline_labels).mean() >= 0.99
    assert abs((served == model["y"]).mean() - (offline_labels == model["y"]).mean()) <= 0.005


def test_make_doctor_reports_providers_the_served_model_and_a_probe_per_precision(model):
    env = {**os.environ, "BENTOML_HOME": str(model["home"]), "BENTO_MODEL_TAG": model["tag"], "SERVING_THREADS": "1"}
    out = run_in_repo([sys.executable, "-m", "serving.doctor"], env, timeout=120).stdout
    assert re.search(r"^torch \S+", out, re.MULTILINE) and re.search(
        r"^onnxruntime \S+: providers listed", out, re.MULTILINE
    )
    cuda = "usable" if _has_gpu() else "unusable, "
    assert f"CUDAExecutionProvider: {cuda}" in out
    assert f"served model {model['tag']}" in out and "fp32, int8 files" in out
    served = "fp32 on CUDAExecutionProvider" if _has_gpu() else "int8 on CPUExecutionProvider"
    assert f"SERVING_DEVICE=auto SERVING_PRECISION=auto: serves {served}" in out
    rows = re.findall(r"^\| CPUExecutionProvider \| (fp32|int8) \| ([\d,]+) \| ([\d,]+) \|$", out, re.MULTILINE)
    assert sorted(r[0] for r in rows) == ["fp32", "int8"], out
    assert all(int(r[1].replace(",", "")) > 0 and int(r[2].replace(",", "")) > 0 for r in rows)

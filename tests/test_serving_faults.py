"""Faults around a real `bentoml serve`: a worker killed under load, SIGTERM with requests in flight, a
missing or corrupt model file, and the security settings of the service and the bento."""

import io
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from benchmarks.local_server import REPO, LocalServer
from common.runtime import gpu_present
from tests.serving_fixtures import png, serve, store_model

pytestmark = pytest.mark.slow
RECOVERY_BOUND_S = 30  # a killed worker is replaced and the service ready again within this


def workers(server: LocalServer) -> list[psutil.Process]:
    """The live worker processes (a killed one is a zombie until the arbiter reaps it)."""
    found = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker.service" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass
    return found


def test_a_killed_worker_is_replaced_and_the_service_recovers_by_itself(served_model, tmp_path):
    server = serve(served_model, tmp_path / "serve.log", SERVING_WORKERS="2").wait_ready()
    outcomes, stop = [], threading.Event()
    image = png(served_model["x"][0, 0])
    expected = int(served_model["offline"]["int8"]["probabilities"][0].argmax())

    def load():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    r = session.post(f"{server.url}/predict", files={"image": ("x.png", image)}, timeout=30)
                    outcomes.append((time.monotonic(), r.status_code, r.json().get("label")))
                except requests.RequestException as exc:  # the killed worker's open connections
                    outcomes.append((time.monotonic(), type(exc).__name__, None))
                    session.close()

    try:
        before = workers(server)
        assert len(before) == 2
        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        killed_at = time.monotonic()
        before[0].send_signal(signal.SIGKILL)
        recovered_at = None
        while time.monotonic() - killed_at < RECOVERY_BOUND_S:
            current = workers(server)
            fresh = [p for p in current if p.pid not in {w.pid for w in before}]
            if len(current) == 2 and fresh and requests.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                recovered_at = time.monotonic()
                break
            time.sleep(0.2)
        assert recovered_at is not None, f"no replacement worker within {RECOVERY_BOUND_S} s"
        time.sleep(3)  # the new worker takes load too
        stop.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop.set()
        server.close()
    answered = [o for o in outcomes if isinstance(o[1], int)]
    assert all(status == 200 and label == expected for _, status, label in answered)  # never a 5xx
    after = [o for o in outcomes if o[0] > recovered_at + 1]
    assert len(after) > 50 and all(status == 200 for _, status, _ in after)
    print(
        f"worker replaced and ready {recovered_at - killed_at:.1f} s after kill -9; "
        f"{len(outcomes) - len(answered)} of {len(outcomes)} requests lost with the killed worker"
    )


def test_sigterm_drains_requests_in_flight_before_exit(served_model, tmp_path):
    """Slow uploads (large images to decode) are in flight when SIGTERM arrives: every one is answered."""
    server = serve(served_model, tmp_path / "serve.log", SERVING_WORKERS="1").wait_ready()
    requests_in_flight = 12
    gradient = np.tile(np.linspace(0, 255, 6000, dtype=np.uint8), (6000, 1))  # 36 Mpixel: slow to decode
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG")
    big = buffer.getvalue()

    def post(_):
        return requests.post(f"{server.url}/predict", files={"image": ("big.jpg", big)}, timeout=120)

    try:
        with ThreadPoolExecutor(requests_in_flight) as pool:
            futures = [pool.submit(post, i) for i in range(requests_in_flight)]
            time.sleep(0.5)
            assert not all(f.done() for f in futures), "requests finished before SIGTERM: make them slower"
            server.process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * requests_in_flight, [r.text for r in responses]
        code = server.process.wait(timeout=60)  # raises if it has not exited by then
        assert code == 0, f"bentoml serve exited with {code} after SIGTERM:\n{server.log_path.read_text()[-3000:]}"
    finally:
        server.close()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupt_model_file_keeps_the_service_from_becoming_ready(served_model, tmp_path, damage):
    home = tmp_path / "bentoml"
    tag = store_model(served_model["files"], home)
    name, version = tag.split(":")
    path = home / "models" / name / version / "model.int8.onnx"  # the file served on the CPU by default
    if damage == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        middle = slice(len(data) // 2, len(data) // 2 + 64)
        data[middle] = bytes(b ^ 0xFF for b in data[middle])  # bytes silently flipped: still a valid file
        path.write_bytes(bytes(data))
    server = LocalServer(
        "serving.service:Classifier", tmp_path / "serve.log", BENTOML_HOME=str(home), BENTO_MODEL_TAG=tag
    )
    with pytest.raises(RuntimeError, match="failed to start"):
        server.wait_ready(timeout=120)
    log = (tmp_path / "serve.log").read_text()
    message = "is missing" if damage == "missing" else "is corrupt: sha256"
    assert re.search(rf"model file \S+model\.int8\.onnx {message}", log), log[-3000:]


@pytest.mark.skipif(gpu_present(), reason="this machine has a GPU: CUDA can be created here")
def test_serving_device_cuda_without_cuda_refuses_to_serve_and_names_the_cause(served_model, tmp_path):
    """SERVING_DEVICE=cuda where the CUDA provider cannot be created: never ready, never on the CPU instead."""
    log_path = tmp_path / "serve.log"
    server = serve(served_model, log_path, SERVING_DEVICE="cuda")
    with pytest.raises(RuntimeError, match="failed to start"):
        server.wait_ready(timeout=120)
    log = log_path.read_text()
    causes = re.findall(r"SERVING_DEVICE=cuda but onnxruntime cannot create its CUDAExecutionProvider: ([^;]+);", log)
    assert len(causes) == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert re.search("no NVIDIA GPU|no CUDA provider|does not load: lib", causes[0]), causes[0]
    assert "Uvicorn running" not in log and "CPUExecutionProvider, " not in log


def test_no_unpickling_of_untrusted_data_in_the_code():
    """Weights load with weights_only=True, arrays without pickles, and nothing calls pickle directly."""
    problems = []
    for path in [
        *REPO.glob("training/*.py"),
        *REPO.glob("serving/*.py"),
        *REPO.glob("pipelines/*.py"),
        *REPO.glob("benchmarks/*.py"),
    ]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            if re.search(r"\b(pickle|cloudpickle|dill|joblib)\b", line) or "allow_pickle=True" in line:
                problems.append(where)
            if "torch.load(" in line and "weights_only=True" not in line:
                problems.append(where)
    assert problems == []

"""`make container`'s image, built and run: buildah on a Debian base made with debootstrap, the bento's packages
from wheels fetched outside the build, a small model in a throwaway store. Run with `buildah run --isolation
chroot` (podman cannot make cgroups here), on this host's network: ready, predicting, metrics, an unprivileged
user, and SIGTERM with requests in flight answers every one before it exits."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from benchmarks.local_server import free_port
from pipelines.container import BENTO_PATH
from tests.conftest import REPO
from tests.serving_fixtures import png, store_model

pytestmark = pytest.mark.slow
IMAGE = "localhost/fashion-mnist-classifier-test"


def buildah(*args: str, check: bool = True) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True)
    assert done.returncode == 0 or not check, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def image(served_model, tmp_path_factory):
    """The image `make container` builds, for the test model; removed afterwards (the base image is kept)."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (tests/install_debian_packages.sh installs it as root)")
    if os.geteuid() != 0:
        pytest.skip("the base image is made with debootstrap, which needs root")
    home = tmp_path_factory.mktemp("bentoml")
    tag = store_model(served_model["files"], home)
    build = REPO / "build" / "container-test"  # under the repo: a bento's files are relative to its build context
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTO_MODEL_TAG": tag, "BENTOML_DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "pipelines.container", "--image", IMAGE, "--build", str(build)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    summary = json.loads((build / "image.json").read_text())
    yield summary | {"tag": tag}
    buildah("rmi", "--force", summary["image"], check=False)
    shutil.rmtree(build, ignore_errors=True)


def serve_process(port: int) -> psutil.Process:
    """`bentoml serve` of the container started on `port` (chroot isolation shares this host's process list)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "bentoml serve" in cmdline and BENTO_PATH in cmdline:
            with contextlib.suppress(psutil.Error):
                if process.environ().get("BENTOML_PORT") == str(port):
                    return process
    raise AssertionError(f"no bentoml serve on port {port}")


def wait_ready(url: str, running: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert running.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise AssertionError(f"the container was not ready within {timeout} s:\n{log.read_text()[-3000:]}")


def test_the_image_serves_unprivileged_and_drains_on_sigterm(image, served_model, tmp_path):
    container = buildah("from", "--quiet", image["image"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "container.log", "w")  # noqa: SIM115 -- open while the container runs
    running = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", "--env", f"BENTOML_PORT={port}", "--env", "SERVING_WORKERS=1",
         container, "--", f"{BENTO_PATH}/env/docker/entrypoint.sh"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_ready(url, running, tmp_path / "container.log")
        server = serve_process(port)
        assert server.uids().real != 0  # BentoML's `bentoml` user, not root

        card = requests.get(f"{url}/model", timeout=10).json()
        assert card["bentoml_tag"] == image["tag"] and card["precision"] == "int8"
        answer = requests.post(f"{url}/predict", files={"image": ("x.png", png(served_model["x"][0, 0]))}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["label"] == int(served_model["offline"]["int8"]["probabilities"][0].argmax())
        assert "serving_predictions_total" in requests.get(f"{url}/metrics", timeout=10).text

        gradient = np.tile(np.linspace(0, 255, 6000, dtype=np.uint8), (6000, 1))  # 36 Mpixel: slow to decode
        buffer = io.BytesIO()
        Image.fromarray(gradient).save(buffer, format="JPEG")
        big = buffer.getvalue()
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(requests.post, f"{url}/predict", files={"image": ("big.jpg", big)}, timeout=120)
                for _ in range(8)
            ]
            time.sleep(0.5)
            assert not all(f.done() for f in futures), "requests finished before SIGTERM: make them slower"
            server.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        assert codes == [200] * 8
        assert running.wait(timeout=60) == 0, (tmp_path / "container.log").read_text()[-3000:]
    finally:
        if running.poll() is None:
            running.kill()
        log.close()
        buildah("rm", container, check=False)

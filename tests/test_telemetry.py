"""No tool the project runs phones home. Every child here gets a user's environment (no CI variable, none of
the telemetry switches: only the project's own settings may turn telemetry off) whose HTTP(S) proxy is a
listener on loopback that counts every connection: `make serve`, `dvc repro` (its stages log to MLflow) and
`make ui` (MLflow's server) must send it nothing. A tool with its telemetry left on shows that the listener
sees what it should."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time

import pytest
import requests

from benchmarks.local_server import free_port
from common import telemetry_switches
from tests.conftest import copy_repo
from tests.pipeline_fixtures import VENV_BIN, make_target, stage_env, tiny_params
from tests.serving_fixtures import MODEL_NAME, png

pytestmark = pytest.mark.slow
# what would let a tool decide on its own that it runs in CI or a test, and skip its telemetry for that
CI_MARKERS = ("CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "GITLAB_CI", "DVC_TEST")


class CountingProxy:
    """An HTTP proxy on loopback that forwards nothing: it records the first line of every request."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.socket.accept()
                with connection:
                    connection.settimeout(5)
                    with contextlib.suppress(OSError):
                        self.requests.append(connection.recv(4096).split(b"\r\n")[0].decode(errors="replace"))
                        connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def proxy():
    listener = CountingProxy()
    yield listener
    listener.close()


def user_env(proxy: CountingProxy, **extra: str) -> dict[str, str]:
    """A user's shell, every outgoing HTTP(S) request sent to `proxy`, loopback reached directly."""
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS and k not in telemetry_switches()}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = proxy.url
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return {**env, **extra}


def settled(proxy: CountingProxy, seconds: float = 8) -> list[str]:
    """What the proxy saw, after the background senders (DVC's daemon, MLflow's thread) had time to try."""
    time.sleep(seconds)
    return proxy.requests


def test_the_listener_sees_a_tool_whose_telemetry_is_on(proxy):
    env = user_env(proxy, BENTOML_DO_NOT_TRACK="false")
    subprocess.run([str(VENV_BIN / "bentoml"), "models", "list"], env=env, capture_output=True, timeout=120)
    assert any("bentoml.com" in line for line in settled(proxy, 3)), proxy.requests


def test_make_serve_dvc_repro_and_the_mlflow_ui_send_nothing(proxy, served_model, shared_datasets, tmp_path):
    """`dvc repro` runs while `make serve` is up, which is served for over a minute: onnxruntime uploads its
    telemetry after about 60 s of a session."""
    repo = copy_repo(tmp_path / "repo")
    tiny_params(repo)
    stage_vars = stage_env(shared_datasets, tmp_path / "bentoml")
    repro_env = user_env(proxy, **{k: v for k, v in stage_vars.items() if "PATH" in k
                                   or k.startswith(("DATASET", "BENTOML_HOME"))})  # fmt: skip
    serve_env = user_env(
        proxy,
        BENTOML_HOME=str(served_model["home"]),
        BENTO_MODEL_TAG=f"{MODEL_NAME}:latest",
        SERVING_PREDICTION_LOG="false",
    )
    port = free_port()
    image = png(served_model["x"][0, 0])

    def predict() -> None:
        answer = requests.post(f"http://127.0.0.1:{port}/predict", files={"image": ("x.png", image)}, timeout=30)
        assert answer.status_code == 200, answer.text

    with make_target(["serve", f"PORT={port}"], serve_env, f"http://127.0.0.1:{port}/readyz", tmp_path / "serve.log"):
        served_since = time.monotonic()
        predict()
        done = subprocess.run([str(VENV_BIN / "dvc"), "repro"], cwd=repo, env=repro_env, capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        time.sleep(max(0.0, 80 - (time.monotonic() - served_since)))
        predict()
    ui_port = free_port()
    target = ["ui", f"UI_PORT={ui_port}", f"MLFLOW_DB=sqlite:///{repo / 'mlflow.db'}"]
    with make_target(target, user_env(proxy), f"http://127.0.0.1:{ui_port}/health", tmp_path / "ui.log"):
        experiments = requests.get(
            f"http://127.0.0.1:{ui_port}/api/2.0/mlflow/experiments/search?max_results=5", timeout=30
        )
        assert "fashion-mnist" in {e["name"] for e in experiments.json()["experiments"]}
    assert settled(proxy) == []

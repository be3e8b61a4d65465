"""A small trained model in a throwaway BentoML store, and a real `bentoml serve` process on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch

from tests.conftest import REPO, require_shared_datasets
from training.data import load_idx_pair
from training.datasets import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, get_spec
from training.export import export_onnx
from training.models import build_model
from training.trainer import TrainConfig, seed_everything, train

MODEL_NAME = "fashion-mnist-classifier"


def small_model(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """mlp_512 trained briefly on real Fashion-MNIST, exported; returns (onnx, test images, labels)."""
    raw = require_shared_datasets() / "fashion-mnist"
    x, y = load_idx_pair(raw / TRAIN_IMAGES, raw / TRAIN_LABELS, 10)
    x_test, y_test = load_idx_pair(raw / TEST_IMAGES, raw / TEST_LABELS, 10)
    seed_everything(0)
    net = build_model("mlp_512", mean=0.286, std=0.353)
    x = x.copy()
    train(net, torch.from_numpy(x[:6000]), torch.from_numpy(y[:6000]), torch.from_numpy(x[6000:7000]),
          torch.from_numpy(y[6000:7000]), TrainConfig(epochs=2, verbose=0, schedule="onecycle", lr=2e-3))
    spec = get_spec("fashion-mnist")
    path = export_onnx(net.eval(), folder / "model.onnx", {
        "model_name": "mlp_512", "dataset": spec.name, "class_names": list(spec.class_names),
        "upload_fit": spec.upload_fit, "mlflow_run_id": "test-run", "git_commit": "test-commit",
        "val_accuracy": 0.0, "test_accuracy": 0.0, "parameters": 669706,
    })
    return path, x_test, y_test


def store_model(onnx_path: Path, bentoml_home: Path) -> str:
    """Save into the BentoML store at `bentoml_home` (in a subprocess: BENTOML_HOME is read at import)."""
    code = ("import sys, json; from pathlib import Path; from serving.model_store import save_onnx; "
            "print(save_onnx(Path(sys.argv[1]), sys.argv[2], {'dataset': 'fashion-mnist'}))")
    done = subprocess.run([sys.executable, "-c", code, str(onnx_path), MODEL_NAME], cwd=REPO, check=True,
                          capture_output=True, text=True, env={**os.environ, "BENTOML_HOME": str(bentoml_home)})
    return done.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve` in its own process; waits on /readyz; stops on close."""

    def __init__(self, target: str, bentoml_home: Path, log_path: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true", **env},
        )
        self.log_path = log_path

    def wait_ready(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None or "Application startup failed" in self.log_path.read_text():
                raise RuntimeError(f"bentoml serve exited ({self.process.returncode}):\n{self.log_path.read_text()}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"not ready within {timeout}s:\n{self.log_path.read_text()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Prometheus text lines for one metric name: {labels+suffix: value}."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples

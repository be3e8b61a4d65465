"""A small trained model in a throwaway BentoML store, for tests of the service."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.local_server import LocalServer
from tests.conftest import REPO, require_shared_datasets, zoo_model
from training.config import TrainConfig, load_params
from training.data import load_idx_pair
from training.datasets import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, get_spec
from training.export import export_onnx
from training.quantize import quantize_int8
from training.trainer import seed_everything, train

MODEL_NAME = "fashion-mnist-classifier"


@dataclass
class SmallNet:
    """mlp_512 trained briefly on real Fashion-MNIST, with training images (for calibration) and test data."""

    net: torch.nn.Module
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def small_net() -> SmallNet:
    raw = require_shared_datasets() / "fashion-mnist"
    x, y = load_idx_pair(raw / TRAIN_IMAGES, raw / TRAIN_LABELS, 10)
    x_test, y_test = load_idx_pair(raw / TEST_IMAGES, raw / TEST_LABELS, 10)
    seed_everything(0)
    net = zoo_model("mlp_512", mean=0.286, std=0.353)
    x, y = x.copy(), y.copy()  # writable, as torch wants
    train(
        net,
        torch.from_numpy(x[:6000]),
        torch.from_numpy(y[:6000]),
        torch.from_numpy(x[6000:7000]),
        torch.from_numpy(y[6000:7000]),
        TrainConfig.model_validate(
            {**load_params(REPO / "params.yaml")["train"], "epochs": 2, "verbose": 0, "lr": 2e-3}
        ),
    )
    return SmallNet(net.eval(), x[:6000], x_test, y_test)


def export_small(net: torch.nn.Module, path: Path) -> Path:
    spec = get_spec("fashion-mnist")
    metadata = {
        "model_name": "mlp_512",
        "dataset": spec.name,
        "class_names": list(spec.class_names),
        "upload_fit": spec.upload_fit,
        "mlflow_run_id": "test-run",
        "git_commit": "test-commit",
        "val_accuracy": 0.0,
        "test_accuracy": 0.0,
        "parameters": 669706,
        "precision": "fp32",
    }
    return export_onnx(net, path, metadata)


def small_model(folder: Path) -> tuple[dict[str, Path], np.ndarray, np.ndarray]:
    """The small net exported in fp32 and int8 (calibrated on training images); returns
    ({precision: onnx file}, test images, labels)."""
    small = small_net()
    path = export_small(small.net, folder / "model.onnx")
    int8 = quantize_int8(path, folder / "model.int8.onnx", small.x_train[:512])
    return {"fp32": path, "int8": int8}, small.x_test, small.y_test


def store_model(files: dict[str, Path], bentoml_home: Path) -> str:
    """Save the files ({precision: onnx file}) into the BentoML store at `bentoml_home` (in a subprocess:
    BENTOML_HOME is read at import)."""
    code = (
        "import sys, json; from pathlib import Path; from serving.model_store import save_onnx; "
        "files = {k: Path(v) for k, v in json.loads(sys.argv[1]).items()}; "
        "print(save_onnx(files, sys.argv[2], {'dataset': 'fashion-mnist'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps({k: str(v) for k, v in files.items()}), MODEL_NAME],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
    )
    return done.stdout.strip().splitlines()[-1]


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Prometheus text lines for one metric name: {labels+suffix: value}."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def serve(served_model: dict, log_path: Path, **env: str) -> LocalServer:
    """`bentoml serve` of the service on the test model (not yet waited for)."""
    return LocalServer(
        "serving.service:Classifier",
        log_path,
        BENTOML_HOME=str(served_model["home"]),
        BENTO_MODEL_TAG=f"{MODEL_NAME}:latest",
        **env,
    )


@contextlib.contextmanager
def serving(served_model: dict, log_path: Path, **env: str):
    """The service, ready, for the duration of a `with` block."""
    server = serve(served_model, log_path, **env).wait_ready()
    try:
        yield server
    finally:
        server.close()

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
import requests
import torch
from PIL import Image

from benchmarks.local_server import LocalServer
from tests.conftest import REPO, require_shared_datasets, zoo_model
from training.bundle import build_bundle
from training.config import Params, TrainConfig, TtaSettings, load_params
from training.data import IDX_IMAGES_MAGIC, Prepared, load_idx_pair, read_idx
from training.datasets import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, get_spec
from training.export import ServingModel, export_onnx
from training.models import TestTimeAugmented
from training.ood import RelativeMahalanobis, features
from training.trainer import seed_everything, train

MODEL_NAME = "fashion-mnist-classifier"


@dataclass
class SmallNet:
    """mlp_512 trained briefly on real Fashion-MNIST: 6,000 training images, 1,000 for validation, the official
    test images; one test-time view, as the export stage wraps every model."""

    net: TestTimeAugmented
    data: Prepared

    @property
    def x_train(self) -> np.ndarray:
        return self.data.images("train")

    @property
    def x_test(self) -> np.ndarray:
        return self.data.images("test")

    @property
    def y_test(self) -> np.ndarray:
        return self.data.labels("test")


# training images of the small net: with 6,000 its embedding flagged half the MNIST digits or fewer, with 12,000 most
SMALL_TRAIN = 12_000


def small_net(images: int = SMALL_TRAIN, epochs: int = 2, lr: float = 2e-3) -> SmallNet:
    """mlp_512 trained on the first `images` training images (the next 1,000 for validation); fewer images, fewer
    epochs or a tiny `lr` make a worse model."""
    raw = require_shared_datasets() / "fashion-mnist"
    x, y = load_idx_pair(raw / TRAIN_IMAGES, raw / TRAIN_LABELS, 10)
    x_test, y_test = load_idx_pair(raw / TEST_IMAGES, raw / TEST_LABELS, 10)
    seed_everything(0)
    net = zoo_model("mlp_512", mean=0.286, std=0.353)
    x, y = x.copy(), y.copy()  # writable, as torch wants
    train(
        net,
        torch.from_numpy(x[:images]),
        torch.from_numpy(y[:images]),
        torch.from_numpy(x[images : images + 1000]),
        torch.from_numpy(y[images : images + 1000]),
        TrainConfig.model_validate(
            {**load_params(REPO / "params.yaml")["train"], "epochs": epochs, "verbose": 0, "lr": lr}
        ),
    )
    splits = {"train": slice(0, images), "val": slice(images, images + 1000)}
    arrays = {f"{kind}_{split}": a[part] for split, part in splits.items() for kind, a in (("x", x), ("y", y))}
    data = Prepared({**arrays, "x_test": x_test, "y_test": y_test})
    return SmallNet(TestTimeAugmented(net.eval(), TtaSettings(flip=False, shift=0)).eval(), data)


def small_metadata() -> dict[str, object]:
    spec = get_spec("fashion-mnist")
    return {
        "model_name": "mlp_512",
        "dataset": spec.name,
        "class_names": list(spec.class_names),
        "upload_fit": spec.upload_fit,
        "mlflow_run_id": "test-run",
        "git_commit": "test-commit",
        "val_accuracy": 0.0,
        "test_accuracy": 0.0,
        "parameters": 669706,
        "test_time_augmentation": "none",
        "precision": "fp32",
    }


def export_small(net: TestTimeAugmented, small: SmallNet, path: Path) -> Path:
    """`net` as one ONNX file, its out-of-distribution score fitted on the small net's training images."""
    _, embeddings = features(net, small.x_train, 1024)
    score = RelativeMahalanobis(embeddings, small.data.labels("train"), 10)
    return export_onnx(ServingModel(net, score), path, small_metadata())


def contrast_images() -> np.ndarray:
    """MNIST's test digits: what the Fashion-MNIST model has never seen."""
    return read_idx(require_shared_datasets() / "mnist" / TEST_IMAGES, IDX_IMAGES_MAGIC)[:, None]


def small_model(
    folder: Path, small: SmallNet | None = None, min_agreement: float = 0.99
) -> tuple[dict[str, Path], SmallNet]:
    """The small net's (or `small`'s) served files, built as the export stage builds them (its int8 gate asks
    for `min_agreement`, not 99.5%: a model trained for seconds has many near-ties); returns ({role: file}, the
    net and data)."""
    small = small or small_net()
    settings = Params.load(REPO / "params.yaml").export
    drop = 0.005 if min_agreement >= 0.99 else 0.03
    settings = settings.model_copy(
        update={"int8": settings.int8.model_copy(update={"min_agreement": min_agreement, "max_accuracy_drop": drop})}
    )
    bundle = build_bundle(small.net, small.data, contrast_images(), settings, small_metadata(), folder, 0, 1024)
    return bundle.files, small


def store_model(files: dict[str, Path], bentoml_home: Path) -> str:
    """Save the files ({role: file}) into the BentoML store at `bentoml_home` (in a subprocess:
    BENTOML_HOME is read at import)."""
    code = (
        "import sys, json; from pathlib import Path; from common.model_store import save_onnx; "
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


def predict_batch(url: str, images: np.ndarray) -> list[dict]:
    """Images [N,1,28,28] in requests of 100 to the service at `url`, as a client sending traffic would."""
    answers = []
    for start in range(0, len(images), 100):
        body = {"images": images[start : start + 100, 0].tolist()}
        response = requests.post(f"{url}/predict_batch", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answers += response.json()
    return answers


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

"""A real MLflow registry for serving tests: versions registered as the gate registers them, aliases moved as
`make promote` and `make rollback` move them, and a load that records which version answered each request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import mlflow
import numpy as np
import orjson
import requests

from common.log_layout import CHALLENGER
from common.log_queries import read_predictions
from common.model_store import read_metadata
from tests.serving_fixtures import metric_samples
from training import registry
from training.export import add_metadata

REGISTERED = "fashion-mnist-classifier"


def variant(files: dict[str, Path], folder: Path, model_name: str) -> dict[str, Path]:
    """Copies of the served files that differ in their metadata only: another file, the same answers."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = {role: Path(shutil.copy(path, folder / path.name)) for role, path in files.items()}
    for role in ("fp32", "int8"):
        add_metadata(copies[role], {"model_name": model_name})
    return copies


def register_version(
    uri: str, files: dict[str, Path], bentoml_tag: str, corrupt_int8: bool = False
) -> registry.Version:
    """The files as a new version of REGISTERED, tagged as the gate tags them; `corrupt_int8`: the int8 file
    logged has a byte changed after its checksum was taken, as a damaged upload would."""
    metadata = read_metadata(files["fp32"])
    described = {"model": "model_name", "dataset": "dataset", "parameters": "parameters"}
    described |= {key: key for key in ("val_accuracy", "test_accuracy")}
    tags = {key: str(metadata[field]) for key, field in described.items()}
    tags |= {"bentoml_tag": bentoml_tag, "gate.decision": "promoted", **registry.checksums(files)}
    logged = dict(files)
    if corrupt_int8:
        data = bytearray(files["int8"].read_bytes())
        data[len(data) // 2] ^= 0xFF
        logged["int8"] = files["int8"].parent / "damaged" / files["int8"].name
        logged["int8"].parent.mkdir(exist_ok=True)
        logged["int8"].write_bytes(bytes(data))
    example = np.zeros((16, 1, 28, 28), np.uint8)  # a batch even a fixed-batch graph (test_shadow) takes
    with in_store(uri):
        mlflow.set_experiment("serving-tests")
        return registry.register_files(REGISTERED, logged, example, tags)


@contextlib.contextmanager
def in_store(uri: str):
    """MLflow's calls in this process go to `uri` for a while: mlflow.set_tracking_uri also sets
    MLFLOW_TRACKING_URI, which every later test's child processes would inherit."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None unsets it


def promote(uri: str, version: registry.Version, champion: registry.Version) -> None:
    with in_store(uri):
        registry.promote(REGISTERED, registry.CHAMPION, version, champion)


def roll_back(uri: str) -> None:
    with in_store(uri):
        registry.roll_back(REGISTERED, registry.CHAMPION, "test")


def set_alias(uri: str, alias: str, version: registry.Version) -> None:
    mlflow.MlflowClient(uri).set_registered_model_alias(REGISTERED, alias, str(version.version))


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when the request left
    seconds: float
    status: int
    version: str | None  # the X-Model-Version header
    body_version: str | None
    prediction_id: str | None

    @property
    def worker(self) -> str | None:
        """The worker that answered: its token, the first 16 hex digits of the prediction id."""
        return None if self.prediction_id is None else self.prediction_id[:16]


class RecordedLoad(threading.Thread):
    """`clients` concurrent clients sending one-image JSON requests to /predict_batch for `seconds`, each
    answer recorded; a thread of its own, so the test moves aliases meanwhile."""

    def __init__(self, url: str, images: np.ndarray, clients: int, seconds: float):
        super().__init__(daemon=True)
        self.url, self.clients, self.seconds = url + "/predict_batch", clients, seconds
        self.bodies = [orjson.dumps({"images": [image[0].tolist()]}) for image in images[:200]]
        self.answers: list[Answer] = []

    def run(self) -> None:
        asyncio.run(self._load())

    async def _load(self) -> None:
        deadline = time.monotonic() + self.seconds
        headers = {"content-type": "application/json"}

        async def client(session: aiohttp.ClientSession, number: int) -> None:
            sent_count = number
            while time.monotonic() < deadline:
                body = self.bodies[sent_count % len(self.bodies)]
                sent_count += self.clients
                sent = time.monotonic()
                async with session.post(self.url, data=body, headers=headers) as response:
                    payload = await response.read()
                    seconds = time.monotonic() - sent
                    answer = orjson.loads(payload)[0] if response.status == 200 else {}
                    self.answers.append(
                        Answer(
                            sent,
                            seconds,
                            response.status,
                            response.headers.get("X-Model-Version"),
                            answer.get("model_version"),
                            answer.get("prediction_id"),
                        )
                    )

        timeout = aiohttp.ClientTimeout(total=60)
        # a connection per request: the workers share one listening socket, and long-lived connections can all
        # land on one of them
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(client(session, n) for n in range(self.clients)))


def p99(answers: list[Answer]) -> float:
    return float(np.percentile([a.seconds for a in answers], 99))


def every_worker(url: str, role: str, version: str, workers: int, timeout: float = 60) -> None:
    """Wait until the `serving_model_info` gauge of every worker says it runs `version` as `role` (champion: it
    serves it; challenger: its shadow process runs it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = metric_samples(requests.get(f"{url}/metrics", timeout=10).text, "serving_model_info")
        running = [k for k, v in samples.items() if v == 1 and f'role="{role}"' in k and f'version="{version}"' in k]
        if len(running) == workers:
            return
        time.sleep(0.5)
    raise AssertionError(f"not every worker runs version {version} as {role} after {timeout} s")


def shadowed(log_dir: Path, version: str, count: int, timeout: float = 120) -> None:
    """Wait until the challenger `version` logged `count` answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sum(r["model_version"] == version for r in read_predictions(log_dir, role=CHALLENGER))
        if found >= count:
            return
        time.sleep(1)
    raise AssertionError(f"the challenger version {version} answered {found} of {count} in {timeout} s")

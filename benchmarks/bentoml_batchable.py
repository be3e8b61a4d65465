"""BentoML's own adaptive batching on the served file, as BentoML's documentation builds it for images: an API
service decodes each upload and awaits a model service whose `@bentoml.api(batchable=True)` method BentoML's
dispatcher feeds with the calls of concurrent requests, batches of up to 64 images. Each service runs as many
workers as this project's service; the row in `make bench` that says whether our own batcher earns its place.

    PEER_MODEL=export/model.int8.onnx bentoml serve benchmarks.bentoml_batchable:Batchable --port 3003
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np

from benchmarks.answers import PeerModel, answer, read_card
from serving.settings import cpu_count

MODEL = os.environ.get("PEER_MODEL", "export/model.int8.onnx")
WORKERS = int(os.environ.get("SERVING_WORKERS", str(cpu_count())))


@bentoml.service(workers=WORKERS)
class Model:
    def __init__(self) -> None:
        self.model = PeerModel(MODEL)

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=60_000)
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.model.probabilities(images.astype(np.uint8))


@bentoml.service(workers=WORKERS)
class Batchable:
    model = bentoml.depends(Model)

    def __init__(self) -> None:
        self.card = read_card(MODEL)

    @bentoml.api
    async def predict(self, image: Path) -> dict:
        pixels = self.card.decode(image.read_bytes())
        probabilities = await self.model.to_async.probabilities(pixels[None])
        return answer(probabilities[0], self.card.class_names)

    @bentoml.api
    async def predict_batch(self, images: list[list[list[int]]]) -> list[dict]:
        pixels = np.asarray(images, dtype=np.uint8)[:, None]
        return [answer(p, self.card.class_names) for p in await self.model.to_async.probabilities(pixels)]

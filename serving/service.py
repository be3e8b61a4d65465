"""The BentoML service: the exported champion over REST, adaptive batching on onnxruntime.

Settings (environment variables): BENTO_MODEL_TAG (default: the tag in export/export.json),
SERVING_DEVICE (auto, cpu, cuda), SERVING_WORKERS, SERVING_MAX_BATCH_SIZE, SERVING_MAX_BATCH_IMAGES,
SERVING_MAX_BODY_BYTES, SERVING_MAX_IMAGE_PIXELS, SERVING_TIMEOUT_S, SERVING_TOP_K.
Host and port: `bentoml serve --host --port`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import DType, Shape
from pydantic import AfterValidator, BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.limits import RequestGuard
from serving.model_store import default_model_tag
from serving.preprocess import ImageError, image_to_input
from serving.runtime import OnnxClassifier

log = logging.getLogger("bentoml.serving")  # shown by BentoML's log config

MODEL_TAG = os.environ.get("BENTO_MODEL_TAG") or default_model_tag()
DEVICE = os.environ.get("SERVING_DEVICE", "auto")
WORKERS = int(os.environ.get("SERVING_WORKERS", "1"))
MAX_BATCH_SIZE = int(os.environ.get("SERVING_MAX_BATCH_SIZE", "64"))
MAX_BATCH_IMAGES = int(os.environ.get("SERVING_MAX_BATCH_IMAGES", "1024"))
MAX_BODY_BYTES = int(os.environ.get("SERVING_MAX_BODY_BYTES", str(16 * 1024 * 1024)))
MAX_IMAGE_PIXELS = int(os.environ.get("SERVING_MAX_IMAGE_PIXELS", "40000000"))
TIMEOUT_S = int(os.environ.get("SERVING_TIMEOUT_S", "60"))
TOP_K = int(os.environ.get("SERVING_TOP_K", "3"))
CONNECTION_RETRIES = 3

EXAMPLE_IMAGE = [[0] * 28 for _ in range(28)]


class _ClientErrorFilter(logging.Filter):
    """BentoML logs a traceback for every 4xx answer; the access log already records those."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            return False
        return not (isinstance(exc, BentoMLException) and exc.error_code < 500)


logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorFilter())


class ClassProbability(BaseModel):
    class_name: str
    probability: float


class Prediction(BaseModel):
    label: int = Field(description="index of the predicted class")
    class_name: str
    confidence: float = Field(description="probability of the predicted class")
    top_k: list[ClassProbability]


def _finite_pixels(images: np.ndarray) -> np.ndarray:
    """Checked before batching, so one bad request never reaches a batch shared with others."""
    if not np.isfinite(images).all() or images.min(initial=0) < 0 or images.max(initial=0) > 255:
        raise ValueError("pixel values must be finite numbers 0-255")
    return images


def images_to_array(images: list, limit: int, shape: tuple[int, ...]) -> np.ndarray:
    """JSON images (each 28x28 or 784 integers 0-255) to uint8 [N,1,28,28], or a 400 naming the problem."""
    if not isinstance(images, list) or not images:
        raise InvalidArgument("`images` must be a non-empty list of images")
    if len(images) > limit:
        raise InvalidArgument(f"{len(images)} images in one request; the limit is {limit}")
    pixels = int(np.prod(shape))
    array = np.empty((len(images), *shape), dtype=np.float64)
    for i, image in enumerate(images):
        try:
            values = np.asarray(image, dtype=np.float64)
        except (ValueError, TypeError):
            raise InvalidArgument(f"image {i} must be {shape[1]}x{shape[2]} (or {pixels}) numbers; "
                                  "got ragged or non-numeric data") from None
        if values.size != pixels or values.shape not in ((pixels,), shape[1:], shape):
            raise InvalidArgument(f"image {i} must be {shape[1]}x{shape[2]} or {pixels} values; got shape "
                                  f"{list(values.shape)}")
        array[i] = values.reshape(shape)
    if not np.isfinite(array).all():
        raise InvalidArgument("pixel values must be finite numbers (no NaN or infinity)")
    bad = np.flatnonzero(((array < 0) | (array > 255) | (array != np.round(array))).any(axis=(1, 2, 3)))
    if bad.size:
        raise InvalidArgument(f"pixel values must be integers 0-255; image {int(bad[0])} is not")
    return array.astype(np.uint8)


async def model_card(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().card())


# mounted at the root, so that /model answers without a redirect to /model/
model_app = Starlette(routes=[Route("/model", model_card, methods=["GET"])])


@bentoml.service(name="fashion_mnist_classifier", workers=WORKERS, traffic={"timeout": TIMEOUT_S})
@bentoml.asgi_app(model_app, path="/", name="model-card")
class Classifier:
    """Classifies 28x28 grey images of clothing (Fashion-MNIST) or digits (MNIST)."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.model = OnnxClassifier(
            self.bento_model.path_of("model.onnx"), device=DEVICE,
            threads=max(1, (os.cpu_count() or 1) // WORKERS),
        )
        self.metadata = self.model.metadata
        self.class_names = self.model.class_names
        self.image_shape = self.model.image_shape
        self.model.warm_up(MAX_BATCH_SIZE)
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def card(self) -> dict[str, Any]:
        keys = ("model_name", "dataset", "class_names", "val_accuracy", "test_accuracy", "mlflow_run_id",
                "git_commit", "parameters", "input_spec")
        return {"bentoml_tag": str(self.bento_model.tag),
                "execution_provider": self.model.provider,
                **{k: self.metadata.get(k) for k in keys}}

    async def _batched_probabilities(self, images: np.ndarray) -> np.ndarray:
        """`infer` through BentoML's in-process proxy, which is what routes a call via the adaptive
        batcher; a call whose in-process connection breaks is idempotent, so it is retried."""
        for attempt in range(1, CONNECTION_RETRIES + 1):
            try:
                return np.asarray(await self.to_async.infer(images))
            except aiohttp.ClientConnectionError as exc:
                if attempt == CONNECTION_RETRIES:
                    raise
                log.warning("in-process call to infer failed (%s); retrying", exc)

    def _prediction(self, probabilities: np.ndarray) -> Prediction:
        order = np.argsort(-probabilities)
        best = int(order[0])
        return Prediction(
            label=best, class_name=self.class_names[best], confidence=float(probabilities[best]),
            top_k=[ClassProbability(class_name=self.class_names[i], probability=float(probabilities[i]))
                   for i in order[:TOP_K]],
        )

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=TIMEOUT_S * 1000)
    def infer(
        self,
        images: Annotated[np.ndarray, Shape((-1, 1, 28, 28)), DType("float32"), AfterValidator(_finite_pixels)],
    ) -> np.ndarray:
        """Class probabilities for pixel arrays [N,1,28,28]; concurrent calls are batched together."""
        return self.model.probabilities(images.astype(np.uint8))

    @bentoml.api
    async def predict(
        self, image: Annotated[Path, Field(description="an image file: PNG, JPEG, BMP, GIF, WebP, TIFF...")]
    ) -> Prediction:
        """Classify one image file (multipart field `image`): any size, colour or grey."""
        data = await anyio.to_thread.run_sync(Path(image).read_bytes)
        try:
            pixels = await anyio.to_thread.run_sync(
                image_to_input, data, self.image_shape[-1], self.metadata["upload_fit"], MAX_IMAGE_PIXELS)
        except ImageError as exc:
            raise InvalidArgument(str(exc)) from None
        probabilities = await self._batched_probabilities(pixels[None].astype(np.float32))
        return self._prediction(probabilities[0])

    @bentoml.api
    async def predict_batch(
        self,
        images: Annotated[list, Field(description=f"images, each 28x28 (or 784) integers 0-255; at most "
                                                  f"{MAX_BATCH_IMAGES} per request", examples=[[EXAMPLE_IMAGE]])],
    ) -> list[Prediction]:
        """Classify many images given as pixel arrays; one result per image, in order."""
        array = await anyio.to_thread.run_sync(images_to_array, images, MAX_BATCH_IMAGES, self.image_shape)
        probabilities = await anyio.to_thread.run_sync(self.model.probabilities, array)
        return [self._prediction(p) for p in probabilities]


Classifier.add_asgi_middleware(RequestGuard, max_bytes=MAX_BODY_BYTES, file_fields={"/predict": "image"},
                               buffered=("/predict", "/predict_batch"))

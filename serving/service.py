"""The BentoML service: the exported champion over REST, adaptively batched on onnxruntime.

Routes: POST /predict (an image file, multipart field `image`), POST /predict_batch (JSON pixel arrays),
GET /model (the model card), GET /ui/ (a demo page: plain HTML/JS/CSS from serving/ui); BentoML adds
/livez, /readyz, /metrics and the docs at / (/docs.json).
They are a FastAPI app mounted in the service rather than `@bentoml.api` methods: BentoML's API request
path costs about 0.8 ms of CPU per request before any work, as much as the model itself (README,
"How a request is served"), while a mounted app runs in the same BentoML workers, docs, metrics, model store
and bento, at half that cost. Batching is `serving.batcher`, in each worker's event loop.

Settings (environment variables): BENTO_MODEL_TAG (default: the tag in export/export.json),
SERVING_DEVICE (auto, cpu, cuda), SERVING_WORKERS (default: one per CPU), SERVING_THREADS (onnxruntime
threads per worker), SERVING_MAX_BATCH_SIZE, SERVING_MAX_BATCH_IMAGES, SERVING_MAX_BODY_BYTES,
SERVING_MAX_IMAGE_PIXELS, SERVING_TIMEOUT_S, SERVING_TOP_K, SERVING_TRACE_REQUESTS (OpenTelemetry spans
for the prediction routes; off by default).
Host and port: `bentoml serve --host --port` (`make serve HOST=... PORT=...`).
"""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
import orjson
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Histogram
from pydantic import BaseModel, Field

from serving.batcher import MicroBatcher
from serving.inputs import ClientError, parse_batch, read_upload
from serving.limits import BodyLimit
from serving.model_store import default_model_tag
from serving.preprocess import ImageError, open_image, to_model_input
from serving.runtime import OnnxClassifier

MODEL_TAG = os.environ.get("BENTO_MODEL_TAG") or default_model_tag()
DEVICE = os.environ.get("SERVING_DEVICE", "auto")
WORKERS = int(os.environ.get("SERVING_WORKERS", str(os.cpu_count() or 1)))
THREADS = int(os.environ.get("SERVING_THREADS", str(os.cpu_count() or 1)))
MAX_BATCH_SIZE = int(os.environ.get("SERVING_MAX_BATCH_SIZE", "64"))
MAX_BATCH_IMAGES = int(os.environ.get("SERVING_MAX_BATCH_IMAGES", "1024"))
MAX_BODY_BYTES = int(os.environ.get("SERVING_MAX_BODY_BYTES", str(16 * 1024 * 1024)))
MAX_IMAGE_PIXELS = int(os.environ.get("SERVING_MAX_IMAGE_PIXELS", "40000000"))
TIMEOUT_S = int(os.environ.get("SERVING_TIMEOUT_S", "60"))
TOP_K = int(os.environ.get("SERVING_TOP_K", "3"))
# OpenTelemetry spans cost a third of the throughput and go nowhere until an exporter is configured
TRACE_REQUESTS = os.environ.get("SERVING_TRACE_REQUESTS", "false").lower() in ("1", "true", "yes")
INLINE_PIXELS = 256 * 256  # smaller uploads are decoded on the event loop; a thread hop costs more
INLINE_BYTES = 64 * 1024  # smaller JSON bodies are parsed on the event loop

BATCH_SIZES = Histogram("serving_batch_size", "images per onnxruntime call",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
EXAMPLE_IMAGE = [[0] * 28 for _ in range(28)]


class ClassProbability(BaseModel):
    class_name: str
    probability: float


class Prediction(BaseModel):
    label: int = Field(description="index of the predicted class")
    class_name: str
    confidence: float = Field(description="probability of the predicted class")
    top_k: list[ClassProbability]


class Details(Prediction):
    probabilities: list[ClassProbability] = Field(description="every class, in class order")
    model_input: list[list[int]] = Field(description="the grey image the model took, rows of pixels 0-255")


class Error(BaseModel):
    error: str = Field(description="what is wrong with the request")


class Batch(BaseModel):
    images: list[list] = Field(description=f"images, each 28x28 (or 784) integers 0-255; at most "
                                           f"{MAX_BATCH_IMAGES} per request", examples=[[EXAMPLE_IMAGE]])


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


ERRORS = {status: {"model": Error} for status in (400, 413, 415)}
api = FastAPI(title="classifier", docs_url=None, redoc_url=None, openapi_url=None)  # BentoML serves the docs
api.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


@api.exception_handler(ClientError)
async def client_error(request: Request, exc: ClientError) -> Response:
    return json_response({"error": exc.message}, exc.status)


DETAILS = Query(False, description="also return every class's probability and the 28x28 image the model took "
                                  "(what the demo page shows)")


@api.post("/predict", response_model=Prediction | Details, responses=ERRORS, openapi_extra={"requestBody": {
    "required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary",
                                 "description": "an image file: PNG, JPEG, BMP, GIF, WebP, TIFF..."}}}}}}})
async def predict(request: Request, details: bool = DETAILS) -> Response:
    """Classify one image file (multipart field `image`): any size, colour or grey. Try it in a browser: /ui/"""
    service: Classifier = bentoml.get_current_service()
    with service.batcher.tracked():
        data = await read_upload(request, "image")
        image = await service.decode(data)
        probabilities = await service.batcher(image)
        prediction = service.predictions(probabilities)[0]
        if details:
            prediction["probabilities"] = [{"class_name": name, "probability": p}
                                           for name, p in zip(service.class_names, probabilities[0].tolist())]
            prediction["model_input"] = image[0, 0].tolist()
        return json_response(prediction)


@api.post("/predict_batch", response_model=list[Prediction], responses=ERRORS, openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": Batch.model_json_schema()}}}})
async def predict_batch(request: Request) -> Response:
    """Classify many images given as pixel arrays; one result per image, in order."""
    service: Classifier = bentoml.get_current_service()
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise ClientError('send JSON (content type application/json): {"images": [...]}', status=415)
    with service.batcher.tracked():
        body = await request.body()
        args = (body, MAX_BATCH_IMAGES, service.image_shape)
        images = parse_batch(*args) if len(body) <= INLINE_BYTES else await anyio.to_thread.run_sync(parse_batch, *args)
        return json_response(service.predictions(await service.batcher(images)))


@api.get("/model")
async def model_card() -> Response:
    """The served model: name, dataset, class names, accuracy, MLflow run, BentoML tag, execution provider."""
    return json_response(bentoml.get_current_service().card())


@api.get("/ui", include_in_schema=True, response_class=RedirectResponse, status_code=307)
async def demo_page() -> RedirectResponse:
    """The demo page: drop, pick or draw an image and see what the model sees and says."""
    return RedirectResponse("ui/", status_code=307)  # relative: works behind a path prefix


api.mount("/ui", StaticFiles(directory=Path(__file__).parent / "ui", html=True), name="ui")


@bentoml.service(name="fashion_mnist_classifier", workers=WORKERS, traffic={"timeout": TIMEOUT_S},
                  tracing={} if TRACE_REQUESTS else {"excluded_urls": ["/predict", "/predict_batch"]})
@bentoml.asgi_app(api, path="/", name="classifier")
class Classifier:
    """Classifies 28x28 grey images of clothing (Fashion-MNIST) or digits (MNIST)."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.model = OnnxClassifier(self.bento_model.path_of("model.onnx"), device=DEVICE, threads=THREADS,
                                    expected_sha256=self.bento_model.info.metadata.get("onnx_sha256"))
        self.metadata = self.model.metadata
        self.class_names = self.model.class_names
        self.image_shape = self.model.image_shape
        self.upload_fit = int(self.metadata["upload_fit"])
        self.model.warm_up(MAX_BATCH_SIZE)
        self.batcher = MicroBatcher(self.model.probabilities, MAX_BATCH_SIZE, on_batch=BATCH_SIZES.observe)
        # Garbage-collector pauses were the p99: the start-up heap is never garbage (frozen, never scanned
        # again), and a larger young generation lets request objects die before they reach the old one
        # (full collections every second or so took 20-80 ms under load; now far fewer)
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def card(self) -> dict[str, Any]:
        keys = ("model_name", "dataset", "class_names", "val_accuracy", "test_accuracy", "mlflow_run_id",
                "git_commit", "parameters", "test_time_augmentation", "input_spec")
        return {"bentoml_tag": str(self.bento_model.tag), "execution_provider": self.model.provider,
                **{k: self.metadata.get(k) for k in keys}}

    async def decode(self, data: bytes) -> np.ndarray:
        """An upload to a model input [1,1,28,28]; large images are decoded off the event loop."""
        try:
            image = open_image(data, MAX_IMAGE_PIXELS)
            size = self.image_shape[-1]
            if image.width * image.height <= INLINE_PIXELS:
                return to_model_input(image, size, self.upload_fit)[None]
            return (await anyio.to_thread.run_sync(to_model_input, image, size, self.upload_fit))[None]
        except ImageError as exc:
            raise ClientError(str(exc)) from None

    def predictions(self, probabilities: np.ndarray) -> list[dict[str, Any]]:
        """One Prediction per row of class probabilities [N, classes]."""
        top = np.argsort(-probabilities, axis=1)[:, :TOP_K]
        top_p = np.take_along_axis(probabilities, top, axis=1).tolist()
        names = self.class_names
        return [{"label": labels[0], "class_name": names[labels[0]], "confidence": p[0],
                 "top_k": [{"class_name": names[i], "probability": q} for i, q in zip(labels, p)]}
                for labels, p in zip(top.tolist(), top_p)]

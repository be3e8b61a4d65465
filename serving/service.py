"""The BentoML service: the exported champion over REST, adaptively batched on onnxruntime.

Routes (serving.routes): POST /predict, POST /predict_batch, GET /model, GET /ui/, and the Open Inference
Protocol under /v2 (serving.oip); the same predictions as BentoML APIs for BentoML's clients (POST
/api/predict, /api/predict_batch, below); BentoML adds /livez, /readyz, /metrics and the docs at /
(/docs.json). Settings: environment variables (serving.settings).
Host and port: `bentoml serve --host --port` (`make serve HOST=... PORT=...`).

BentoML reads the service's configuration (workers, timeout, tracing), its model and its mounted app when
it imports this module, so the settings are read here, once, and handed to everything else.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import Field

from serving.batcher import MicroBatcher
from serving.inputs import ClientError, images_to_array
from serving.limits import ApiRequestGuard, HeaderLimit
from serving.metrics import BATCH_SIZES, LOG_DROPPED, count_predictions
from serving.model_source import ensure_model, record
from serving.model_store import MODEL_FILES, SERVED_RECORD, ModelMissingError
from serving.prediction_log import Outputs, Pending, PredictionIds, PredictionLog
from serving.preprocess import ImageError, open_image, to_model_input
from serving.routes import PREDICTION_ROUTES, build_api
from serving.runtime import OnnxClassifier, ProviderError, choose_precision, require_cuda
from serving.schemas import ImageRows
from serving.settings import ServingSettings, SettingsError

try:
    SETTINGS = ServingSettings.from_env()
    if SETTINGS.device == "cuda":
        require_cuda()  # before any worker starts: refuse, naming the cause, rather than serve on the CPU
    ensure_model(SETTINGS.model_tag)
except (SettingsError, ProviderError, ModelMissingError) as exc:
    sys.exit(f"serving: {exc}")  # one line, not a traceback through BentoML's loader
INLINE_PIXELS = 256 * 256  # smaller uploads are decoded on the event loop; a thread hop costs more


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},
    tracing={} if SETTINGS.trace_requests else {"excluded_urls": PREDICTION_ROUTES},
)
@bentoml.asgi_app(build_api(SETTINGS), path="/", name="classifier")
class Classifier:
    """Classifies images into the classes of the model it serves (its metadata names them)."""

    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        self.settings = SETTINGS
        if not SETTINGS.access_log:
            logging.getLogger("bentoml.access").setLevel(logging.WARNING)
        stored = self.bento_model.info.metadata
        available = [p for p, (_, checksum) in MODEL_FILES.items() if checksum in stored]
        precision = choose_precision(SETTINGS.precision, SETTINGS.device, available or ["fp32"])
        file_name, checksum = MODEL_FILES[precision]
        self.model = OnnxClassifier(
            self.bento_model.path_of(file_name),
            device=SETTINGS.device,
            threads=SETTINGS.threads,
            expected_sha256=stored.get(checksum),
            bulk=(SETTINGS.bulk_threads, SETTINGS.max_batch_size),
        )
        self.metadata = self.model.metadata
        self.class_names = self.model.class_names
        self.image_shape = self.model.image_shape
        self.upload_fit = int(self.metadata["upload_fit"])
        self.model.warm_up(SETTINGS.max_batch_size, SETTINGS.max_batch_images)
        self.batcher = MicroBatcher(self.model.outputs, SETTINGS.max_batch_size, on_batch=BATCH_SIZES.observe)
        self.ids = PredictionIds()
        self.log = (
            PredictionLog(
                SETTINGS.prediction_log_dir,
                self.ids.token,
                str(self.bento_model.tag),
                self.model.precision,
                self.class_names,
                self.model.ood_threshold,
                keep_inputs=SETTINGS.prediction_log_inputs,
                queue_requests=SETTINGS.prediction_log_queue,
                max_bytes=SETTINGS.prediction_log_max_mb << 20,
                max_age_s=SETTINGS.prediction_log_max_days * 86400,
                on_drop=LOG_DROPPED.inc,
            )
            if SETTINGS.prediction_log
            else None
        )
        # Garbage-collector pauses were the p99: the start-up heap is never garbage (frozen, never scanned
        # again), and a larger young generation lets request objects die before they reach the old one.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    @bentoml.on_shutdown
    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()

    def card(self) -> dict[str, Any]:
        keys = (
            "model_name",
            "dataset",
            "class_names",
            "val_accuracy",
            "test_accuracy",
            "mlflow_run_id",
            "git_commit",
            "parameters",
            "test_time_augmentation",
            "input_spec",
            "ood_threshold",
        )
        served = record(SERVED_RECORD)  # the workspace's champion.json: its registry version, when it is this model
        registry = served.get("bentoml_tag") == str(self.bento_model.tag)
        return {
            "bentoml_tag": str(self.bento_model.tag),
            "registered_model": served.get("registered_model") if registry else None,
            "registered_version": served.get("version") if registry else None,
            "execution_provider": self.model.provider,
            "provider_fallback": self.model.fallback,
            "precision": self.model.precision,
            **{k: self.metadata.get(k) for k in keys},
        }

    async def decode(self, data: bytes) -> np.ndarray:
        """An upload to a model input [1,1,28,28]; large images are decoded off the event loop."""
        try:
            image = open_image(data, self.settings.max_image_pixels)
            size = self.image_shape[-1]
            if image.width * image.height <= INLINE_PIXELS:
                return to_model_input(image, size, self.upload_fit)[None]
            return (await anyio.to_thread.run_sync(to_model_input, image, size, self.upload_fit))[None]
        except ImageError as exc:
            raise ClientError(str(exc)) from None

    def observe(self, images: np.ndarray, rows: np.ndarray, route: str, started: float) -> tuple[list[str], np.ndarray]:
        """Count one request's predictions in the metrics and queue them for the prediction log (inputs [N,1,28,28],
        the model's output rows); return their ids and out-of-distribution flags."""
        columns = self.model.columns
        probabilities, scores = columns.probabilities(rows), columns.ood_score(rows)
        flagged = scores > self.model.ood_threshold
        count_predictions(self.class_names, probabilities.argmax(1), probabilities.max(1), flagged)
        ids = self.ids.take(len(rows))
        if self.log is not None:
            outputs = Outputs(probabilities, scores, columns.embedding(rows))
            latency_ms = (time.perf_counter() - started) * 1000
            self.log.record(Pending(ids, time.time(), route, latency_ms, images, outputs))
        return ids, flagged

    async def answer(self, images: np.ndarray, route: str, started: float, details: bool = False) -> list[dict]:
        """One Prediction per model input [N,1,28,28], batched with concurrent requests, counted and logged; with
        `details`, every class's probability too."""
        rows = await self.batcher(images)
        ids, flagged = self.observe(images, rows, route, started)
        probabilities, scores = self.model.columns.probabilities(rows), self.model.columns.ood_score(rows)
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.settings.top_k]  # ties: argmax's class
        top_p = np.take_along_axis(probabilities, top, axis=1).tolist()
        names = self.class_names
        answers = [
            {
                "prediction_id": prediction_id,
                "label": labels[0],
                "class_name": names[labels[0]],
                "confidence": p[0],
                "top_k": [{"class_name": names[i], "probability": q} for i, q in zip(labels, p, strict=True)],
                "ood_score": score,
                "out_of_distribution": ood,
            }
            for prediction_id, labels, p, score, ood in zip(
                ids, top.tolist(), top_p, scores.tolist(), flagged.tolist(), strict=True
            )
        ]
        if details:
            for answer, row in zip(answers, probabilities.tolist(), strict=True):
                answer["probabilities"] = [{"class_name": n, "probability": q} for n, q in zip(names, row, strict=True)]
        return answers

    # BentoML's clients (`bentoml.SyncHTTPClient(url).predict(image=...)`) call these BentoML APIs: the answers
    # of POST /predict and /predict_batch, from the same in-process batcher.

    @bentoml.api(route="/api/predict")
    async def predict(self, image: Annotated[Path, Field(json_schema_extra={"minLength": 1})]) -> dict[str, Any]:
        """Classify one image file: what POST /predict answers."""
        started = time.perf_counter()
        with self.batcher.tracked(), invalid_arguments():
            return (await self.answer(await self.decode(image.read_bytes()), "/api/predict", started))[0]

    @bentoml.api(route="/api/predict_batch")
    async def predict_batch(self, images: ImageRows) -> list[dict[str, Any]]:
        """Classify images given as pixel arrays (each 28 rows of 28 integers 0-255): what POST /predict_batch
        answers."""
        started = time.perf_counter()
        with self.batcher.tracked(), invalid_arguments():
            batch = images_to_array(images, self.settings.max_batch_images, self.image_shape)
            return await self.answer(batch, "/api/predict_batch", started)


# bentoml.service returns a Service, which its type hints present as the class; the first middleware added is
# the outer one, around every route BentoML serves
Classifier.add_asgi_middleware(HeaderLimit, max_bytes=SETTINGS.max_header_bytes)  # type: ignore[attr-defined]
Classifier.add_asgi_middleware(  # type: ignore[attr-defined]
    ApiRequestGuard,
    routes={"/api/predict": "multipart/form-data", "/api/predict_batch": "application/json"},
    max_bytes=SETTINGS.max_body_bytes,
)


@contextlib.contextmanager
def invalid_arguments():
    """A ClientError as BentoML's InvalidArgument: a 400 naming what is wrong, on BentoML's API routes."""
    try:
        yield
    except ClientError as exc:
        raise InvalidArgument(exc.message) from None

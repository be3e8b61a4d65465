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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import Field

from common.log_records import Outputs, Pending, Request
from common.model_source import ensure_model
from common.model_store import MODEL_FILES, ModelMissingError, served_record
from common.preprocess import ImageError, grey_to_input, open_image, to_model_input
from common.runtime import ProviderError, choose_precision, require_cuda
from serving.batcher import Answered, MicroBatcher
from serving.direct import DirectPredictions
from serving.follow import Follower
from serving.inputs import ClientError, grey_png_pixels, images_to_array, parse_batch
from serving.limits import ApiRequestGuard, HeaderLimit
from serving.metrics import BATCH_SIZES, LOG_DROPPED, LOG_UPLOAD_FAILURES
from serving.prediction_log import PredictionIds, PredictionLog
from serving.routes import PREDICTION_ROUTES, build_api
from serving.schemas import VERSION_HEADER, ImageRows
from serving.served import ServedModel, open_model
from serving.settings import ServingSettings, SettingsError

try:
    SETTINGS = ServingSettings.from_env()
    if SETTINGS.device == "cuda":
        require_cuda()  # before any worker starts: refuse, naming the cause, rather than serve on the CPU
    ensure_model(SETTINGS.model_tag)
except (SettingsError, ProviderError, ModelMissingError) as exc:
    sys.exit(f"serving: {exc}")  # one line, not a traceback through BentoML's loader
INLINE_PIXELS = 256 * 256  # smaller uploads are decoded on the event loop; a thread hop costs more
INLINE_BYTES = 64 * 1024  # smaller JSON bodies are parsed on the event loop; likewise
log = logging.getLogger("bentoml.serving")


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},
    tracing={} if SETTINGS.trace_requests else {"excluded_urls": PREDICTION_ROUTES},
    logging={"access": {"enabled": SETTINGS.access_log}},  # off: not even its middleware runs
)
@bentoml.asgi_app(build_api(SETTINGS), path="/", name="classifier")
class Classifier:
    """Classifies images into the classes of the model it serves (its metadata names them)."""

    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.served = self.stored_model()
        classifier = self.served.classifier  # what every version of the registered model shares
        self.class_names = classifier.class_names
        self.image_shape = classifier.image_shape
        self.input_name = classifier.input_name
        self.upload_fit = int(classifier.metadata["upload_fit"])
        self.batcher = MicroBatcher(
            self.served, SETTINGS.max_batch_size, on_batch=BATCH_SIZES.observe, on_answered=self.batch_answered
        )
        self.served.show("champion")
        self.ids = PredictionIds()
        log_settings = dict(
            queue_requests=SETTINGS.prediction_log_queue,
            max_bytes=SETTINGS.prediction_log_max_mb << 20,
            max_age_s=SETTINGS.prediction_log_max_days * 86400,
            file_s=SETTINGS.prediction_log_file_s,
            storage_url=SETTINGS.prediction_log_bucket,
        )
        self.log = (
            PredictionLog(
                SETTINGS.prediction_log_dir,
                self.ids.token,
                self.class_names,
                keep_inputs=SETTINGS.prediction_log_inputs,
                on_drop=LOG_DROPPED.inc,
                on_upload_failure=LOG_UPLOAD_FAILURES.inc,
                **log_settings,  # type: ignore[arg-type]
            )
            if SETTINGS.prediction_log
            else None
        )
        self.follower = self.follow(log_settings)
        # Garbage-collector pauses were the p99: the start-up heap is never garbage (frozen, never scanned
        # again), and a larger young generation lets request objects die before they reach the old one.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def stored_model(self) -> ServedModel:
        """The model BentoML's store holds under the served tag, in the precision the settings resolve to."""
        stored = self.bento_model.info.metadata
        available = [p for p, (_, checksum) in MODEL_FILES.items() if checksum in stored]
        precision = choose_precision(SETTINGS.precision, SETTINGS.device, available or ["fp32"])
        file_name, checksum = MODEL_FILES[precision]
        classifier = open_model(self.bento_model.path_of(file_name), SETTINGS, stored.get(checksum))
        served = served_record()  # champion.json: the registry version, where it names this very model
        tag = str(self.bento_model.tag)
        return ServedModel(classifier, tag, served.get("version") if served.get("bentoml_tag") == tag else None)

    def follow(self, log_settings: dict[str, Any]) -> Follower | None:
        """The registry follower (and the shadow process it feeds), where the settings turn following on."""
        if not SETTINGS.follow_registry:
            return None
        missing = [
            variable
            for variable, value in (
                ("MLFLOW_TRACKING_URI", SETTINGS.tracking_uri),
                ("SERVING_REGISTERED_MODEL", SETTINGS.registered_model),
            )
            if not value
        ]
        if missing:
            log.warning(
                "not following the registry: %s not set (and no mlflow.db or champion.json here)", " and ".join(missing)
            )
            return None
        shadow_log = None
        if SETTINGS.shadow_share > 0 and self.log is not None:  # a challenger's answers go to the prediction log
            shadow_log = [
                f"--log-dir={SETTINGS.prediction_log_dir}",
                f"--log-queue={log_settings['queue_requests']}",
                f"--log-max-bytes={log_settings['max_bytes']}",
                f"--log-max-age-s={log_settings['max_age_s']}",
                f"--log-file-s={log_settings['file_s']}",
                *([f"--log-bucket={log_settings['storage_url']}"] if log_settings["storage_url"] else []),
            ]
        name = SETTINGS.registered_model or ""
        return Follower(SETTINGS, name, lambda: self.served, self.swap, shadow_log).start()

    def swap(self, new: ServedModel) -> None:
        """Serve `new` from the next batch on; the batch running now finishes on the old model."""
        old, self.served = self.served, new
        self.batcher.model = new
        new.show("champion", old)
        if new.tag == old.tag:
            log.info("the model served (%s) is registered version %s", new.tag, new.version)
        else:
            log.info(
                "now serving version %s (%s, %s) in place of version %s",
                new.version,
                new.tag,
                new.classifier.precision,
                old.version,
            )

    @bentoml.on_shutdown
    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
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
        served = self.served
        model = served.classifier
        follower = self.follower
        return {
            "bentoml_tag": served.tag,
            "model_version": served.version,
            "registered_model": SETTINGS.registered_model if served.registered_version is not None else None,
            "registered_version": served.registered_version,
            "following_registry": follower is not None,
            "challenger_version": None
            if follower is None or follower.shadow is None or follower.shadow.model is None
            else follower.shadow.model.version,
            "execution_provider": model.provider,
            "provider_fallback": model.fallback,
            "precision": model.precision,
            **{k: model.metadata.get(k) for k in keys},
        }

    async def decode(self, data: bytes) -> np.ndarray:
        """An upload to a model input [1,1,28,28]; large images are decoded off the event loop."""
        size = self.image_shape[-1]
        pixels = grey_png_pixels(data, min(INLINE_PIXELS, self.settings.max_image_pixels))
        if pixels is not None:
            return grey_to_input(pixels, size, self.upload_fit)[None]
        try:
            image = open_image(data, self.settings.max_image_pixels)
            if image.width * image.height <= INLINE_PIXELS:
                return to_model_input(image, size, self.upload_fit)[None]
            return (await anyio.to_thread.run_sync(to_model_input, image, size, self.upload_fit))[None]
        except ImageError as exc:
            raise ClientError(str(exc)) from None

    async def classify_upload(self, data: bytes, started: float, details: bool = False) -> dict:
        """An uploaded image file's prediction; with `details`, every class's probability and the model input."""
        image = await self.decode(data)
        prediction = (await self.answer(image, "/predict", started, details=details))[0]
        if details:
            prediction["model_input"] = image[0, 0].tolist()
        return prediction

    async def classify_rows(self, body: bytes, started: float) -> list[dict]:
        """A JSON body {"images": [...]}: one prediction per image, in order."""
        args = (body, self.settings.max_batch_images, self.image_shape)
        images = parse_batch(*args) if len(body) <= INLINE_BYTES else await anyio.to_thread.run_sync(parse_batch, *args)
        return await self.answer(images, "/predict_batch", started)

    async def predict_images(self, images: np.ndarray, route: str, started: float) -> Served:
        """Model inputs [N,1,28,28] through the batcher with concurrent requests (ServedModel counts the answers):
        each image's output row and prediction id, with the model that answered; logged with its batch
        (`batch_answered`) and offered to the challenger."""
        caller = Caller(route, started)
        answered = await self.batcher(images, caller)
        shadow = self.follower.shadow if self.follower is not None and self.log is not None else None
        if shadow is not None:
            shadow.offer(caller.ids, route, images)
        return Served(answered.model, answered.rows, caller.ids, caller.flagged)  # type: ignore[arg-type]

    def batch_answered(self, images: np.ndarray, answered: Answered, callers: list[tuple[Caller, slice]]) -> None:
        """A batch's answers, before any of them leaves: its callers' prediction ids and out-of-distribution flags,
        and its records in the log in one write (a caller that went away got no answer, and no record)."""
        model: ServedModel = answered.model  # type: ignore[assignment]
        columns, outputs = model.classifier.columns, answered.rows
        flagged = model.classifier.out_of_distribution(outputs)
        for caller, rows in callers:
            caller.ids, caller.flagged = self.ids.take(rows.stop - rows.start), flagged[rows]
        if self.log is None or not callers:
            return
        if sum(len(caller.ids) for caller, _ in callers) < len(outputs):
            kept = np.r_[tuple(rows for _, rows in callers)]
            outputs, images, flagged = outputs[kept], images[kept], flagged[kept]
        scores, embedding = columns.ood_score(outputs), columns.embedding(outputs)
        logged = Outputs(columns.probabilities(outputs), scores, flagged, embedding)
        now, answered_at = time.perf_counter(), time.time()
        requests = [Request(len(c.ids), answered_at, c.route, (now - c.started) * 1000) for c, _ in callers]
        ids = [i for caller, _ in callers for i in caller.ids]
        self.log.record(Pending(ids, requests, answered.model_ms, model.name, images, logged))

    async def answer(self, images: np.ndarray, route: str, started: float, details: bool = False) -> list[dict]:
        """One Prediction per model input [N,1,28,28], batched with concurrent requests, counted and logged; with
        `details`, every class's probability too."""
        served = await self.predict_images(images, route, started)
        probabilities = served.probabilities
        # the classes by probability, ties in argmax's order
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.settings.top_k].tolist()
        probabilities = probabilities.tolist()
        top_p = [[row[i] for i in labels] for row, labels in zip(probabilities, top, strict=True)]
        names, version = self.class_names, served.model.version
        answers = [
            {
                "prediction_id": prediction_id,
                "label": labels[0],
                "class_name": names[labels[0]],
                "confidence": p[0],
                "top_k": [{"class_name": names[i], "probability": q} for i, q in zip(labels, p, strict=True)],
                "ood_score": score,
                "out_of_distribution": ood,
                "model_version": version,
            }
            for prediction_id, labels, p, score, ood in zip(
                served.ids, top, top_p, served.scores.tolist(), served.flagged.tolist(), strict=True
            )
        ]
        if details:
            for answer, row in zip(answers, probabilities, strict=True):
                answer["probabilities"] = [{"class_name": n, "probability": q} for n, q in zip(names, row, strict=True)]
        return answers

    # BentoML's clients (`bentoml.SyncHTTPClient(url).predict(image=...)`) call these BentoML APIs: the answers
    # of POST /predict and /predict_batch, from the same in-process batcher.

    @bentoml.api(route="/api/predict")
    async def predict(
        self, image: Annotated[Path, Field(json_schema_extra={"minLength": 1})], ctx: bentoml.Context
    ) -> dict[str, Any]:
        """Classify one image file: what POST /predict answers."""
        started = time.perf_counter()
        with self.batcher.tracked(), invalid_arguments():
            answer = (await self.answer(await self.decode(image.read_bytes()), "/api/predict", started))[0]
            ctx.response.headers[VERSION_HEADER] = answer["model_version"]
            return answer

    @bentoml.api(route="/api/predict_batch")
    async def predict_batch(self, images: ImageRows, ctx: bentoml.Context) -> list[dict[str, Any]]:
        """Classify images given as pixel arrays (each 28 rows of 28 integers 0-255): what POST /predict_batch
        answers."""
        started = time.perf_counter()
        with self.batcher.tracked(), invalid_arguments():
            batch = images_to_array(images, self.settings.max_batch_images, self.image_shape)
            answers = await self.answer(batch, "/api/predict_batch", started)
            ctx.response.headers[VERSION_HEADER] = answers[0]["model_version"]
            return answers


@dataclass
class Caller:
    """A request in the batcher: what its records say of it, and its prediction ids and out-of-distribution flags
    once its batch is answered."""

    route: str
    started: float  # time.perf_counter() at its first byte
    ids: list[str] = field(default_factory=list)
    flagged: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


@dataclass(frozen=True)
class Served:
    """A request's images as the batcher answered them: the model, its output rows, the prediction ids, the
    out-of-distribution flags."""

    model: ServedModel
    rows: np.ndarray
    ids: list[str]
    flagged: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        return self.model.classifier.columns.probabilities(self.rows)

    @property
    def scores(self) -> np.ndarray:
        return self.model.classifier.columns.ood_score(self.rows)


# bentoml.service returns a Service, which its type hints present as the class; the first middleware added is
# the outer one, around every route BentoML serves
Classifier.add_asgi_middleware(HeaderLimit, max_bytes=SETTINGS.max_header_bytes)  # type: ignore[attr-defined]
Classifier.add_asgi_middleware(DirectPredictions, max_bytes=SETTINGS.max_body_bytes)  # type: ignore[attr-defined]
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

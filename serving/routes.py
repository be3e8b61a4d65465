"""The HTTP routes: POST /predict, POST /predict_batch, GET /model, the demo page at /ui/.

They are a FastAPI app mounted in the BentoML service rather than `@bentoml.api` methods: BentoML's API
request path costs about 0.8 ms of CPU per request before any work, as much as the model itself
(docs/serving.md), while a mounted app runs in the same BentoML workers, docs, metrics, model store and
bento at half that cost; the plain requests of the two prediction routes are answered earlier still
(serving.direct), through the same service methods. Each route finds the service (its model, batcher and
settings) through BentoML.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import bentoml
import orjson
from fastapi import APIRouter, FastAPI, Query, Request, Response, Security
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import SecretStr, ValidationError

from serving import oip
from serving.inputs import ClientError, read_upload
from serving.limits import BodyLimit
from serving.metrics import FEEDBACK
from serving.schemas import ERRORS, VERSION_HEADER, Batch, Details, Error, Feedback, FeedbackStored, Prediction
from serving.settings import ServingSettings

UI_DIR = Path(__file__).parent / "ui"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp", "image/tiff")
PREDICTION_ROUTES = ["/predict", "/predict_batch", "/v2/models", "/feedback"]
log = logging.getLogger("bentoml.serving")  # shown by BentoML's log config

router = APIRouter()
BEARER = HTTPBearer(auto_error=False, description="SERVING_FEEDBACK_TOKEN")  # declared in OpenAPI; checked below


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


DETAILS = Query(
    False,
    description="also return every class's probability and the 28x28 image the model took (what the demo page shows)",
)


@router.post(
    "/predict",
    response_model=Prediction | Details,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "additionalProperties": False,
                        "properties": {
                            "image": {
                                "type": "string",
                                "format": "binary",
                                "minLength": 1,
                                "description": "an image file: PNG, JPEG, BMP, GIF, WebP, TIFF...",
                            }
                        },
                    },
                    "encoding": {"image": {"contentType": ", ".join(IMAGE_TYPES)}},
                }
            },
        }
    },
)
async def predict(request: Request, details: bool = DETAILS) -> Response:
    """Classify one image file (multipart field `image`): any size, colour or grey. Try it in a browser: /ui/"""
    started = time.perf_counter()
    service = bentoml.get_current_service()
    with service.batcher.tracked():
        prediction = await service.classify_upload(await read_upload(request, "image"), started, details)
        return json_response(prediction, headers={VERSION_HEADER: prediction["model_version"]})


@router.post(
    "/predict_batch",
    response_model=list[Prediction],
    responses=ERRORS,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": Batch.model_json_schema()}}}
    },
)
async def predict_batch(request: Request) -> Response:
    """Classify many images given as pixel arrays; one result per image, in order."""
    started = time.perf_counter()
    service = bentoml.get_current_service()
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise ClientError('send JSON (content type application/json): {"images": [...]}', status=415)
    with service.batcher.tracked():
        answers = await service.classify_rows(await request.body(), started)
        return json_response(answers, headers={VERSION_HEADER: answers[0]["model_version"]})


FEEDBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "not a prediction id, or not a class of the model"},
    401: {"model": Error, "description": "no bearer token, or the wrong one"},
    403: {"model": Error, "description": "feedback is off: SERVING_FEEDBACK_TOKEN is not set"},
    404: {"model": Error, "description": "no logged prediction has this id"},
    415: {"model": Error, "description": "not JSON"},
}


@router.post(
    "/feedback",
    status_code=201,
    response_model=FeedbackStored,
    responses=FEEDBACK_ERRORS,
    dependencies=[Security(BEARER)],
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": Feedback.model_json_schema()}}}
    },
)
async def feedback(request: Request) -> Response:
    """Store the true class of a logged prediction (its `prediction_id`), for live accuracy and training data.
    A second label for the same prediction replaces the first."""
    service = bentoml.get_current_service()
    check_feedback_token(service.settings.feedback_token, request.headers.get("authorization", ""))
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise ClientError('send JSON (content type application/json): {"prediction_id": "...", "label": 3}', 415)
    try:
        given = Feedback.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise ClientError(f"{where}: {first['msg']}") from None
    label = class_index(given.label, service.class_names)
    if service.log is None:
        raise ClientError(
            "no prediction is logged here (SERVING_PREDICTION_LOG=false): feedback has nothing to label", 404
        )
    found = await anyio.to_thread.run_sync(service.log.find, given.prediction_id)
    if found is None:
        raise ClientError(f"no logged prediction has the id {given.prediction_id!r}", 404)
    await anyio.to_thread.run_sync(service.log.store_feedback, given.prediction_id, label, found["label"])
    correct = label == found["label"]
    FEEDBACK.labels("correct" if correct else "incorrect").inc()
    stored = {
        "prediction_id": given.prediction_id,
        "label": label,
        "class_name": service.class_names[label],
        "predicted_label": found["label"],
        "correct": correct,
    }
    return json_response(stored, 201)


def check_feedback_token(token: SecretStr | None, authorization: str) -> None:
    """403 where no token is configured, 401 (with the Bearer challenge) for a missing or wrong one; the
    comparison takes the same time wherever the given token differs."""
    if token is None:
        raise ClientError("feedback is off: set SERVING_FEEDBACK_TOKEN to the bearer token its senders use", 403)
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise ClientError(
            "send `Authorization: Bearer <token>` with the feedback token", 401, {"WWW-Authenticate": "Bearer"}
        )


def class_index(label: int | str, class_names: list[str]) -> int:
    if isinstance(label, str):
        if label not in class_names:
            raise ClientError(f"label {label!r} is not a class of the model: {class_names}")
        return class_names.index(label)
    if not 0 <= label < len(class_names):
        raise ClientError(f"label {label} is not a class index of the model: 0 to {len(class_names) - 1}")
    return label


@router.get("/model")
async def model_card() -> Response:
    """The served model: name, dataset, class names, accuracy, MLflow run, BentoML tag, execution provider."""
    return json_response(bentoml.get_current_service().card())


@router.get("/ui", include_in_schema=True, response_class=RedirectResponse, status_code=307)
async def demo_page() -> RedirectResponse:
    """The demo page: drop, pick or draw an image and see what the model sees and says."""
    return RedirectResponse("ui/", status_code=307)  # relative: works behind a path prefix


async def client_error(request: Request, exc: Exception) -> Response:
    """A refused request: the client gets the reason, and so does the log (with or without access logging)."""
    if not isinstance(exc, ClientError):  # registered for ClientError only
        raise exc
    log_refusal(request.method, request.url.path, exc)
    return json_response({"error": exc.message}, exc.status, exc.headers)


def log_refusal(method: str, path: str, exc: ClientError) -> None:
    log.warning("%s %s -> %d: %s", method, path, exc.status, exc.message)


def build_api(settings: ServingSettings) -> FastAPI:
    """The app BentoML mounts at /: the routes, the body limit, client errors as JSON, the demo page."""
    api = FastAPI(title="classifier", docs_url=None, redoc_url=None, openapi_url=None)  # BentoML serves the docs
    api.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    api.add_exception_handler(ClientError, client_error)
    api.include_router(router)
    api.include_router(oip.router)
    api.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    return api

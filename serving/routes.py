"""The HTTP routes: POST /predict, POST /predict_batch, GET /model, the demo page at /ui/.

They are a FastAPI app mounted in the BentoML service rather than `@bentoml.api` methods: BentoML's API
request path costs about 0.8 ms of CPU per request before any work, as much as the model itself
(docs/serving.md), while a mounted app runs in the same BentoML workers, docs, metrics, model store and
bento at half that cost. Each route finds the service (its model, batcher and settings) through BentoML.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import bentoml
import orjson
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from serving import oip
from serving.inputs import ClientError, parse_batch, read_upload
from serving.limits import BodyLimit
from serving.schemas import ERRORS, Batch, Details, Prediction
from serving.settings import ServingSettings

INLINE_BYTES = 64 * 1024  # smaller JSON bodies are parsed on the event loop; a thread hop costs more
UI_DIR = Path(__file__).parent / "ui"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp", "image/tiff")
PREDICTION_ROUTES = ["/predict", "/predict_batch", "/v2/models"]
log = logging.getLogger("bentoml.serving")  # shown by BentoML's log config

router = APIRouter()


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


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
    service = bentoml.get_current_service()
    with service.batcher.tracked():
        data = await read_upload(request, "image")
        image = await service.decode(data)
        probabilities = await service.probabilities(image)
        prediction = service.predictions(probabilities)[0]
        if details:
            prediction["probabilities"] = [
                {"class_name": name, "probability": p}
                for name, p in zip(service.class_names, probabilities[0].tolist(), strict=True)
            ]
            prediction["model_input"] = image[0, 0].tolist()
        return json_response(prediction)


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
    service = bentoml.get_current_service()
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise ClientError('send JSON (content type application/json): {"images": [...]}', status=415)
    with service.batcher.tracked():
        body = await request.body()
        args = (body, service.settings.max_batch_images, service.image_shape)
        images = parse_batch(*args) if len(body) <= INLINE_BYTES else await anyio.to_thread.run_sync(parse_batch, *args)
        return json_response(service.predictions(await service.probabilities(images)))


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
    assert isinstance(exc, ClientError)
    log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return json_response({"error": exc.message}, exc.status)


def build_api(settings: ServingSettings) -> FastAPI:
    """The app BentoML mounts at /: the routes, the body limit, client errors as JSON, the demo page."""
    api = FastAPI(title="classifier", docs_url=None, redoc_url=None, openapi_url=None)  # BentoML serves the docs
    api.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    api.add_exception_handler(ClientError, client_error)
    api.include_router(router)
    api.include_router(oip.router)
    api.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    return api

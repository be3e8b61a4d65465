"""POST /predict and POST /predict_batch answered as plain ASGI, ahead of the mounted FastAPI app.

A well-formed prediction request (a Content-Length within the limit, no query string, and for /predict a
multipart body of one file part named `image`) is answered here, past Starlette's routing, FastAPI's request
handling and the streaming multipart parser, the largest share of a worker's CPU time per request outside the
model (docs/results.md, "Where a worker's time goes"). Every other request goes on to the FastAPI routes, which
answer it in full, errors and all; both paths call the same service methods, so an answer is the same either way.
"""

from __future__ import annotations

import functools
import time

import bentoml
import orjson
from python_multipart.multipart import parse_options_header

from serving.inputs import ClientError
from serving.limits import replaying
from serving.routes import log_refusal
from serving.schemas import VERSION_HEADER

UPLOAD_FIELD = b"image"


class DirectPredictions:
    """ASGI middleware: the prediction routes' common requests answered without the app behind it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope["type"] != "http" or path not in ("/predict", "/predict_batch") or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if scope["query_string"] or not length.isdigit() or int(length) > self.max_bytes:
            return await self.app(scope, receive, send)
        content_type = headers.get(b"content-type", b"")
        boundary = multipart_boundary(content_type) if path == "/predict" else None
        plain = boundary is not None or (path == "/predict_batch" and content_type.startswith(b"application/json"))
        if not plain:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        service = bentoml.get_current_service()
        with service.batcher.tracked():
            body = await read_body(receive)
            if body is None:  # the client went away
                return None
            data = single_file(body, boundary, UPLOAD_FIELD) if boundary is not None else None
            if boundary is not None and data is None:  # not one file part: the FastAPI route says what is wrong
                return await self.app(scope, replaying(body, receive), send)
            try:
                if data is None:
                    answers = await service.classify_rows(body, started)
                    answer, version = answers, answers[0]["model_version"]
                else:
                    prediction = await service.classify_upload(data, started)
                    answer, version = prediction, prediction["model_version"]
            except ClientError as exc:
                log_refusal(scope["method"], path, exc)
                return await send_json(send, {"error": exc.message}, exc.status, exc.headers)
            return await send_json(send, answer, 200, {VERSION_HEADER: version})


async def read_body(receive) -> bytes | None:
    """The whole body, or None when the client disconnects first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


@functools.lru_cache(maxsize=256)  # a client sends the same header with every request
def multipart_boundary(content_type: bytes) -> bytes | None:
    media, options = parse_options_header(content_type)
    return options.get(b"boundary") if media == b"multipart/form-data" else None


def single_file(body: bytes, boundary: bytes, field: bytes) -> bytes | None:
    """The file of a multipart body whose only part is a file upload in `field`; None for any other body."""
    delimiter = b"--" + boundary
    start = len(delimiter) + 2
    if not body.startswith(delimiter + b"\r\n") or body.count(delimiter) != 2:
        return None
    end = body.rfind(b"\r\n" + delimiter + b"--")
    headers_end = body.find(b"\r\n\r\n", start)
    if end < 0 or headers_end < 0 or headers_end > end or body[end + len(delimiter) + 4 :].strip():
        return None
    dispositions = [
        value
        for name, _, value in (line.partition(b":") for line in body[start:headers_end].split(b"\r\n"))
        if name.strip().lower() == b"content-disposition"
    ]
    if len(dispositions) != 1:
        return None
    if not file_in_field(dispositions[0].strip(), field):
        return None
    return body[headers_end + 4 : end]


@functools.lru_cache(maxsize=256)  # likewise: the same file name in every request of a client
def file_in_field(disposition: bytes, field: bytes) -> bool:
    """Whether a part's Content-Disposition is that of a file upload in `field`."""
    kind, options = parse_options_header(disposition)
    return kind == b"form-data" and options.get(b"name") == field and b"filename" in options


async def send_json(send, content, status: int, headers: dict[str, str]) -> None:
    body = orjson.dumps(content)
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    fields += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})

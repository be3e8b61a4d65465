"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API), which KServe, Seldon and Triton's clients
speak: health, server and model metadata, and inference on JSON tensors or on the binary tensor data
extension (a JSON header of `Inference-Header-Content-Length` bytes, then the raw tensors).

One model, named as registered (`<dataset>-classifier`), version = its registered version (its BentoML tag's
where it is not registered), the one that answers now, which changes as the service follows the registry; its
metadata's
`parameters.class_names` names the columns of the per-class outputs.
Input: UINT8 [-1,1,28,28] pixels (FP32 holding whole numbers 0-255 is accepted too); outputs `logits` and
`probabilities`, FP32 [-1,classes], `ood_score` FP32 [-1], `out_of_distribution` BOOL [-1] and `prediction_id`
BYTES [-1] (for POST /feedback). Inference goes through the service's batcher, with /predict's requests, and
is counted and logged as they are.
A request the service cannot use gets 400 (404 for an unknown model or version) and {"error": "..."}.
"""

from __future__ import annotations

import time
from typing import Any

import bentoml
import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from serving.inputs import ClientError
from serving.schemas import VERSION_HEADER

DATATYPES: dict[str, np.dtype] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
OUTPUTS = {  # name: datatype, whether it has a column per class
    "logits": ("FP32", True),
    "probabilities": ("FP32", True),
    "ood_score": ("FP32", False),
    "out_of_distribution": ("BOOL", False),
    "prediction_id": ("BYTES", False),
}
HEADER_LENGTH = "inference-header-content-length"
ERROR = {"model": dict[str, str], "description": 'what is wrong with the request: {"error": "..."}'}
NOT_FOUND = {  # a name the router cannot even match (a line break in it) gets the server's plain 404
    **ERROR,
    "description": 'an unknown model or version: {"error": "..."}',
    "content": {"text/plain": {"schema": {"type": "string"}}},
}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], responses={400: ERROR, 404: NOT_FOUND})


def _json(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def _model(name: str, version: str | None = None) -> Any:
    """The service, if `name` (and `version`) is the model it serves."""
    service = bentoml.get_current_service()
    served_name, served_version = service.bento_model.tag.name, service.served.version
    if name != served_name or version not in (None, served_version):
        served = f"{served_name} version {served_version}"
        asked = name if version is None else f"{name} version {version}"
        raise ClientError(f"unknown model {asked}; this server serves {served}", status=404)
    return service


@router.get("/health/live")
async def live() -> Response:
    """The server is up (Open Inference Protocol)."""
    return _json({"live": True})


@router.get("/health/ready")
async def ready() -> Response:
    """The model is loaded and warm (Open Inference Protocol)."""
    return _json({"ready": True})


@router.get("")
async def server_metadata() -> Response:
    """The server's name, version and protocol extensions (Open Inference Protocol)."""
    return _json({"name": "image_classifier", "version": bentoml.__version__, "extensions": ["binary_tensor_data"]})


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(name: str, version: str | None = None) -> Response:
    """The model's tensors: its input and outputs, with datatypes and shapes (Open Inference Protocol)."""
    service = _model(name, version)
    classes = len(service.class_names)
    return _json(
        {
            "name": name,
            "versions": [service.served.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": service.input_name, "datatype": "UINT8", "shape": [-1, *service.image_shape]}],
            "outputs": [
                {"name": name, "datatype": datatype, "shape": [-1, classes] if per_class else [-1]}
                for name, (datatype, per_class) in OUTPUTS.items()
            ],
            "parameters": {"class_names": service.class_names},
        }
    )


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, version: str | None = None) -> Response:
    """The model is ready for inference (Open Inference Protocol)."""
    _model(name, version)
    return _json({"name": name, "ready": True})


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    """Classify a batch of images given as an input tensor (Open Inference Protocol)."""
    started = time.perf_counter()
    service = _model(name, version)
    with service.batcher.tracked():
        body = await request.body()
        header, binary = split_request(body, request.headers.get(HEADER_LENGTH))
        limit = service.settings.max_batch_images
        images = input_images(header, binary, service.input_name, tuple(service.image_shape), limit)
        outputs = [requested_output(o) for o in header.get("outputs") or [{"name": o} for o in OUTPUTS]]
        served = await service.predict_images(images, "/v2/infer", started)
        values = {
            "logits": served.model.classifier.columns.logits(served.rows),
            "probabilities": served.probabilities,
            "ood_score": served.scores,
            "out_of_distribution": served.flagged,
            "prediction_id": served.ids,
        }
        all_binary = bool((header.get("parameters") or {}).get("binary_data_output"))
        version = served.model.version
        response: dict[str, Any] = {"model_name": name, "model_version": version}
        if "id" in header:
            response["id"] = header["id"]
        response["outputs"] = []
        tensors = []
        for output_name, binary_output in outputs:
            entry, data = tensor(output_name, values[output_name], binary_output or all_binary)
            response["outputs"].append(entry)
            if data is not None:
                tensors.append(data)
    text = orjson.dumps(response)
    if not tensors:
        return Response(text, media_type="application/json", headers={VERSION_HEADER: version})
    return Response(
        text + b"".join(tensors),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text)), VERSION_HEADER: version},
    )


def tensor(name: str, value: Any, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """An output tensor's JSON entry, and its raw bytes where it travels as binary tensor data (BYTES: each
    element a 4-byte little-endian length, then the bytes)."""
    datatype = OUTPUTS[name][0]
    shape = [len(value)] if datatype == "BYTES" else list(np.shape(value))
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if not binary:
        entry["data"] = list(value) if datatype == "BYTES" else np.asarray(value).ravel().tolist()
        return entry, None
    if datatype == "BYTES":
        data = b"".join(len(v).to_bytes(4, "little") + v.encode() for v in value)
    else:
        data = np.ascontiguousarray(value, dtype="<f4" if datatype == "FP32" else np.bool_).tobytes()
    entry["parameters"] = {"binary_data_size": len(data)}
    return entry, data


def split_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        length = len(body)
    elif header_length.isdigit() and int(header_length) <= len(body):
        length = int(header_length)
    else:
        raise ClientError(f"Inference-Header-Content-Length {header_length!r} is not a length within the body")
    try:
        header = orjson.loads(body[:length])
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ClientError('an inference request is a JSON object: {"inputs": [...]}')
    return header, body[length:]


def input_images(header: dict, binary: bytes, expected: str, shape: tuple[int, ...], limit: int) -> np.ndarray:
    """The request's one input tensor, named `expected`, as uint8 model inputs [N, *shape] (N up to `limit`)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(f"`inputs` must hold exactly one tensor, `{expected}`")
    tensor = inputs[0]
    if tensor.get("name") != expected:
        raise ClientError(f"unknown input {tensor.get('name')!r}: the model's input is `{expected}`")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise ClientError(f"input datatype {datatype!r} is not accepted: send UINT8 (or FP32) pixels 0-255")
    dims = tensor.get("shape")
    if (
        not isinstance(dims, list)
        or len(dims) != 1 + len(shape)
        or not all(isinstance(d, int) for d in dims)
        or tuple(dims[1:]) != shape
    ):
        raise ClientError(f"input shape {dims} must be [N, {', '.join(map(str, shape))}]")
    count = dims[0]
    if not 1 <= count <= limit:
        raise ClientError(f"{count} images in one request; send 1 to {limit} (SERVING_MAX_BATCH_IMAGES)")
    size = count * int(np.prod(shape))
    dtype = DATATYPES[datatype]
    binary_size = (tensor.get("parameters") or {}).get("binary_data_size")
    if binary_size is not None:
        if binary_size != size * dtype.itemsize or len(binary) != binary_size:
            raise ClientError(
                f"binary tensor data of {len(binary)} bytes (binary_data_size {binary_size}) for a {datatype} "
                f"tensor of shape {dims}: expected {size * dtype.itemsize} bytes"
            )
        values = np.frombuffer(binary, dtype=dtype)
    else:
        values = _json_data(tensor.get("data"), size, dims)
    # binary UINT8 holds nothing else; NaN fails every comparison
    if values.dtype != np.uint8 and not ((values >= 0) & (values <= 255) & (values == np.round(values))).all():
        raise ClientError(f"{datatype} pixel values must be whole numbers 0-255")
    return values.astype(np.uint8).reshape(count, *shape)


def _json_data(data: Any, size: int, dims: list[int]) -> np.ndarray:
    """JSON tensor data, flat or nested, as float64 values checked against the declared size."""
    if not isinstance(data, list):
        raise ClientError("the input tensor has no `data` (nor binary_data_size for binary tensor data)")
    try:
        values = np.asarray(data, dtype=np.float64).ravel()
    except (ValueError, TypeError):
        raise ClientError("input tensor `data` must be numbers") from None
    if values.size != size:
        raise ClientError(f"input tensor `data` holds {values.size} values; shape {dims} needs {size}")
    return values


def requested_output(output: Any) -> tuple[str, bool]:
    """(name, as binary tensor data) of a requested output."""
    if not isinstance(output, dict) or output.get("name") not in OUTPUTS:
        name = output.get("name") if isinstance(output, dict) else output
        raise ClientError(f"unknown output {name!r}: the model's outputs are {', '.join(OUTPUTS)}")
    return output["name"], bool((output.get("parameters") or {}).get("binary_data"))

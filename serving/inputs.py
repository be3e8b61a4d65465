"""Request bodies to model inputs, or a ClientError whose message names what is wrong."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pyspng
from starlette.datastructures import UploadFile
from starlette.requests import Request

PNG_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"  # the signature, then the IHDR chunk's length and type
GREY_8_BIT = b"\x08\x00"  # IHDR's bit depth and colour type for 8-bit grey
EXIF_MARKS = (b"eXIf", b"Raw profile type exif")  # the chunk, and the text chunk keyword, that Pillow reads EXIF from
# what a JSON value other than an integer or a list holds: a fraction, an exponent, a string, true, false, null
NOT_INTEGER_MARKS = (b".", b"e", b"E", b'"', b"t", b"f", b"n")


class ClientError(Exception):
    """A request the service cannot use: answered with `status` and `{"error": message}`."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}


async def read_upload(request: Request, field: str) -> bytes:
    """The bytes of the one file in multipart field `field`."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ClientError(
            f"send the image as multipart/form-data with the file in field `{field}` "
            f"(got content type {content_type or 'none'!r})",
            status=415,
        )
    try:
        async with request.form(max_files=2, max_fields=10) as form:
            names = [name for name, _ in form.multi_items()]
            if field not in names:
                raise ClientError(
                    f"missing multipart field `{field}` (got {names or 'no fields'}): send the image file as `{field}`"
                )
            extra = sorted({name for name in names if name != field})
            if extra:
                raise ClientError(f"unexpected multipart fields {extra}: send only the image file, as `{field}`")
            check_one_value_per_field(names)
            upload = form[field]
            if not isinstance(upload, UploadFile):
                raise ClientError(f"multipart field `{field}` must be a file upload, not a text value")
            return await upload.read()
    except ClientError:
        raise
    except Exception as exc:  # the multipart parser's errors are the client's malformed body
        raise ClientError(f"malformed multipart body: {exc}") from None


def check_one_value_per_field(names: list[str]) -> None:
    """Each multipart field given once: of two files under one name, one would go unread."""
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise ClientError(
            f"{names.count(repeated)} files in multipart field `{repeated}`: send one image per request "
            "(POST /predict_batch classifies many)"
        )


def parse_batch(body: bytes, limit: int, shape: tuple[int, ...]) -> np.ndarray:
    """A JSON body {"images": [...]} to uint8 [N, *shape]."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or "images" not in payload:
        raise ClientError('send a JSON object {"images": [image, ...]}, each image 28x28 (or 784) integers 0-255')
    return images_to_array(payload["images"], limit, shape, integers=integers_only(body))


def integers_only(body: bytes) -> bool:
    """Whether a JSON body {"images": ...} holds nothing but lists and integers: true of most batches, which then
    convert to an array without NumPy inspecting every value for its type."""
    rest = body.replace(b'"images"', b"", 1)
    return not any(mark in rest for mark in NOT_INTEGER_MARKS)


def images_to_array(images: object, limit: int, shape: tuple[int, ...], integers: bool = False) -> np.ndarray:
    """JSON images (each 28x28 or 784 integers 0-255) to uint8 [N, *shape]; `integers`: the caller knows every
    value is an integer. Well-formed batches take one vectorised pass; the image-by-image pass runs only to name
    the first bad image."""
    if not isinstance(images, list) or not images:
        raise ClientError("`images` must be a non-empty list of images")
    if len(images) > limit:
        raise ClientError(f"{len(images)} images in one request; the limit is {limit}")
    pixels = math.prod(shape)
    try:
        array = np.asarray(images, dtype=np.int64 if integers else None)
    except (ValueError, TypeError, OverflowError):  # ragged, or mixed layouts
        array = None
    if array is None or array.dtype.kind not in "iuf" or array.shape[1:] not in (shape, shape[1:], (pixels,)):
        array = np.stack([_one_image(i, image, shape) for i, image in enumerate(images)])
    array = array.reshape(len(images), *shape)
    if array.dtype.kind == "f" or array.min() < 0 or array.max() > 255:
        bad = (array < 0) | (array > 255)
        if array.dtype.kind == "f":
            bad |= array != np.round(array)  # also true for NaN
        if bad.any():
            first = int(np.flatnonzero(bad.reshape(len(images), -1).any(axis=1))[0])
            raise ClientError(f"pixel values must be integers 0-255; image {first} is not")
    return array.astype(np.uint8)


def _one_image(index: int, image: object, shape: tuple[int, ...]) -> np.ndarray:
    pixels = math.prod(shape)
    try:
        values = np.asarray(image)
    except (ValueError, TypeError, OverflowError):
        raise ClientError(
            f"image {index} must be {shape[1]}x{shape[2]} (or {pixels}) numbers; got ragged or non-numeric data"
        ) from None
    if values.dtype.kind not in "iuf":
        raise ClientError(
            f"image {index} must be {shape[1]}x{shape[2]} (or {pixels}) numbers; got non-numeric data"
        ) from None
    if values.shape not in ((pixels,), shape[1:], shape):
        raise ClientError(
            f"image {index} must be {shape[1]}x{shape[2]} or {pixels} values; got shape {list(values.shape)}"
        )
    return values.reshape(shape).astype(np.float64)


def grey_png_pixels(data: bytes, max_pixels: int) -> np.ndarray | None:
    """The pixels [H, W] of an 8-bit grey PNG of at most `max_pixels` that carries no EXIF (so no orientation
    to apply), decoded by libspng without Pillow's Python per file (the decoding layer of docs/results.md's
    worker profile); None for any other upload, or a file libspng cannot decode: Pillow opens those, and names
    what is wrong with a bad one. Both decoders give these files' pixels exactly, as PNG is lossless and
    neither applies gamma."""
    if not data.startswith(PNG_START) or data[24:26] != GREY_8_BIT:
        return None
    if int.from_bytes(data[16:20]) * int.from_bytes(data[20:24]) > max_pixels:
        return None  # before the search below, which a large file would make long
    if any(mark in data for mark in EXIF_MARKS):
        return None
    try:
        return pyspng.load(data)
    except RuntimeError:
        return None

"""Request bodies and limits, in-process on a real Starlette app: serving/inputs.py, limits.py, direct.py and oip.py."""

import io
import struct
import zlib

import numpy as np
import orjson
import pytest
import requests
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from common.preprocess import MAX_IMAGE_PIXELS, grey_to_input, image_to_input
from serving.direct import multipart_boundary, single_file
from serving.inputs import (
    ClientError,
    grey_png_pixels,
    images_to_array,
    integers_only,
    parse_batch,
    read_upload,
)
from serving.limits import ApiRequestGuard, BodyLimit, HeaderLimit
from serving.oip import input_images, requested_output, split_request

SHAPE = (1, 28, 28)
PIXELS = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)


async def upload_size(request: Request) -> Response:
    try:
        return JSONResponse({"bytes": len(await read_upload(request, "image"))})
    except ClientError as exc:
        return JSONResponse({"error": exc.message}, exc.status)


@pytest.fixture
def uploads() -> TestClient:
    return TestClient(Starlette(routes=[Route("/predict", upload_size, methods=["POST"])]))


def test_one_file_in_the_image_field_is_read(uploads):
    response = uploads.post("/predict", files={"image": ("x.png", b"12345")})
    assert response.json() == {"bytes": 5}


def test_two_files_in_the_image_field_are_refused_naming_it(uploads):
    response = uploads.post("/predict", files=[("image", ("a.png", b"1")), ("image", ("b.png", b"2"))])
    assert response.status_code == 400
    assert response.json()["error"].startswith("2 files in multipart field `image`: send one image per request")


@pytest.mark.parametrize(
    ("files", "data", "headers", "status", "message"),
    [
        ({"picture": ("x.png", b"1")}, None, None, 400, "missing multipart field `image` (got ['picture'])"),
        ({"image": ("x.png", b"1")}, {"note": "hi"}, None, 400, "unexpected multipart fields ['note']"),
        ({"image": (None, b"text")}, None, None, 400, "must be a file upload, not a text value"),
        (None, None, {"content-type": "application/json"}, 415, "send the image as multipart/form-data"),
    ],
)
def test_other_bad_uploads_name_what_is_wrong(uploads, files, data, headers, status, message):
    response = uploads.post(
        "/predict", files=files, data=data, headers=headers, content=None if files or data else b"{}"
    )
    assert response.status_code == status and message in response.json()["error"]


def test_a_batch_takes_rows_or_flat_images_and_names_the_first_bad_one():
    rows = np.arange(784).reshape(28, 28) % 256
    batch = parse_batch(orjson.dumps({"images": [rows.tolist(), rows.ravel().tolist()]}), 4, SHAPE)
    assert batch.shape == (2, *SHAPE) and batch.dtype == np.uint8 and np.array_equal(batch[0, 0], rows)
    with pytest.raises(ClientError, match="image 1 is not"):
        images_to_array([rows.tolist(), [[300] * 28] * 28], 4, SHAPE)
    with pytest.raises(ClientError, match="image 0 must be 28x28 or 784 values; got shape \\[3\\]"):
        images_to_array([[1, 2, 3]], 4, SHAPE)
    with pytest.raises(ClientError, match="5 images in one request; the limit is 4"):
        images_to_array([rows.tolist()] * 5, 4, SHAPE)
    with pytest.raises(ClientError, match="not valid JSON"):
        parse_batch(b"{", 4, SHAPE)


def outcome(convert) -> tuple[str, object]:
    try:
        return "array", convert().tobytes()
    except ClientError as exc:
        return "error", exc.message


ROWS = orjson.dumps((np.arange(784).reshape(28, 28) % 256).tolist()).decode()
FLAT = orjson.dumps(list(range(784))).decode().replace("783", "7")


@pytest.mark.parametrize(
    ("images", "integers"),
    [
        (f"[{ROWS}]", True),
        (f"[{ROWS}, {FLAT}]", True),  # rows and a flat image: ragged for one array
        (f"[{ROWS.replace('255', '300')}]", True),
        (f"[{ROWS.replace('[0,', '[-1,', 1)}]", True),
        (f"[{ROWS.replace('255', str(2**70))}]", True),  # past int64
        ("[[1, 2, 3]]", True),
        ("[{}]", True),
        (f"[{ROWS.replace('255', '255.0')}]", False),
        (f"[{ROWS.replace('255', '2.5e2')}]", False),
        (f"[{ROWS.replace('255', 'true')}]", False),
        (f"[{ROWS.replace('255', 'null')}]", False),
        (f"[{ROWS.replace('255', chr(34) + '7' + chr(34))}]", False),
        (f'[{ROWS}], "note": "a string in another key"', False),
    ],
)
def test_a_batch_of_integers_alone_converts_as_any_other_batch(images, integers):
    """Bodies of integers and lists convert without NumPy's type search, with the same array or error."""
    body = f'{{"images": {images}}}'.encode()
    assert integers_only(body) is integers
    general = outcome(lambda: images_to_array(orjson.loads(body)["images"], 4, SHAPE))
    assert outcome(lambda: parse_batch(body, 4, SHAPE)) == general


def test_oip_tensors_binary_or_json_become_the_same_images():
    pixels = np.random.default_rng(0).integers(0, 256, (2, *SHAPE), dtype=np.uint8)
    tensor = {"name": "images", "datatype": "UINT8", "shape": [2, *SHAPE]}
    text = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": pixels.nbytes}}]})
    header, binary = split_request(text + pixels.tobytes(), str(len(text)))
    assert np.array_equal(input_images(header, binary, "images", SHAPE, 8), pixels)
    as_json = {"inputs": [{**tensor, "datatype": "FP32", "data": pixels.astype(float).tolist()}]}
    assert np.array_equal(input_images(as_json, b"", "images", SHAPE, 8), pixels)
    assert requested_output({"name": "probabilities", "parameters": {"binary_data": True}}) == ("probabilities", True)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, *SHAPE]}]}, "unknown input 'x'"),
        ({"inputs": [{"name": "images", "datatype": "INT64", "shape": [1, *SHAPE]}]}, "datatype 'INT64'"),
        ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28]}]}, "must be [N, 1, 28, 28]"),
        ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [9, *SHAPE], "data": []}]}, "9 images"),
        ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, *SHAPE], "data": [0.5] * 784}]}, "whole"),
    ],
)
def test_oip_tensors_the_model_cannot_take_are_named(header, message):
    with pytest.raises(ClientError, match=message.replace("[", "\\[")):
        input_images(header, b"", "images", SHAPE, 8)


def test_an_oip_header_length_past_the_body_is_refused():
    with pytest.raises(ClientError, match="not a length within the body"):
        split_request(b"{}", "99")


class Recorder:
    """An ASGI app that answers 200 with the body it read, and remembers whether it read one."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def test_headers_over_the_limit_get_431_and_the_body_is_never_read():
    app = Recorder()
    client = TestClient(HeaderLimit(app, max_bytes=2048))
    refused = client.post("/anything", content=b"payload", headers={"x-padding": "a" * 4096})
    assert refused.status_code == 431 and app.bodies == []
    assert (
        refused.json()["error"].startswith("request headers too large: 4,") and "limit is 2,048 bytes" in refused.text
    )
    assert client.post("/anything", content=b"payload").content == b"payload"
    assert client.get("/anything?" + "q" * 4096).status_code == 431  # the request line counts too


def test_a_body_over_the_limit_gets_413():
    client = TestClient(BodyLimit(Recorder(), max_bytes=100))
    assert client.post("/x", content=b"a" * 101).status_code == 413
    assert client.post("/x", content=b"a" * 100).status_code == 200


def test_the_api_guard_refuses_what_bentoml_would_answer_500_and_hands_good_bodies_on_unchanged():
    app = Recorder()
    client = TestClient(ApiRequestGuard(app, {"/api/predict": "multipart/form-data"}, max_bytes=10_000))
    good = client.post("/api/predict", files={"image": ("x.png", b"\x89PNG...")})
    assert good.status_code == 200 and good.content == app.bodies[-1] and b"\x89PNG..." in good.content
    twice = client.post("/api/predict", files=[("image", ("a.png", b"1")), ("image", ("b.png", b"2"))])
    assert twice.status_code == 400 and "2 files in multipart field `image`" in twice.json()["error"]
    no_boundary = client.post("/api/predict", content=b"x", headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400 and "with a boundary" in no_boundary.json()["error"]
    assert client.post("/api/predict", files={"image": ("x.png", b"a" * 20_000)}).status_code == 413
    assert len(app.bodies) == 1


def multipart_body(**parts) -> tuple[bytes, bytes]:
    """A multipart body as requests (a client people use) encodes it, and its boundary."""
    prepared = requests.Request("POST", "http://localhost/predict", **parts).prepare()
    boundary = multipart_boundary(prepared.headers["Content-Type"].encode())
    assert boundary is not None and isinstance(prepared.body, bytes)
    return prepared.body, boundary


def test_the_direct_route_takes_one_file_in_the_image_field_and_leaves_every_other_body_to_the_app():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    body, boundary = multipart_body(files={"image": ("x.png", png, "image/png")})
    assert single_file(body, boundary, b"image") == png
    assert single_file(body, boundary, b"file") is None
    for other in (
        {"files": [("image", ("a.png", b"1")), ("image", ("b.png", b"2"))]},  # two files
        {"files": {"image": ("x.png", png)}, "data": {"note": "x"}},  # an extra field
        {"files": {"image": (None, "not a file")}},  # a text value
    ):
        assert single_file(*multipart_body(**other), b"image") is None, other
    assert single_file(body[:-10], boundary, b"image") is None  # truncated
    assert multipart_boundary(b"application/json") is None


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def with_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """`data` with a chunk inserted after IHDR (which ends at byte 33)."""
    crc = zlib.crc32(kind + body).to_bytes(4)
    return data[:33] + len(body).to_bytes(4) + kind + body + crc + data[33:]


GREY_PNGS = {
    "dataset size": png(Image.fromarray(PIXELS)),
    "light background, other size": png(Image.fromarray(255 - np.kron(PIXELS[:20, :15], np.ones((3, 2), np.uint8)))),
    "no compression": png(Image.fromarray(PIXELS), compress_level=0),
    "gamma chunk": with_chunk(png(Image.fromarray(PIXELS)), b"gAMA", struct.pack(">I", 100_000)),
}


@pytest.mark.parametrize("data", GREY_PNGS.values(), ids=GREY_PNGS.keys())
def test_libspng_decodes_8_bit_grey_pngs_to_pillows_model_input(data):
    pixels = grey_png_pixels(data, MAX_IMAGE_PIXELS)
    assert pixels is not None
    np.testing.assert_array_equal(grey_to_input(pixels, 28, 20), image_to_input(data, 28, 20, MAX_IMAGE_PIXELS))


def text_chunk(keyword: str, text: str) -> PngInfo:
    info = PngInfo()
    info.add_text(keyword, text, zip=True)
    return info


ORIENTED = Image.Exif()
ORIENTED[0x0112] = 6  # rotated: only Pillow's path turns it upright
OTHER_FILES = {
    "EXIF chunk": png(Image.fromarray(PIXELS), exif=ORIENTED),
    "EXIF as text": png(Image.fromarray(PIXELS), pnginfo=text_chunk("Raw profile type exif", "exif")),
    **{mode: png(Image.fromarray(PIXELS).convert(mode)) for mode in ("RGB", "P", "1", "LA")},
    "16-bit grey": png(Image.fromarray(PIXELS.astype(np.uint16) * 257)),
    "truncated": png(Image.fromarray(PIXELS))[:60],
    "JPEG": b"\xff\xd8\xff" + bytes(100),
}


@pytest.mark.parametrize("data", OTHER_FILES.values(), ids=OTHER_FILES.keys())
def test_every_other_upload_is_left_to_pillow(data):
    assert grey_png_pixels(data, MAX_IMAGE_PIXELS) is None


def test_a_grey_png_over_the_pixel_bound_is_left_to_pillow_which_checks_the_limit():
    assert grey_png_pixels(GREY_PNGS["dataset size"], 28 * 28 - 1) is None

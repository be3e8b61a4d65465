"""Uploaded files to model inputs, in-process: orientation, colour, transparency, size, broken files."""

import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.phone_photos import phone_photo
from common.preprocess import MAX_IMAGE_PIXELS, ImageError, image_to_input


def model_input(data: bytes, fit: int = 28) -> np.ndarray:
    return image_to_input(data, 28, fit, MAX_IMAGE_PIXELS)[0].astype(int)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def boot() -> np.ndarray:
    """An L-shaped object: any turn of it is another image."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 6:12] = 255
    pixels[18:24, 6:22] = 200
    return pixels


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_photo_stored_sideways_is_turned_upright_first(orientation):
    upright = model_input(phone_photo(boot(), 1))
    sideways = model_input(phone_photo(boot(), orientation))
    assert np.abs(upright - sideways).mean() < 2  # JPEG's own noise: the same image
    ignored = np.rot90(upright, 1 if orientation == 6 else -1)  # what the model saw had the tag been ignored
    assert np.abs(ignored - sideways).mean() > 20


def test_the_orientation_tag_of_a_palette_image_is_honoured_too():
    palette = Image.fromarray(255 - boot()).convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encoded(palette.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    assert np.array_equal(model_input(sideways), model_input(encoded(palette, "PNG")))


def test_a_dataset_image_round_trips_exactly_and_a_light_background_is_inverted():
    pixels = boot()
    assert np.array_equal(model_input(encoded(Image.fromarray(pixels), "PNG")), pixels)
    assert np.array_equal(model_input(encoded(Image.fromarray(255 - pixels), "PNG")), pixels)


def test_transparency_counts_as_a_white_background():
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: background
    rgba[4:24, 6:12] = (0, 0, 0, 255)  # an opaque black bar
    pixels = model_input(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert pixels[10, 8] == 255 and pixels[10, 20] == 0  # the bar light, the transparent part black


def test_a_large_colour_photo_is_trimmed_scaled_and_centred():
    photo = np.full((600, 900, 3), 250, np.uint8)
    photo[100:500, 400:500] = (30, 60, 90)  # a dark upright bar on a light background
    pixels = model_input(encoded(Image.fromarray(photo), "JPEG"), fit=20)
    rows, cols = np.nonzero(pixels > 128)
    assert rows.max() - rows.min() + 1 == 20 and 13 <= cols.mean() <= 14  # longest side 20, centred


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the image file is empty"),
        (b"not an image at all", "not an image in a format this service reads"),
        (encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), np.uint8)), "PNG")[:900], "trunc"),
    ],
)
def test_broken_files_are_image_errors_naming_the_problem(data, message):
    with pytest.raises(ImageError, match=message):
        model_input(data)


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded():
    header_only = encoded(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageError, match="3000x2000 pixels, over the limit of 5,000,000 pixels"):
        image_to_input(header_only, 28, 28, 5_000_000)

"""Uploaded image files to the model's input: 28x28 grey, light object on black, centred.

Follows how the datasets were made: trim to the object, scale the longest side to `fit` pixels
keeping the aspect ratio, pad onto a black square and centre it. Images already at the input size
are taken as they are (after the grey conversion and background check), so a dataset image
round-trips exactly. The dataset-specific numbers come from the model's metadata.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 40_000_000  # default of SERVING_MAX_IMAGE_PIXELS; the prepare stage's limit for image folders


class ImageError(ValueError):
    """The upload is not an image this service can use; the message says why."""


@contextlib.contextmanager
def _as_image_errors():
    """PIL's many exception types for bad files, as one ImageError with a message a person can act on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        raise ImageError(
            "the file is not an image in a format this service reads (PNG, JPEG, BMP, GIF, WebP, TIFF, ...)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the image is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image file is truncated or corrupt: {exc}") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Reads only the header (format and size), so the pixel limit (a decompression-bomb guard) holds before
    anything is decoded."""
    if not data:
        raise ImageError("the image file is empty (0 bytes)")
    with _as_image_errors():
        image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels")
    return image


def to_grey(image: Image.Image) -> np.ndarray:
    """Grey uint8 pixels; transparent areas count as white background."""
    if image.mode == "L":
        return np.asarray(image)  # converting would copy it
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def dark_background(pixels: np.ndarray) -> np.ndarray:
    """Invert images whose border (their background) is light: the datasets are light on black."""
    border = np.sort(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]))
    middle = len(border) // 2
    median = border[middle] if len(border) % 2 else (int(border[middle - 1]) + int(border[middle])) / 2
    return 255 - pixels if median > 127 else pixels  # np.median costs as much as the rest of the decoding


def fit_and_centre(pixels: np.ndarray, size: int, fit: int) -> np.ndarray:
    """Trim to the object, scale its longest side to `fit` (aspect kept), centre it on a black square."""
    mask = pixels > 0.1 * pixels.max() if pixels.max() else np.ones_like(pixels, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = fit / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(crop).resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def to_model_input(image: Image.Image, size: int, fit: int) -> np.ndarray:
    """An opened upload, decoded, to the uint8 array [1, size, size] the model takes. First of all it is turned
    the way its EXIF orientation says: a phone stores a portrait photo's pixels sideways and sets that tag."""
    with _as_image_errors():
        ImageOps.exif_transpose(image, in_place=True)
        grey = to_grey(image)
    return grey_to_input(grey, size, fit)


def grey_to_input(pixels: np.ndarray, size: int, fit: int) -> np.ndarray:
    """Grey uint8 pixels [H, W], turned upright already, to the uint8 array [1, size, size] the model takes."""
    pixels = dark_background(pixels)
    if pixels.shape != (size, size):
        pixels = fit_and_centre(pixels, size, fit)
    return pixels[None]


def image_to_input(data: bytes, size: int, fit: int, max_pixels: int) -> np.ndarray:
    """An uploaded file to the uint8 array [1, size, size] the model takes."""
    return to_model_input(open_image(data, max_pixels), size, fit)

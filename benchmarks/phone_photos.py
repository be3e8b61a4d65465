"""Phone photos (`make bench-photos`): the served champion on photos of test images as a phone stores them.

A phone stores a portrait photo's pixels sideways and sets the EXIF orientation tag that turns them upright.
Each of the first 200 test images becomes a JPEG photo (the object dark on a light, slightly noisy portrait),
stored upright and stored sideways with orientation 6 and 8, and goes through POST /predict of a real
`bentoml serve` of the workspace's champion. Prints a table and writes benchmarks/results/phone_photos.json.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import ExifTags, Image

from benchmarks.local_server import REPO, benchmarked_service
from benchmarks.publish import publish, served_model
from benchmarks.serving import DATASET, payload_images

# How a phone stores a photo whose EXIF orientation is 6 (turn 90 degrees clockwise to show it) or 8 (counter-
# clockwise): its pixels turned the other way
STORED_SIDEWAYS = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
ORIENTATIONS = {1: "upright", 6: "sideways, EXIF orientation 6", 8: "sideways, EXIF orientation 8"}


def phone_photo(pixels: np.ndarray, orientation: int = 1, seed: int = 0) -> bytes:
    """A JPEG photo of a dataset image as a phone takes one: the object dark on a light, slightly noisy 300x400
    portrait; with `orientation` 6 or 8 its pixels stored sideways and the EXIF tag saying how to turn them."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("L", (300, 400), 255)
    canvas.paste(Image.fromarray(255 - pixels.astype(np.uint8)).resize((280, 280), Image.Resampling.BICUBIC), (10, 60))
    noisy = np.clip(np.asarray(canvas, np.int16) + rng.normal(0, 4, (400, 300)), 0, 255).astype(np.uint8)
    photo = Image.fromarray(noisy).convert("RGB")
    stored = photo.transpose(STORED_SIDEWAYS[orientation]) if orientation in STORED_SIDEWAYS else photo
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def served_labels(url: str, images: np.ndarray, orientation: int) -> np.ndarray:
    def label(i: int) -> int:
        photo = phone_photo(images[i], orientation, seed=i)
        response = requests.post(f"{url}/predict", files={"image": ("photo.jpg", photo, "image/jpeg")}, timeout=60)
        response.raise_for_status()
        return response.json()["label"]

    with ThreadPoolExecutor(8) as pool:
        return np.array(list(pool.map(label, range(len(images)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "phone_photos.json")
    args = parser.parse_args()
    images = payload_images()[: args.images]
    with np.load(DATASET) as data:
        truth = data["y_test"][: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        server = benchmarked_service(Path(tmp) / "server.log")
        try:
            model = requests.get(f"{server.url}/model", timeout=10).json()
            served = served_model(server.url)
            labels = {o: served_labels(server.url, images, o) for o in ORIENTATIONS}
        finally:
            server.close()
    results = {
        "model": f"{model['model_name']} ({model['bentoml_tag']}, {model['precision']})",
        "images": args.images,
        "rows": [
            {
                "stored": ORIENTATIONS[o],
                "accuracy": float((labels[o] == truth).mean()),
                "same_class_as_upright": float((labels[o] == labels[1]).mean()),
            }
            for o in ORIENTATIONS
        ],
    }
    publish(results, table(results), args.output, served)


def table(results: dict) -> str:
    lines = [
        f"The first {results['images']} test images as phone photos (JPEG), POST /predict, {results['model']}.",
        "",
        "| photo stored | accuracy | same class as upright |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['stored']} | {r['accuracy']:.1%} | {r['same_class_as_upright']:.1%} |" for r in results["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""prepare stage: parse the sources, split train/validation (stratified), write arrays, card, samples."""
import json
import logging

import numpy as np

from pipelines._stage import run
from training import datasets
from training.config import CARD_FILE, DATASET_FILE, RAW_DIR, SAMPLES_FILE, dataset_spec, load_params
from training.data import SPLITS, Prepared, class_counts, load_csv, load_idx_pair, stratified_split
from training.plots import sample_grid

log = logging.getLogger("prepare")


def load_sources(data: dict, num_classes: int):
    csv = data.get("csv") or {}
    if csv.get("train"):
        log.info("reading CSV sources %s and %s", csv["train"], csv["test"])
        return load_csv(csv["train"], num_classes), load_csv(csv["test"], num_classes)
    return (
        load_idx_pair(RAW_DIR / datasets.TRAIN_IMAGES, RAW_DIR / datasets.TRAIN_LABELS, num_classes),
        load_idx_pair(RAW_DIR / datasets.TEST_IMAGES, RAW_DIR / datasets.TEST_LABELS, num_classes),
    )


def subset(images: np.ndarray, labels: np.ndarray, size: int, seed: int):
    """A stratified subset for quick runs; 0 keeps everything."""
    if not size or size >= len(labels):
        return images, labels
    _, keep = stratified_split(labels, size, seed)
    return images[keep], labels[keep]


def main() -> None:
    params = load_params()
    data = params["data"]
    spec = dataset_spec(params)
    num_classes = len(spec.class_names)
    (x_pool, y_pool), (x_test, y_test) = load_sources(data, num_classes)
    x_pool, y_pool = subset(x_pool, y_pool, data["subset"]["train"], data["seed"])
    x_test, y_test = subset(x_test, y_test, data["subset"]["test"], data["seed"])
    train_idx, val_idx = stratified_split(y_pool, data["val_size"], data["seed"])
    prepared = Prepared({
        "x_train": x_pool[train_idx], "y_train": y_pool[train_idx],
        "x_val": x_pool[val_idx], "y_val": y_pool[val_idx],
        "x_test": x_test, "y_test": y_test,
    })
    prepared.save(DATASET_FILE)
    train_pixels = prepared.images("train").astype(np.float32) / 255.0
    card = {
        "dataset": spec.name,
        "source": "csv" if (data.get("csv") or {}).get("train") else "idx",
        "class_names": list(spec.class_names),
        "image_shape": list(datasets.IMAGE_SHAPE),
        "sha256": prepared.digest(),
        "pixel_mean": float(train_pixels.mean()),
        "pixel_std": float(train_pixels.std()),
        "images": {split: int(len(prepared.labels(split))) for split in SPLITS},
        "per_class": {
            split: dict(zip(spec.class_names, class_counts(prepared.labels(split), num_classes)))
            for split in SPLITS
        },
    }
    CARD_FILE.write_text(json.dumps(card, indent=2) + "\n")
    sample_grid(prepared.images("train"), prepared.labels("train"), list(spec.class_names), SAMPLES_FILE)
    log.info("prepared %s: %s", spec.name, card["images"])


if __name__ == "__main__":
    run(main)

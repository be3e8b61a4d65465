"""prepare stage: the idx files (or your CSVs) parsed and checked (magic numbers, sizes, label range), or your
image folders read (`data.dataset: folders`, class names from the folder names); a seeded stratified
validation split of the training images, the test images untouched; the image folders of `data.extra` added
to the training split, less a held-out share per folder; the uint8 arrays in one byte-reproducible `.npz`, a
dataset card (class names, counts per class, pixel mean and std, sha256), a sample grid."""

import logging

from common.files import write_json
from pipelines._stage import run
from training.config import CARD_FILE, DATASET_FILE, RAW_DIR, SAMPLES_FILE, Params
from training.folders import prepare
from training.plots import sample_grid

log = logging.getLogger("prepare")


def main() -> None:
    settings = Params.load().data
    result = prepare(settings, RAW_DIR)
    result.prepared.save(DATASET_FILE)
    write_json(result.card, CARD_FILE)
    sample_grid(
        result.prepared.images("train"), result.prepared.labels("train"), result.card["class_names"], SAMPLES_FILE
    )
    log.info("prepared %s: %s", result.card["dataset"], result.card["images"])


if __name__ == "__main__":
    run(main)

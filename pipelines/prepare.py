"""prepare stage: the idx files (or your CSVs) parsed and checked (magic numbers, sizes, label range); a
seeded stratified validation split of the training images, the test images untouched; the image folders of
`data.extra` added to the training split, less a held-out share per folder; the uint8 arrays in one
byte-reproducible `.npz`, a dataset card (counts per class, pixel mean and std, sha256), a sample grid."""

import logging

from pipelines._stage import run
from serving.files import write_json
from training.config import CARD_FILE, DATASET_FILE, RAW_DIR, SAMPLES_FILE, Params
from training.data import prepare_dataset
from training.folders import add_extra_folders
from training.plots import sample_grid

log = logging.getLogger("prepare")


def main() -> None:
    settings = Params.load().data
    result = add_extra_folders(prepare_dataset(settings, RAW_DIR), settings)
    result.prepared.save(DATASET_FILE)
    write_json(result.card, CARD_FILE)
    sample_grid(
        result.prepared.images("train"), result.prepared.labels("train"), result.card["class_names"], SAMPLES_FILE
    )
    log.info("prepared %s: %s", result.card["dataset"], result.card["images"])


if __name__ == "__main__":
    run(main)

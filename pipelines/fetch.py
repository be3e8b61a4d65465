"""fetch stage: the four official `.gz` files of `data.dataset` into data/raw, and the test images of
`data.contrast` (the other dataset, by default) into data/contrast: the mirror first (`DATASET_MIRROR` or
`data.mirror`), then the official URLs; each checked against its sha256 in `training/datasets.py`, written
atomically, with retries; a file already verified is not fetched again. A dataset of your own image folders
fetches nothing."""

import os
import shutil
import sys
from pathlib import Path

from pipelines._stage import run
from training.config import CONTRAST_DIR, RAW_DIR, Params
from training.datasets import TEST_IMAGES
from training.fetch import MIRROR_ENV, fetch_dataset


def empty_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def main() -> None:
    data = Params.load().data
    mirror = os.environ.get(MIRROR_ENV) or data.mirror or None
    if data.from_folders:
        empty_folder(RAW_DIR)
    else:
        fetch_dataset(data.spec, RAW_DIR, mirror=mirror, progress=sys.stderr.isatty())
    if data.contrast_spec is None:
        empty_folder(CONTRAST_DIR)
    else:
        fetch_dataset(
            data.contrast_spec, CONTRAST_DIR, mirror=mirror, progress=sys.stderr.isatty(), files=(TEST_IMAGES,)
        )


if __name__ == "__main__":
    run(main)

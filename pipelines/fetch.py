"""fetch stage: the four official `.gz` files of `data.dataset` into data/raw: the mirror first
(`DATASET_MIRROR` or `data.mirror`), then the official URLs; each checked against its sha256 in
`training/datasets.py`, written atomically, with retries; a file already verified is not fetched again."""

import os
import sys

from pipelines._stage import run
from training.config import RAW_DIR, Params
from training.fetch import MIRROR_ENV, fetch_dataset


def main() -> None:
    data = Params.load().data
    mirror = os.environ.get(MIRROR_ENV) or data.mirror or None
    fetch_dataset(data.spec, RAW_DIR, mirror=mirror, progress=sys.stderr.isatty())


if __name__ == "__main__":
    run(main)

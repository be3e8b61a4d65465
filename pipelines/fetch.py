"""fetch stage: the four official files of `data.dataset` into data/raw, verified."""

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

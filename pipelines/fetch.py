"""fetch stage: the four official files of `data.dataset` into data/raw, verified."""
import os
import sys

from pipelines._stage import run
from training.config import RAW_DIR, dataset_spec, load_params
from training.fetch import MIRROR_ENV, fetch_dataset


def main() -> None:
    params = load_params()
    mirror = os.environ.get(MIRROR_ENV) or params["data"].get("mirror") or None
    fetch_dataset(dataset_spec(params), RAW_DIR, mirror=mirror, progress=sys.stderr.isatty())


if __name__ == "__main__":
    run(main)

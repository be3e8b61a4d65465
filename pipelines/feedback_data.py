"""`make feedback-data`: the labelled predictions of the prediction log as an image folder a person can browse,
`data/extra/feedback/<class name>/<sha256 of the model input>.png` (the 28x28 input the model saw; a `/` in a
class name is a `_` in its folder name), one file per digest. Where one digest got different labels, the
latest wins (counted). feedback.json beside the folder records what was written, so that a later run adds
only new labels: a file a person deleted, or moved to another class folder to relabel it, stays so until a
newer label for it arrives. `make feedback-data` then `dvc add`s the folder; `data.extra:
[data/extra/feedback]` trains on it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from common.files import read_json, write_json
from common.log_queries import LOG_DIR_HELP, Location, default_location, location, read_labels, read_predictions
from pipelines._stage import run
from training.config import FEEDBACK_DIR
from training.datasets import IMAGE_SHAPE
from training.folders import folder_name

log = logging.getLogger("feedback-data")
MANIFEST = FEEDBACK_DIR.with_suffix(".json")  # digest -> the class and feedback time it was written for


def labelled_inputs(log_dir: Location) -> tuple[dict[str, tuple[float, str, bytes]], dict[str, int]]:
    """{input sha256: (feedback time, class name, model input)}, the latest label per digest (named as the model
    that served it names its classes), and the counts of labels, of digests that got more than one label, and of
    labelled predictions logged without their input."""
    labels = read_labels(log_dir)
    wanted = {prediction_id for _, prediction_id, _ in labels}
    columns = ("id", "input_sha256", "class_names", "model_input")
    found = {r["id"]: r for r in read_predictions(log_dir, columns=columns, ids=sorted(wanted))}
    latest: dict[str, tuple[float, str, bytes]] = {}
    seen: dict[str, set[str]] = {}
    without_input = 0
    for time, prediction_id, label in labels:  # oldest first: a later label replaces an earlier one
        record = found.get(prediction_id)
        if record is None or record["model_input"] is None:
            without_input += record is not None
            continue
        digest, class_name = record["input_sha256"], record["class_names"][label]
        latest[digest] = (time, class_name, record["model_input"])
        seen.setdefault(digest, set()).add(class_name)
    counts = {
        "labels": len(labels),
        "conflicting": sum(len(s) > 1 for s in seen.values()),
        "without_input": without_input,
        "not_in_log": len(wanted - set(found)),
    }
    return latest, counts


def write_folder(latest: dict[str, tuple[float, str, bytes]], folder: Path) -> dict[str, int]:
    """Write what is new since the manifest; return how many files were added, relabelled and left alone."""
    manifest = read_json(MANIFEST) if MANIFEST.exists() else {}
    counts = {"added": 0, "relabelled": 0, "unchanged": 0}
    for digest, (time, class_name, pixels) in sorted(latest.items()):
        if digest in manifest and manifest[digest]["time"] >= time:
            counts["unchanged"] += 1  # what a person did with it since stands
            continue
        for old in folder.glob(f"*/{digest}.png"):
            old.unlink()
        counts["relabelled" if digest in manifest else "added"] += 1
        path = folder / folder_name(class_name) / f"{digest}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = np.frombuffer(pixels, np.uint8).reshape(IMAGE_SHAPE[1:])
        Image.fromarray(image, "L").save(path)
        manifest[digest] = {"class_name": class_name, "time": time}
    write_json(manifest, MANIFEST)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=location, help=LOG_DIR_HELP)
    args = parser.parse_args()
    log_dir = args.log_dir or default_location()
    latest, counts = labelled_inputs(log_dir)
    written = write_folder(latest, FEEDBACK_DIR)
    log.info(
        "%s: %d labels in %s for %d distinct inputs: %d added, %d relabelled, %d unchanged; %d inputs got "
        "conflicting labels (the latest won), %d labelled predictions were logged without their input, %d are "
        "no longer in the log",
        FEEDBACK_DIR,
        counts["labels"],
        log_dir,
        len(latest),
        written["added"],
        written["relabelled"],
        written["unchanged"],
        counts["conflicting"],
        counts["without_input"],
        counts["not_in_log"],
    )


if __name__ == "__main__":
    run(main)

"""The limit that bulk requests are set against, run in its own process as each load run is: benchmarks/loadgen.py's
bulk bodies (JSON, `--batch` images each) through the service's own parsing and a session on the model file
with an intra-op thread per CPU, one body after another, until a request count or a time limit is reached;
prints one JSON line with loadgen's keys. Taken in turn with the servers' bulk runs, so that each ratio sets
two runs of the same moment side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.loadgen import requests_for, summary
from common.runtime import OnnxClassifier
from serving.inputs import parse_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the model file the service serves")
    parser.add_argument("--images", type=Path, required=True, help=".npy file of uint8 images [N,28,28]")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    path, _, bodies = requests_for("bulk", np.load(args.images), args.batch)
    model = OnnxClassifier(str(args.model), device="cpu", threads=os.cpu_count())
    shape = model.image_shape
    model.outputs(parse_batch(bodies[0], args.batch, shape))  # first-call costs, as the servers' warm-up pays them
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + args.duration
    while len(latencies) < args.requests and time.perf_counter() < deadline:
        start = time.perf_counter()
        model.outputs(parse_batch(bodies[len(latencies) % len(bodies)], args.batch, shape))
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - started
    result = summary(f"{path} (in-process)", 1, latencies, elapsed, {})
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()

"""Where a worker's CPU time goes (`make bench-profile`): py-spy samples one worker of `bentoml serve` (the
`make serve` configuration) while benchmarks/loadgen.py sends PNG uploads at 64 and 256 clients; every sampled
stack is put in the layer of its innermost frame that belongs to one (LAYERS). A layer's share of the samples
times the worker's CPU time over the same seconds (the kernel's count: py-spy also samples threads that are
ready to run but wait for a CPU) gives its CPU microseconds per request (the worker's share of the requests
answered meanwhile). Writes a flame graph per
load (docs/profile/, named after the results file) and benchmarks/results/profile.json; prints the table.

py-spy is installed by the benchmark into its own environment under .bench/, as the peer frameworks are.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from benchmarks import frameworks
from benchmarks.local_server import REPO, LocalServer, benchmarked_service
from benchmarks.publish import publish, served_model
from benchmarks.serving import loadgen, loadgen_command, payload_images

FLAME_GRAPHS = REPO / "docs" / "profile"
RATE = 200  # samples per second and thread
# layer: patterns of a frame's file, the innermost frame that matches one naming the layer of a sample
LAYERS = {
    "onnxruntime": ["/onnxruntime/"],
    "decoding": ["/PIL/", "/pyspng/", "common/preprocess.py"],
    "multipart parsing": ["multipart", "formparsers.py"],
    "JSON and validation": ["/json/", "orjson", "/pydantic", "serving/inputs.py"],
    "metrics": ["prometheus_client", "serving/metrics.py"],
    "prediction log": ["serving/prediction_log.py", "common/log_records.py", "serving/log_uploads.py", "/pyarrow/"],
    "batching": ["serving/batcher.py"],
    "shadow and registry": ["serving/shadow.py", "serving/follow.py"],
    "HTTP parsing": ["/h11/", "httptools", "uvicorn/protocols"],
    "routing and middleware": ["/starlette/", "/bentoml/", "/_bentoml_impl/", "/_bentoml_sdk/", "/fastapi/"],
    "our request handling": ["serving/", "common/"],
    "event loop": ["asyncio", "uvloop", "selectors.py", "/anyio/"],
}
FRAME = re.compile(r"\((?P<file>[^:()]+)(?::\d+)?\)$")


def layer_of(stack: list[str]) -> str:
    """The layer of a stack (outermost frame first) given by its innermost frame that matches one."""
    for frame in reversed(stack):
        match = FRAME.search(frame)
        file = match["file"] if match else frame
        for layer, patterns in LAYERS.items():
            if any(pattern in file for pattern in patterns):
                return layer
    return "other"


def read_raw(path: Path) -> Counter:
    """py-spy's raw (collapsed) output, `frame;frame;... count` per line, summed per layer."""
    layers: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        layers[layer_of(stack.split(";")[1:])] += int(count)  # the first entry names the process or thread
    return layers


def workers(server: LocalServer) -> list[psutil.Process]:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [p for p in children if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def profile(
    server: LocalServer, py_spy: Path, payloads: Path, clients: int, seconds: float, folder: Path, name: str
) -> dict:
    """One load level: the layers' CPU µs per request on one worker, and its flame graph."""
    serving = workers(server)
    worker, share = serving[0], 1 / len(serving)
    command = loadgen_command(server.url, "png", payloads, clients, 10**9, 2 * seconds + 6)
    load = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    raw, svg = folder / f"{clients}.txt", FLAME_GRAPHS / f"{name}-{clients}-clients.svg"
    record = [str(py_spy), "record", "--pid", str(worker.pid), "--rate", str(RATE), "--duration", str(int(seconds))]
    time.sleep(3)  # the load at its level
    before = worker.cpu_times()
    subprocess.run([*record, "--nonblocking", "--full-filenames", "--format", "raw", "--output", str(raw)], check=True)
    after = worker.cpu_times()
    subprocess.run([*record, "--nonblocking", "--format", "flamegraph", "--output", str(svg)], check=True)
    out, _ = load.communicate()
    answered = json.loads(out.strip().splitlines()[-1])
    requests = answered["requests_per_s"] * seconds * share
    cpu_seconds = after.user + after.system - before.user - before.system
    layers = read_raw(raw)
    samples = sum(layers.values())
    per_request = {layer: 1e6 * cpu_seconds * n / samples / requests for layer, n in layers.most_common()}
    return {
        "clients": clients,
        "requests_per_s": answered["requests_per_s"],
        "errors": sum(answered["errors"].values()),
        "worker_requests": requests,
        "samples": samples,
        "cpu_seconds": cpu_seconds,
        "cpu_us_per_request": per_request,
        "flame_graph": str(svg.relative_to(REPO)),
    }


def table(results: dict) -> str:
    levels = results["levels"]
    layers = sorted({layer for level in levels for layer in level["cpu_us_per_request"]},
                    key=lambda layer: -levels[0]["cpu_us_per_request"].get(layer, 0))  # fmt: skip
    lines = [
        f"One worker of {results['workers']}, PNG uploads, py-spy at {RATE} samples/s for "
        f"{results['seconds']:.0f} s per level: CPU µs per request by layer.",
        "",
        "| layer | " + " | ".join(f"{level['clients']} clients" for level in levels) + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for layer in layers:
        cells = []
        for level in levels:
            us, total = level["cpu_us_per_request"].get(layer, 0), sum(level["cpu_us_per_request"].values())
            cells.append(f"{us:.0f} ({us / total:.0%})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    totals = " | ".join(f"**{sum(level['cpu_us_per_request'].values()):.0f}**" for level in levels)
    lines.append(f"| all | {totals} |")
    rates = " | ".join(f"{level['requests_per_s']:.0f}" for level in levels)
    lines.append(f"| requests/s (both workers) | {rates} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=20.0, help="sampling time per level")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "profile.json")
    args = parser.parse_args()
    py_spy = frameworks.environment("py-spy") / "bin" / "py-spy"
    FLAME_GRAPHS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "images.npy", payload_images())
        with benchmarked_service(folder / "server.log") as server:
            # warm-up, not reported: the first requests, and the imports of the threads the workers start
            loadgen(server.url, "png", folder / "images.npy", 16, 10**9, 20)
            levels = [
                profile(server, py_spy, folder / "images.npy", c, args.seconds, folder, args.output.stem)
                for c in args.clients
            ]
            results = {"workers": len(workers(server)), "seconds": args.seconds, "levels": levels}
            publish(results, table(results), args.output, served_model(server.url))


if __name__ == "__main__":
    main()

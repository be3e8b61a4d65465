"""Serving settings sweep (`make bench-sweep`): how workers, onnxruntime threads and the batch cap shape our
service's throughput and tail latency on the exported champion, PNG uploads from 64 clients.

Starts from the service's defaults and varies one setting at a time (the environment variables of
serving.settings), each point the median of several runs of benchmarks/loadgen.py against a fresh
`bentoml serve`. Prints a table and writes JSON (benchmarks/results/serving_sweep.json); the defaults in
serving/settings.py are the best row of this table on the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.local_server import REPO, benchmarked_service
from benchmarks.publish import publish, served_model
from benchmarks.serving import loadgen, median_of, payload_images
from serving.settings import ServingSettings
from training.progress import progress

PROCESSES = ((1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (4, 1))  # (workers, intra-op threads per worker)
BATCH_CAPS = (16, 32, 64, 128)


def defaults() -> dict[str, int]:
    settings = ServingSettings.from_env()
    return {
        "SERVING_WORKERS": settings.workers,
        "SERVING_THREADS": settings.threads,
        "SERVING_MAX_BATCH_SIZE": settings.max_batch_size,
    }


def configurations() -> list[dict[str, int]]:
    """The defaults first, then other splits of the CPUs into workers and threads, then other batch caps."""
    base = defaults()
    splits = [
        {**base, "SERVING_WORKERS": w, "SERVING_THREADS": t}
        for w, t in PROCESSES
        if (w, t) != (base["SERVING_WORKERS"], base["SERVING_THREADS"])
    ]
    caps = [{**base, "SERVING_MAX_BATCH_SIZE": b} for b in BATCH_CAPS if b != base["SERVING_MAX_BATCH_SIZE"]]
    return [base, *splits, *caps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "serving_sweep.json")
    args = parser.parse_args()
    images = payload_images()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        payloads = Path(tmp) / "images.npy"
        np.save(payloads, images)
        for config in progress(configurations(), desc="settings", unit="server"):
            env = {name: str(value) for name, value in config.items()}
            server = benchmarked_service(Path(tmp) / "server.log", **env)
            try:
                served = served_model(server.url)
                loadgen(server.url, "png", payloads, 16, 500, 5)  # warm-up, not reported
                runs = [
                    loadgen(server.url, "png", payloads, args.concurrency, 10**9, args.duration)
                    for _ in range(args.repeats)
                ]
            finally:
                server.close()
            rows.append({"settings": config, **median_of(runs)})
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "onnxruntime": ort.__version__},
        "request": "png",
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "defaults": defaults(),
        "rows": rows,
    }
    publish(results, table(results), args.output, served)


def table(results: dict) -> str:
    lines = [
        f"PNG uploads, {results['concurrency']} clients, medians of {results['repeats']} runs; "
        f"{results['machine']['cpus']} CPUs.",
        "",
        "| workers | threads | max batch | requests/s | p50 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        s = row["settings"]
        mark = " (defaults)" if s == results["defaults"] else ""
        lines.append(
            f"| {s['SERVING_WORKERS']} | {s['SERVING_THREADS']} | {s['SERVING_MAX_BATCH_SIZE']}{mark} | "
            f"{row['requests_per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

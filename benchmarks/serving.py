"""Serving benchmark (`make bench`): the champion behind `bentoml serve`, loaded from a separate process.

/predict (one PNG per request) at 1, 16 and 64 concurrent clients, and /predict_batch with 256 images
per request against raw in-process onnxruntime on the same model and batch size. Each point is the
median of several bounded runs. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import requests
from PIL import Image

from serving.local_server import REPO, LocalServer

EXPORT = REPO / "export" / "model.onnx"
DATASET = REPO / "data" / "prepared" / "dataset.npz"


def write_payloads(folder: Path, images: np.ndarray) -> tuple[Path, Path]:
    pngs = {}
    for i, image in enumerate(images[:200]):
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="PNG")
        pngs[f"p{i:03d}"] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    np.savez(folder / "png.npz", **pngs)
    np.savez(folder / "batch.npz", images=images[:, 0])
    return folder / "png.npz", folder / "batch.npz"


def loadgen(url: str, endpoint: str, payloads: Path, concurrency: int, count: int, duration: float) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--endpoint", endpoint, "--payloads",
         str(payloads), "--concurrency", str(concurrency), "--requests", str(count), "--duration",
         str(duration)], cwd=REPO, capture_output=True, text=True, check=True, timeout=duration + 180)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p99_ms")
    result = {k: statistics.median(r[k] for r in runs) for k in keys}
    result["requests"] = sum(r["requests"] for r in runs)
    result["non_2xx"] = sum(sum(r["non_2xx"].values()) for r in runs)
    result["runs"] = runs
    return result


def raw_onnxruntime(images: np.ndarray, batch: int, repeats: int) -> dict:
    """The same model in-process: JSON decode + validation-equivalent conversion + one session.run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(EXPORT), options, providers=["CPUExecutionProvider"])
    body = json.dumps({"images": images[:batch, 0].tolist()})
    timings, run_only = [], []
    session.run(["probabilities"], {"images": images[:batch]})
    for _ in range(repeats):
        start = time.perf_counter()
        array = np.asarray(json.loads(body)["images"], dtype=np.float64).astype(np.uint8)[:, None]
        middle = time.perf_counter()
        session.run(["probabilities"], {"images": array})
        end = time.perf_counter()
        timings.append(end - start)
        run_only.append(end - middle)
    return {"images_per_s": batch / statistics.median(timings),
            "images_per_s_session_run_only": batch / statistics.median(run_only)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="bound per run")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run at most")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    args = parser.parse_args()
    if not EXPORT.is_file() or not DATASET.is_file():
        sys.exit("run `make run` first: the benchmark serves the exported champion")
    with np.load(DATASET) as data:
        images = data["x_test"][:1024]

    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "onnxruntime": ort.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        png_payloads, batch_payloads = write_payloads(Path(tmp), images)
        server = LocalServer("serving.service:Classifier", Path(tmp) / "serve.log").wait_ready()
        try:
            loadgen(server.url, "predict", png_payloads, 16, 500, 10)  # warm-up, not reported
            results["provider"] = requests.get(f"{server.url}/model", timeout=10).json()[
                "execution_provider"]
            results["predict"] = {}
            for concurrency in (1, 16, 64):
                runs = [loadgen(server.url, "predict", png_payloads, concurrency, args.requests, args.duration)
                        for _ in range(args.repeats)]
                results["predict"][concurrency] = median_of(runs)
                print(f"/predict c={concurrency}: {results['predict'][concurrency]['requests_per_s']:.0f} req/s",
                      file=sys.stderr)
            runs = [loadgen(server.url, "predict_batch", batch_payloads, 1, 40, args.duration)
                    for _ in range(args.repeats)]
            batch = median_of(runs)
            batch["images_per_s"] = batch["requests_per_s"] * 256
            results["predict_batch_256"] = batch
        finally:
            server.close()
    results["raw_onnxruntime_256"] = raw_onnxruntime(images, 256, repeats=30)
    ratio = results["predict_batch_256"]["images_per_s"] / results["raw_onnxruntime_256"]["images_per_s"]
    results["predict_batch_vs_raw"] = ratio

    lines = [f"serving benchmark ({results['provider']}, {os.cpu_count()} CPUs; medians of {args.repeats} runs)",
             "| load | requests/s | p50 ms | p99 ms | requests | non-2xx |", "|---|---:|---:|---:|---:|---:|"]
    for concurrency, r in results["predict"].items():
        lines.append(f"| /predict, {concurrency} clients | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['requests']} | {r['non_2xx']} |")
    b = results["predict_batch_256"]
    lines.append(f"| /predict_batch x256, 1 client | {b['requests_per_s']:.1f} | {b['p50_ms']:.1f} | "
                 f"{b['p99_ms']:.1f} | {b['requests']} | {b['non_2xx']} |")
    raw = results["raw_onnxruntime_256"]
    lines.append("")
    lines.append(f"/predict_batch: {b['images_per_s']:.0f} images/s; raw in-process onnxruntime at batch 256: "
                 f"{raw['images_per_s']:.0f} images/s with JSON decoding, {raw['images_per_s_session_run_only']:.0f} "
                 f"session.run only; ratio {ratio:.2f}")
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

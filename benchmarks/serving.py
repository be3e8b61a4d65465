"""Serving benchmark (`make bench`): our service against the obvious alternatives, side by side in one run.

Servers, all on the exported champion and the same payloads, loaded from a separate process
(benchmarks/loadgen.py, bounded by request count and duration):
- ours: `bentoml serve serving.service:Classifier`, the `make serve` configuration (int8 on the CPU);
- peer 1: FastAPI + uvicorn running onnxruntime once per request (benchmarks/peer.py), as many workers,
  on the fp32 file (what a user would write) and on the int8 file;
- peer 2: the same FastAPI app running the PyTorch model eagerly;
- the limit: raw in-process onnxruntime at the same batch sizes, payload decoding included, per precision.
Single images (PNG upload and JSON) at 1, 16, 64 and 256 clients, bulk requests of 256 images, then, for
our service only, 256 clients for 60 s, the workers' memory over 100,000 requests and the accuracy it
serves over HTTP on the 10,000 test images. Each point is the median of several runs. Prints tables and
writes JSON (benchmarks/results/serving.json).
"""

from __future__ import annotations

import argparse
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
import psutil
import requests

from benchmarks.loadgen import png_file
from benchmarks.local_server import REPO, ChildServer, LocalServer
from benchmarks.publish import publish, served_model
from serving.files import read_json
from serving.inputs import parse_batch
from serving.model_store import EXPORT_RECORD, read_metadata
from serving.preprocess import MAX_IMAGE_PIXELS, image_to_input
from serving.runtime import OnnxClassifier
from training.progress import progress

EXPORT = REPO / "export" / "model.onnx"
EXPORT_INT8 = REPO / "export" / "model.int8.onnx"
PEERS = {  # name: the environment of benchmarks/peer.py
    "peer1_onnx_fp32": {"PEER_BACKEND": "onnx", "PEER_MODEL": str(EXPORT)},
    "peer1_onnx_int8": {"PEER_BACKEND": "onnx", "PEER_MODEL": str(EXPORT_INT8)},
    "peer2_torch": {"PEER_BACKEND": "torch"},
}
ONNX_PEERS = ("peer1_onnx_fp32", "peer1_onnx_int8")
DATASET = REPO / "data" / "prepared" / "dataset.npz"
WORKERS = int(os.environ.get("SERVING_WORKERS", str(os.cpu_count() or 1)))


def payload_images() -> np.ndarray:
    """The test images every request is made of, uint8 [2048, 28, 28]; exits when `make run` has not run."""
    if not EXPORT_INT8.is_file() or not DATASET.is_file():
        sys.exit("run `make run` first: the benchmark serves the exported champion")
    with np.load(DATASET) as data:
        return np.ascontiguousarray(data["x_test"][:2048, 0])


def start(name: str, folder: Path) -> ChildServer:
    log = folder / f"{name}.log"
    if name == "ours":
        return LocalServer("serving.service:Classifier", log).wait_ready()
    command = [
        str(Path(sys.executable).parent / "uvicorn"),
        "benchmarks.peer:app",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        str(WORKERS),
        "--log-level",
        "warning",
    ]
    return ChildServer(command, log, "/docs", **PEERS[name]).wait_ready()


def loadgen(url: str, kind: str, images: Path, concurrency: int, count: int, duration: float) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--url",
            url,
            "--kind",
            kind,
            "--images",
            str(images),
            "--concurrency",
            str(concurrency),
            "--requests",
            str(count),
            "--duration",
            str(duration),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 300,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    result = {k: statistics.median(r[k] for r in runs) for k in ("requests_per_s", "p50_ms", "p99_ms")}
    result["requests"] = sum(r["requests"] for r in runs)
    result["errors"] = sum(sum(r["errors"].values()) for r in runs)
    result["runs"] = runs
    return result


def server_rss(server: ChildServer) -> int:
    """Resident memory of the server and all its processes (BentoML's arbiter and workers)."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def raw_onnxruntime(path: Path, images: np.ndarray, repeats: int) -> dict:
    """The limit: the model in-process with the service's session options, decoding included: a PNG per
    image at batch 1, a JSON body at batch 256, both through the service's own decoding code."""
    model = OnnxClassifier(str(path), device="cpu", threads=os.cpu_count())
    pngs = [png_file(image) for image in images[:200]]
    body = json.dumps({"images": images[:256].tolist()}).encode()
    shape = (1, *images.shape[1:])
    fit = (model.image_shape[-1], int(model.metadata["upload_fit"]))
    model.warm_up(4)

    def per_second(work, count: int) -> float:
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            timings.append(time.perf_counter() - start)
        return count / statistics.median(timings)

    return {
        "precision": model.precision,
        "png_batch_1_images_per_s": per_second(
            lambda: [model.outputs(image_to_input(data, *fit, MAX_IMAGE_PIXELS)[None]) for data in pngs],
            len(pngs),
        ),
        "json_batch_256_images_per_s": per_second(lambda: model.outputs(parse_batch(body, 1024, shape)), 256),
        "session_run_batch_256_images_per_s": per_second(lambda: model.outputs(images[:256, None]), 256),
    }


def served_accuracy(url: str, images: np.ndarray, labels: np.ndarray) -> dict:
    """The accuracy the service serves over HTTP: every test image through /predict_batch, 1,000 at a time."""
    predicted = []
    for start in range(0, len(images), 1000):
        body = {"images": images[start : start + 1000].tolist()}
        response = requests.post(f"{url}/predict_batch", json=body, timeout=300)
        response.raise_for_status()
        predicted += [p["label"] for p in response.json()]
    return {"images": len(labels), "accuracy": float((np.array(predicted) == labels).mean())}


def table(results: dict) -> str:
    names = list(results["servers"])
    model = results["model"]
    lines = [
        f"Model: {model['name']} ({model['test_time_augmentation']}); ours serves {model['served_precision']} "
        f"on {model['execution_provider']}.",
        "",
        "| server | request | clients | requests/s | p50 ms | p99 ms | requests | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("png", "json"):
        for concurrency in results["concurrency"]:
            for name in names:
                r = results["servers"][name][kind][str(concurrency)]
                lines.append(
                    f"| {name} | {kind} | {concurrency} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
                    f"{r['p99_ms']:.1f} | {r['requests']} | {r['errors']} |"
                )
    if results.get("ratios"):
        lines += [
            "",
            "| requests/s, ours / peer | " + " | ".join(f"{c} clients" for c in results["concurrency"]) + " |",
            "|---|" + "---:|" * len(results["concurrency"]),
        ]
        for peer, by_kind in results["ratios"].items():
            for kind, ratios in by_kind.items():
                cells = " | ".join(f"{ratios[str(c)]:.2f}" for c in results["concurrency"])
                lines.append(f"| {peer}, {kind} | {cells} |")
    lines += ["", "| bulk: 256 images per request | images/s | p99 ms | errors |", "|---|---:|---:|---:|"]
    for name in names:
        b = results["servers"][name]["bulk"]
        lines.append(f"| {name}, 1 client | {b['images_per_s']:.0f} | {b['p99_ms']:.1f} | {b['errors']} |")
    for raw in results["raw_onnxruntime"].values():
        p = raw["precision"]
        lines.append(f"| raw onnxruntime {p}, JSON decoding included | {raw['json_batch_256_images_per_s']:.0f} | | |")
        lines.append(f"| raw onnxruntime {p}, session.run only | {raw['session_run_batch_256_images_per_s']:.0f} | | |")
        lines.append(
            f"| raw onnxruntime {p}, batch 1, PNG decoding included | {raw['png_batch_1_images_per_s']:.0f} | | |"
        )
    lines.append("")
    if "bulk_vs_raw" in results:
        lines.append(
            f"bulk, ours / raw onnxruntime {model['served_precision']} with JSON decoding: {results['bulk_vs_raw']:.2f}"
        )
    if "soak" in results:
        s = results["soak"]
        lines.append(
            f"soak, ours, {s['concurrency']} clients for {s['seconds']:.0f} s: {s['requests']} requests, "
            f"{s['requests_per_s']:.0f}/s, p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, errors "
            f"{s['errors'] or 'none'}"
        )
    if "memory" in results:
        m = results["memory"]
        lines.append(
            f"memory, ours: RSS {m['rss_before_mb']:.0f} MB -> {m['rss_after_mb']:.0f} MB over "
            f"{m['requests']} requests ({100 * m['growth']:+.1f}%), errors {m['errors'] or 'none'}"
        )
    if "served_accuracy" in results:
        a = results["served_accuracy"]
        lines.append(
            f"served accuracy over HTTP, {a['images']:,} test images: {a['accuracy']:.2%} "
            f"(fp32 model offline: {a['fp32_offline_accuracy']:.2%})"
        )
    return "\n".join(lines)


def measure(server: ChildServer, name: str, args: argparse.Namespace, payloads: Path, results: dict) -> dict | None:
    """Every load point on one server; for ours also the soak, the memory and the served accuracy, and the model
    it served (returned)."""
    loadgen(server.url, "png", payloads, 16, 500, 5)  # warm-up, not reported
    measured: dict = {"png": {}, "json": {}}
    plan = [(kind, c) for kind in ("png", "json") for c in args.concurrency]
    for kind, concurrency in progress(plan, desc=name, unit="load"):
        runs = [
            loadgen(server.url, kind, payloads, concurrency, args.requests, args.duration) for _ in range(args.repeats)
        ]
        measured[kind][str(concurrency)] = median_of(runs)
    bulk = median_of([loadgen(server.url, "bulk", payloads, 1, 40, args.duration) for _ in range(args.repeats)])
    bulk["images_per_s"] = bulk["requests_per_s"] * 256
    measured["bulk"] = bulk
    results["servers"][name] = measured
    if name != "ours":
        return None
    card = requests.get(f"{server.url}/model", timeout=10).json()
    results["model"].update(served_precision=card["precision"], execution_provider=card["execution_provider"])
    if args.soak_seconds:
        print(f"soak: 256 clients for {args.soak_seconds:.0f} s", file=sys.stderr)
        soak = loadgen(server.url, "png", payloads, 256, 10**9, args.soak_seconds)
        results["soak"] = {**soak, "errors": sum(soak["errors"].values())}
    if args.memory_requests:
        print(f"memory: {args.memory_requests} requests from 64 clients", file=sys.stderr)
        before = server_rss(server)
        runs = [loadgen(server.url, kind, payloads, 64, args.memory_requests // 2, 3600) for kind in ("png", "json")]
        after = server_rss(server)
        results["memory"] = {
            "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20,
            "growth": after / before - 1,
            "requests": sum(r["requests"] for r in runs),
            "errors": sum(sum(r["errors"].values()) for r in runs),
        }
    with np.load(DATASET) as data:
        results["served_accuracy"] = served_accuracy(server.url, data["x_test"][:, 0], data["y_test"])
    results["served_accuracy"]["fp32_offline_accuracy"] = read_json(EXPORT_RECORD)["int8_gate"]["fp32_test_accuracy"]
    return served_model(server.url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6000, help="bound per run")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run at most")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--servers", nargs="+", default=["ours", *PEERS], choices=["ours", *PEERS])
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="0 to skip")
    parser.add_argument("--memory-requests", type=int, default=100_000, help="0 to skip")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    args = parser.parse_args()
    images = payload_images()
    metadata = read_metadata(EXPORT)
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "workers": WORKERS,
            "onnxruntime": ort.__version__,
        },
        "model": {
            "name": metadata["model_name"],
            "test_time_augmentation": metadata["test_time_augmentation"],
            "served_precision": "not measured",
            "execution_provider": "not measured",
        },
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "servers": {},
    }
    served = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "images.npy", images)
        for name in args.servers:
            server = start(name, folder)
            try:
                served = measure(server, name, args, folder / "images.npy", results) or served
            finally:
                server.close()
    results["raw_onnxruntime"] = {
        precision: raw_onnxruntime(path, images, repeats=5)
        for precision, path in (("fp32", EXPORT), ("int8", EXPORT_INT8))
    }
    if "ours" in results["servers"]:
        ours = results["servers"]["ours"]
        raw = results["raw_onnxruntime"][results["model"]["served_precision"]]
        results["bulk_vs_raw"] = ours["bulk"]["images_per_s"] / raw["json_batch_256_images_per_s"]
        results["ratios"] = {
            peer: {
                kind: {
                    c: ours[kind][c]["requests_per_s"] / results["servers"][peer][kind][c]["requests_per_s"]
                    for c in ours[kind]
                }
                for kind in ("png", "json")
            }
            for peer in ONNX_PEERS
            if peer in results["servers"]
        }
    print(f"serving benchmark: {os.cpu_count()} CPUs, {WORKERS} workers per server, medians of {args.repeats} runs")
    publish(results, table(results), args.output, served)


if __name__ == "__main__":
    main()

"""Serving benchmark (`make bench`): our service against what people would run instead, side by side in one run.

Servers, all on the file the service serves (int8 on a CPU) and the same payloads, loaded from a separate
process (benchmarks/loadgen.py, bounded by request count and duration), all up at once and taken in turn,
the order rotating from one repeat to the next, so that the machine's drift falls on all alike:
- ours: `bentoml serve serving.service:Classifier`, the `make serve` configuration;
- the frameworks people pick (benchmarks/frameworks.py): TorchServe, and Triton behind a PNG-decoding front
  (plus Triton's own binary tensor route, same pixels);
- BentoML's own adaptive batching (`batchable=True`) on the same file (benchmarks/bentoml_batchable.py);
- the baseline users write: FastAPI + uvicorn running onnxruntime once per request (benchmarks/peer.py) on the
  fp32 file and on the int8 file, and the same app running the PyTorch model eagerly;
- the limit: raw in-process onnxruntime at the same batch sizes, per precision; for bulk requests, the served
  file parsing the same JSON bodies (benchmarks/raw_bulk.py), taken in turn with the servers' bulk runs.
Every server runs as many workers (or instances) as the service. Single images (PNG upload and JSON) at 1, 16,
64 and 256 clients, bulk requests of 256 images from 1 client and from one per worker, then, for our service
only, 256 clients for 60 s, the workers' memory over 100,000 requests and the accuracy it serves over HTTP on
the 10,000 test images. Each point is the median of several runs; each ratio the median of the runs' ratios.
Prints tables and writes JSON (benchmarks/results/serving.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import requests

from benchmarks import frameworks
from benchmarks.loadgen import png_file
from benchmarks.local_server import REPO, ChildServer, LocalServer, benchmarked_service
from benchmarks.publish import publish, served_model
from common.files import read_json
from common.model_store import EXPORT_RECORD, read_metadata
from common.preprocess import MAX_IMAGE_PIXELS, image_to_input
from common.runtime import OnnxClassifier
from serving.settings import threads_per_worker
from training.progress import progress

EXPORT = REPO / "export" / "model.onnx"
EXPORT_INT8 = REPO / "export" / "model.int8.onnx"
FASTAPI = {  # name: the environment of benchmarks/peer.py
    "fastapi_onnx_fp32": {"PEER_BACKEND": "onnx", "PEER_MODEL": str(EXPORT)},
    "fastapi_onnx_int8": {"PEER_BACKEND": "onnx", "PEER_MODEL": str(EXPORT_INT8)},
    "fastapi_torch": {"PEER_BACKEND": "torch"},
}
SERVERS = ("ours", "torchserve", "triton", "bentoml_batchable", *FASTAPI)
LIMIT = "raw_onnxruntime"  # the row of benchmarks/raw_bulk.py, which bulk requests are set against
COMPARED = ("torchserve", "triton", "triton_tensor", "bentoml_batchable", "fastapi_onnx_int8")  # ours / each
DATASET = REPO / "data" / "prepared" / "dataset.npz"
WORKERS = int(os.environ.get("SERVING_WORKERS", str(os.cpu_count() or 1)))
# bulk requests one at a time (what a lone client waits for: transfer, parsing and the model in turn), and one
# per worker (what the server gets through when it is kept busy: the throughput to set against raw onnxruntime's)
BULK_CLIENTS = sorted({1, WORKERS})
THREADS = int(os.environ.get("SERVING_THREADS", str(threads_per_worker({"workers": WORKERS}))))


def payload_images() -> np.ndarray:
    """The test images every request is made of, uint8 [2048, 28, 28]; exits when `make run` has not run."""
    if not EXPORT_INT8.is_file() or not DATASET.is_file():
        sys.exit("run `make run` first: the benchmark serves the exported champion")
    with np.load(DATASET) as data:
        return np.ascontiguousarray(data["x_test"][:2048, 0])


def start(name: str, folder: Path, served: Path) -> ChildServer:
    """Server `name`, ready, on the file `served` (the FastAPI peers on the file each names)."""
    log = folder / f"{name}.log"
    if name == "ours":
        return benchmarked_service(log)
    if name == "torchserve":
        return frameworks.torchserve(served, folder, WORKERS, THREADS)
    if name == "triton":
        return frameworks.Triton(served, folder, WORKERS, THREADS).wait_ready()
    if name == "bentoml_batchable":
        target = "benchmarks.bentoml_batchable:Batchable"
        return LocalServer(target, log, PEER_MODEL=str(served), PEER_THREADS=str(THREADS)).wait_ready()
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
    return ChildServer(command, log, "/docs", env=FASTAPI[name]).wait_ready()


def loadgen_command(
    url: str, kind: str, images: Path, concurrency: int, count: int, duration: float, path: str | None = None
) -> list[str]:
    """benchmarks/loadgen.py's command line: at most `count` requests, for at most `duration` seconds."""
    return [
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
        *(["--path", path] if path else []),
    ]


def loadgen(
    url: str, kind: str, images: Path, concurrency: int, count: int, duration: float, path: str | None = None
) -> dict:
    return json_line(loadgen_command(url, kind, images, concurrency, count, duration, path), duration + 300)


def json_line(command: list[str], timeout: float) -> dict:
    """The JSON line a run's process prints last."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, timeout=timeout)
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
    """The model in-process with the service's session options: a PNG per image at batch 1, through the service's
    own decoding code, and batches of 256 given as arrays (JSON bodies: benchmarks/raw_bulk.py)."""
    model = OnnxClassifier(str(path), device="cpu", threads=os.cpu_count())
    pngs = [png_file(image) for image in images[:200]]
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


@dataclass(frozen=True)
class Target:
    """A row of the tables: where its clients post each kind of request (loadgen's kind and path)."""

    name: str
    url: str
    requests: dict[str, tuple[str, str | None]]

    def run(self, kind: str, payloads: Path, concurrency: int, count: int, duration: float) -> dict:
        load, path = self.requests[kind]
        return loadgen(self.url, load, payloads, concurrency, count, duration, path)


@dataclass(frozen=True)
class RawBulk(Target):
    """The limit bulk requests are set against (benchmarks/raw_bulk.py), as a row taken in turn with the servers:
    one process, whatever the number of clients."""

    model: Path

    def run(self, kind: str, payloads: Path, concurrency: int, count: int, duration: float) -> dict:
        command = [sys.executable, "-m", "benchmarks.raw_bulk", "--model", str(self.model), "--images", str(payloads)]
        command += ["--requests", str(count), "--duration", str(duration)]
        return json_line(command, duration + 300)


def targets_of(name: str, server: ChildServer) -> list[Target]:
    kinds = {kind: (kind, server.routes.get(kind)) for kind in ("png", "json", "bulk")}
    targets = [Target(name, server.url, kinds)]
    if isinstance(server, frameworks.Triton):  # the same pixels as a tensor, to Triton itself
        targets.append(Target("triton_tensor", server.tensor_url, {"png": ("tensor", None)}))
    return targets


def interleaved(targets: list[Target], kind: str, concurrency: int, count: int, args, payloads: Path) -> dict:
    """Runs of one load point on every target that takes `kind`, in turn, the order rotating each repeat."""
    active = [t for t in targets if kind in t.requests]
    runs: dict[str, list[dict]] = {t.name: [] for t in active}
    for repeat in range(args.repeats):
        shift = repeat % len(active)
        for target in active[shift:] + active[:shift]:
            runs[target.name].append(target.run(kind, payloads, concurrency, count, args.duration))
    return runs


def warm_up(targets: list[Target], payloads: Path) -> None:
    """A few seconds of load on each target, not reported."""
    for target in targets:
        target.run("png", payloads, 16, 500, 5)


def paired_ratios(ours: list[dict], peer: list[dict]) -> dict:
    """Ours over a peer, per run of the same repeat (their turns adjacent), then the median."""
    return {
        key: statistics.median(o[key] / p[key] for o, p in zip(ours, peer, strict=True))
        for key in ("requests_per_s", "p99_ms")
    }


def measure_points(targets: list[Target], limit: RawBulk, args, payloads: Path, results: dict) -> None:
    """Every load point on every target, bulk requests on the limit too, and ours over each compared peer and
    over the limit."""
    measured: dict = {t.name: {"png": {}, "json": {}} for t in [*targets, limit]}
    ratios: dict = {}
    plan = [(kind, c) for kind in ("png", "json") for c in args.concurrency]
    for kind, concurrency in progress(plan, desc="load points", unit="point"):
        runs = interleaved(targets, kind, concurrency, args.requests, args, payloads)
        for name, name_runs in runs.items():
            measured[name][kind][str(concurrency)] = median_of(name_runs)
            if name in COMPARED and "ours" in runs:
                by_kind = ratios.setdefault(name, {}).setdefault(kind, {})
                by_kind[str(concurrency)] = paired_ratios(runs["ours"], name_runs)
    for clients in BULK_CLIENTS:
        runs = interleaved([*targets, limit], "bulk", clients, 200, args, payloads)
        for name, name_runs in runs.items():
            bulk = median_of(name_runs)
            bulk["images_per_s"] = bulk["requests_per_s"] * 256
            measured[name].setdefault("bulk", {})[str(clients)] = bulk
        if "ours" in runs:
            bulk_vs_raw = paired_ratios(runs["ours"], runs[limit.name])["requests_per_s"]
            results.setdefault("bulk_vs_raw", {})[str(clients)] = bulk_vs_raw
    results["servers"], results["ratios"] = measured, ratios


def measure_ours(server: ChildServer, args, payloads: Path, results: dict) -> dict:
    """Ours alone: the soak, the memory, the accuracy served over HTTP, and the model it served (returned)."""
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
    offline = read_json(EXPORT_RECORD)["int8_gate"]
    precision = results["model"]["served_precision"]
    results["served_accuracy"]["offline_accuracy"] = offline[f"{precision}_test_accuracy"]
    return served_model(server.url)


LEGEND = {
    "ours": "this service (`make serve`)",
    "torchserve": "TorchServe 0.12 (Java frontend, Python workers; benchmarks/torchserve/)",
    "triton": "Triton (python backend running onnxruntime) behind an aiohttp front that decodes uploads "
    "(benchmarks/triton/)",
    "triton_tensor": "Triton itself, the same pixels as a binary tensor",
    "bentoml_batchable": "BentoML's own batching: an API service awaiting a `batchable=True` model service "
    "(benchmarks/bentoml_batchable.py)",
    "fastapi_onnx_fp32": "FastAPI + onnxruntime once per request, fp32 file (benchmarks/peer.py)",
    "fastapi_onnx_int8": "FastAPI + onnxruntime once per request, int8 file",
    "fastapi_torch": "FastAPI + the PyTorch model, eager",
    LIMIT: "the limit for bulk requests: the served file in-process, a thread per CPU, JSON parsed by "
    "the service's code, one request after another (benchmarks/raw_bulk.py); taken in turn with the servers",
}


def clients_named(clients: str) -> str:
    return f"{clients} client{'' if clients == '1' else 's'}"


def table(results: dict) -> str:
    servers, model, concurrency = results["servers"], results["model"], results["concurrency"]
    lines = [
        f"Model: {model['name']}, test-time views: {model['test_time_augmentation']}; served as "
        f"{model['served_precision']} on {model['execution_provider']}; "
        f"{results['machine']['workers']} workers (or instances) per server, "
        f"{results['machine']['threads']} onnxruntime thread(s) each; medians of {results['repeats']} runs.",
        "",
        "| server | what it is |",
        "|---|---|",
        *(f"| {name} | {LEGEND[name]} |" for name in servers),
    ]
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name} | not measured: {reason} |")
    lines += [
        "",
        "| server | request | clients | requests/s | p50 ms | p99 ms | requests | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("png", "json"):
        for c in concurrency:
            for name, measured in servers.items():
                if str(c) in measured[kind]:
                    r = measured[kind][str(c)]
                    request = "tensor" if name == "triton_tensor" else kind
                    lines.append(
                        f"| {name} | {request} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
                        f"{r['p99_ms']:.1f} | {r['requests']} | {r['errors']} |"
                    )
    if results["ratios"]:
        lines += [
            "",
            "| ours / peer: requests/s (p99) | " + " | ".join(f"{c} clients" for c in concurrency) + " |",
            "|---|" + "---:|" * len(concurrency),
        ]
        for peer, by_kind in results["ratios"].items():
            for kind, ratios in by_kind.items():
                cells = " | ".join(
                    f"{ratios[str(c)]['requests_per_s']:.2f} ({ratios[str(c)]['p99_ms']:.2f})" for c in concurrency
                )
                lines.append(f"| {peer}, {kind} | {cells} |")
    lines += ["", "| bulk: 256 images per request | images/s | p99 ms | errors |", "|---|---:|---:|---:|"]
    for name, measured in servers.items():
        for clients, b in measured.get("bulk", {}).items():
            turn = "in turn with the runs at " if name == LIMIT else ""
            who = f"{name}, {turn}{clients_named(clients)}"
            lines.append(f"| {who} | {b['images_per_s']:.0f} | {b['p99_ms']:.1f} | {b['errors']} |")
    for raw in results["raw_onnxruntime"].values():
        p = raw["precision"]
        lines.append(f"| raw onnxruntime {p}, session.run only | {raw['session_run_batch_256_images_per_s']:.0f} | | |")
        lines.append(
            f"| raw onnxruntime {p}, batch 1, PNG decoding included | {raw['png_batch_1_images_per_s']:.0f} | | |"
        )
    lines.append("")
    if "bulk_vs_raw" in results:
        ratios = ", ".join(
            f"{ratio:.2f} at {clients_named(clients)}" for clients, ratio in results["bulk_vs_raw"].items()
        )
        precision = model["served_precision"]
        lines.append(f"bulk, ours / raw onnxruntime {precision} with JSON decoding, runs paired: {ratios}")
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
            f"({model['served_precision']} file offline: {a['offline_accuracy']:.2%})"
        )
    return "\n".join(lines)


def skipped(name: str) -> str | None:
    """Why server `name` cannot run here, if it cannot."""
    return frameworks.missing_java() if name == "torchserve" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6000, help="bound per run")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run at most")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
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
            "threads": THREADS,
            "onnxruntime": ort.__version__,
        },
        "model": {"name": metadata["model_name"], "test_time_augmentation": metadata["test_time_augmentation"]},
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "skipped": {name: reason for name in args.servers if (reason := skipped(name))},
    }
    served = None
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        np.save(folder / "images.npy", images)
        ours = stack.enter_context(start("ours", folder, EXPORT_INT8))
        card = requests.get(f"{ours.url}/model", timeout=10).json()
        results["model"].update(served_precision=card["precision"], execution_provider=card["execution_provider"])
        served_file = EXPORT_INT8 if card["precision"] == "int8" else EXPORT
        targets = targets_of("ours", ours) if "ours" in args.servers else []
        with contextlib.ExitStack() as peers:
            for name in progress(
                [n for n in args.servers if n != "ours" and n not in results["skipped"]], desc="starting", unit="server"
            ):
                targets += targets_of(name, peers.enter_context(start(name, folder, served_file)))
            warm_up(targets, folder / "images.npy")
            limit = RawBulk(LIMIT, "", {"bulk": ("bulk", None)}, served_file)
            measure_points(targets, limit, args, folder / "images.npy", results)
        if "ours" in args.servers:
            served = measure_ours(ours, args, folder / "images.npy", results)
    results["raw_onnxruntime"] = {
        precision: raw_onnxruntime(path, images, repeats=5)
        for precision, path in (("fp32", EXPORT), ("int8", EXPORT_INT8))
    }
    print(f"serving benchmark: {os.cpu_count()} CPUs, {WORKERS} workers per server, medians of {args.repeats} runs")
    publish(results, table(results), args.output, served)


if __name__ == "__main__":
    main()

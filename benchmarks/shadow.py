"""What shadowing a challenger costs the champion (`make bench` runs it): the served champion following a
registry of its own (a temp MLflow store where the champion's files are version 1, `champion`, and again
version 2, `challenger`: a challenger as costly as the champion), with shadowing off and on at 100% of
requests, servers started in turn (off, on, on, off, ...); PNG uploads from 1 and 16 clients; the champion's
latency and throughput each way, and the share of answered requests the challenger answered too (it runs at
the lowest CPU priority, so under a load that keeps every CPU busy it shadows what idle time allows). Prints a
table and writes benchmarks/results/shadow.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bentoml
import mlflow
import numpy as np
import requests

from benchmarks.local_server import REPO, benchmarked_service
from benchmarks.prediction_log import answered
from benchmarks.publish import publish, served_model
from benchmarks.serving import loadgen, median_of, payload_images
from common.log_layout import CHALLENGER
from common.log_queries import count_predictions
from common.model_store import STORED_FILES, served_record
from training import registry

MODES = ("off", "on")


def registry_of_two(uri: str) -> tuple[str, str]:
    """The champion's files as versions 1 (champion) and 2 (challenger) of a registry at `uri`; returns the
    registered name and the champion's BentoML tag."""
    champion = served_record()
    stored = bentoml.models.get(champion["bentoml_tag"])
    files = {role: Path(stored.path_of(file)) for role, (file, _) in STORED_FILES.items()}
    name = champion["registered_model"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("shadow-benchmark")
    example = np.zeros((16, 1, 28, 28), np.uint8)
    tags = {"bentoml_tag": str(stored.tag), **registry.checksums(files)}
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        version = registry.register_files(name, files, example, tags)
        mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version.version))
    return name, str(stored.tag)


def shadow_ready(url: str, timeout: float = 120) -> None:
    """Wait until every worker's shadow process runs the challenger."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = requests.get(f"{url}/metrics", timeout=10).text
        if any(line.startswith("serving_model_info{") and 'role="challenger"' in line for line in text.splitlines()):
            return
        time.sleep(1)
    raise RuntimeError(f"no challenger shadowed after {timeout} s")


def settled(log_dir: Path) -> int:
    """The challenger's records in the log once it has caught up (no new one for 2 s)."""
    count = -1
    while (found := count_predictions(log_dir, role=CHALLENGER)[0]) != count:
        count = found
        time.sleep(2)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "shadow.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        payloads = folder / "images.npy"
        np.save(payloads, payload_images())
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        name, tag = registry_of_two(uri)
        runs: dict[str, dict[str, list[dict]]] = {mode: {str(c): [] for c in args.concurrency} for mode in MODES}
        shadowed: dict[str, list[float]] = {str(c): [] for c in args.concurrency}
        measured: dict = {}
        for repeat in range(args.repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                log_dir = folder / f"log-{mode}-{repeat}"
                server = benchmarked_service(
                    folder / f"{mode}-{repeat}.log",
                    BENTO_MODEL_TAG=tag,
                    SERVING_FOLLOW_REGISTRY="true",
                    SERVING_REGISTERED_MODEL=name,
                    MLFLOW_TRACKING_URI=uri,
                    SERVING_SHADOW_SHARE="100" if mode == "on" else "0",
                    SERVING_PREDICTION_LOG_DIR=str(log_dir),
                )
                try:
                    if mode == "on":
                        shadow_ready(server.url)
                        measured = served_model(server.url)
                    loadgen(server.url, "png", payloads, 16, 500, 5)  # warm-up, not reported
                    for concurrency in args.concurrency:
                        before = settled(log_dir)
                        run = loadgen(server.url, "png", payloads, concurrency, 10**9, args.duration)
                        runs[mode][str(concurrency)].append(run)
                        if mode == "on":
                            shadowed[str(concurrency)].append((settled(log_dir) - before) / answered(run))
                finally:
                    server.close()
    results: dict = {"repeats": args.repeats, "duration_s": args.duration, "by_clients": {}}
    for concurrency in map(str, args.concurrency):
        off, on = (median_of(runs[mode][concurrency]) for mode in MODES)
        results["by_clients"][concurrency] = {
            "off": off,
            "on": on,
            "p50_on_off": on["p50_ms"] / off["p50_ms"],
            "throughput_on_off": on["requests_per_s"] / off["requests_per_s"],
            "shadowed_share": float(np.median(shadowed[concurrency])),
        }
    publish(results, table(results), args.output, measured)


def table(results: dict) -> str:
    lines = [
        f"PNG uploads, medians of {results['repeats']} runs of {results['duration_s']:.0f} s per setting; shadowing "
        "on: every request offered to a challenger as costly as the champion.",
        "",
        "| clients | shadowing | requests/s | p50 ms | p99 ms | errors | p50 on/off | shadowed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for clients, r in results["by_clients"].items():
        for mode in MODES:
            m = r[mode]
            extra = f"{r['p50_on_off']:.2f} | {r['shadowed_share']:.0%}" if mode == "on" else " | "
            lines.append(
                f"| {clients} | {mode} | {m['requests_per_s']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                f"{m['errors']} | {extra} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

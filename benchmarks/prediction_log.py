"""The prediction log's cost (`make bench` runs it after benchmarks/serving.py): the served champion with the
log off and on, 64 clients uploading PNGs, servers started in turn (off, on, on, off, off, on, ...) so that
neither setting always runs first, the ratio the median of each repeat's (its two runs next to each other, so
that the machine's drift falls on both alike); then 60 s at 64 clients with the log on, after which the log
must hold exactly one record per 200 answer; then the log's folder unwritable, where every answer must still
be 200 and the dropped counter must count every record. Prints a table and writes
benchmarks/results/prediction_log.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from benchmarks.local_server import REPO, LocalServer, benchmarked_service
from benchmarks.publish import publish, served_model
from benchmarks.serving import loadgen, median_of, paired_ratios, payload_images
from common.log_queries import count_predictions

DROPPED = "serving_prediction_log_dropped_total"


def serve(folder: Path, name: str, **env: str) -> LocalServer:
    return benchmarked_service(folder / f"{name}.log", **env)


def answered(run: dict) -> int:
    """The requests a run's server answered 200, its clients' first requests included (loadgen's errors count
    theirs too)."""
    return run["requests"] + run["first_requests"]["requests"] - sum(run["errors"].values())


def dropped(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(DROPPED))


def settled_records(log_dir: Path, expected: int) -> int:
    """Records in the log once the writers have caught up (a few seconds at most)."""
    count = 0
    for _ in range(40):
        count, _ = count_predictions(log_dir)
        if count >= expected:
            break
        time.sleep(0.5)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # the log costs a few percent; 3 runs of 10 s differed by more than that between runs of one setting
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput run")
    parser.add_argument("--soak", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "prediction_log.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        payloads = folder / "images.npy"
        np.save(payloads, payload_images())
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for repeat in range(args.repeats):
            for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                env = {"SERVING_PREDICTION_LOG": "true" if mode == "on" else "false"}
                env["SERVING_PREDICTION_LOG_DIR"] = str(folder / f"log-{mode}-{repeat}")
                server = serve(folder, f"{mode}-{repeat}", **env)
                try:
                    loadgen(server.url, "png", payloads, 16, 500, 5)  # warm-up, not reported
                    runs[mode].append(loadgen(server.url, "png", payloads, args.concurrency, 10**9, args.duration))
                finally:
                    server.close()
        throughput = {mode: median_of(mode_runs) for mode, mode_runs in runs.items()}

        server = serve(folder, "soak", SERVING_PREDICTION_LOG_DIR=str(folder / "log-soak"))
        try:
            served = served_model(server.url)
            soak = loadgen(server.url, "png", payloads, args.concurrency, 10**9, args.soak)
        finally:
            server.close()
        records = settled_records(folder / "log-soak", answered(soak))

        blocked = folder / "blocked"
        blocked.write_text("a file where the log's folder should be")
        server = serve(folder, "unwritable", SERVING_PREDICTION_LOG_DIR=str(blocked))
        try:
            unwritable = loadgen(server.url, "png", payloads, args.concurrency, 10**9, args.duration)
            time.sleep(2)
            drops = dropped(server.url)
        finally:
            server.close()
    results = {
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "throughput": throughput,
        "on_off_ratio": paired_ratios(runs["on"], runs["off"])["requests_per_s"],
        "soak": {"seconds": args.soak, "answered_200": answered(soak), "records": records, **pick(soak)},
        "unwritable": {"answered_200": answered(unwritable), "dropped_counted": drops, **pick(unwritable)},
    }
    publish(results, table(results), args.output, served)


def pick(run: dict) -> dict:
    return {"requests_per_s": run["requests_per_s"], "p99_ms": run["p99_ms"], "errors": sum(run["errors"].values())}


def table(results: dict) -> str:
    t, soak, blocked = results["throughput"], results["soak"], results["unwritable"]
    lines = [
        f"PNG uploads, {results['concurrency']} clients, medians of {results['repeats']} runs per setting.",
        "",
        "| prediction log | requests/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("off", "on"):
        r = t[mode]
        lines.append(f"| {mode} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    lines += [
        "",
        f"With the log on: {results['on_off_ratio']:.1%} of the throughput with it off (the median of the "
        f"{results['repeats']} repeats' ratios). Over {soak['seconds']:.0f} s "
        f"at {results['concurrency']} clients: {soak['answered_200']:,} answers 200, {soak['records']:,} records in "
        f"the log, {soak['errors']} errors. With the log's folder unwritable: {blocked['answered_200']:,} answers "
        f"200, {blocked['errors']} errors, {blocked['dropped_counted']:,.0f} records counted as dropped.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

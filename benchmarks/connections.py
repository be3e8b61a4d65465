"""How the service's workers share the clients (`make bench-connections`): `bentoml serve` hands every worker
one listening socket, and each connection stays with the worker that accepted it, so a worker's share of the
connections is its share of the queue. While benchmarks/loadgen.py holds keep-alive connections open (PNG
uploads at 16, 64 and 256 clients; bulk requests of 256 images from 2), the connections each worker holds are
counted and its CPU seconds read from the kernel; beside them, the run's requests/s, p50 and p99. Writes
benchmarks/results/connections.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil

from benchmarks.local_server import REPO, LocalServer, benchmarked_service
from benchmarks.profile import workers
from benchmarks.publish import publish, served_model
from benchmarks.serving import loadgen, loadgen_command, payload_images

LEVELS = [("png", 16), ("png", 64), ("png", 256), ("bulk", 2)]


def held(worker: psutil.Process, port: int | None) -> int:
    """The client connections a worker holds on the service's port."""
    return sum(1 for c in worker.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def run(server: LocalServer, payloads: Path, kind: str, clients: int, seconds: float) -> dict:
    """One run: loadgen for `seconds`, the connections counted once they are all open, CPU over the whole run."""
    serving, port = workers(server), urlsplit(server.url).port
    before = [w.cpu_times() for w in serving]
    command = loadgen_command(server.url, kind, payloads, clients, 10**9, seconds)
    load = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    time.sleep(seconds / 2)
    connections = [held(w, port) for w in serving]
    out, _ = load.communicate()
    cpu = [a.user + a.system - b.user - b.system for a, b in zip((w.cpu_times() for w in serving), before, strict=True)]
    answered = json.loads(out.strip().splitlines()[-1])
    return {
        "kind": kind,
        "clients": clients,
        "connections": connections,
        "cpu_seconds": [round(c, 2) for c in cpu],
        "requests_per_s": answered["requests_per_s"],
        "p50_ms": answered["p50_ms"],
        "p99_ms": answered["p99_ms"],
        "errors": sum(answered["errors"].values()),
    }


def table(results: dict) -> str:
    lines = [
        f"{results['workers']} workers, {results['seconds']:.0f} s per run: the connections each worker held "
        "(in worker order), its CPU seconds over the run, and the run's figures.",
        "",
        "| request | clients | connections per worker | CPU s per worker | requests/s | p50 ms | p99 ms | errors |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['kind']} | {r['clients']} | {' / '.join(map(str, r['connections']))} | "
            f"{' / '.join(f'{c:.1f}' for c in r['cpu_seconds'])} | {r['requests_per_s']:.0f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['errors']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs per load level, each on fresh connections")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "connections.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        payloads = Path(tmp) / "images.npy"
        np.save(payloads, payload_images())
        with benchmarked_service(Path(tmp) / "server.log") as server:
            loadgen(server.url, "png", payloads, 16, 10**9, 10)  # warm-up, not reported
            runs = [
                run(server, payloads, kind, clients, args.seconds)
                for kind, clients in LEVELS
                for _ in range(args.repeats)
            ]
            results = {"workers": len(workers(server)), "seconds": args.seconds, "runs": runs}
            publish(results, table(results), args.output, served_model(server.url))


if __name__ == "__main__":
    main()

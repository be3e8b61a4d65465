"""Header flood (`make bench-headers`): what large request headers cost the workers of `bentoml serve`.

The service answers a request whose headers pass SERVING_MAX_HEADER_BYTES with 431 before its body is read,
but uvicorn's HTTP parser (httptools) has no limit of its own: it holds a header line in memory until the
line ends. This opens `--connections` connections that each send `--megabytes` MB of one header line, and
reads the workers' resident memory (RSS, summed) before, while every connection holds its unfinished header,
and after the headers end and each gets its 431. Prints a table and writes benchmarks/results/header_flood.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from benchmarks.local_server import REPO, ChildServer, benchmarked_service
from benchmarks.publish import publish, served_model
from benchmarks.serving import payload_images

CHUNK = 64 * 1024


def workers_rss_mb(server: ChildServer) -> float:
    """The resident memory of the server's worker processes (not the supervisor), in MB."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return sum(child.memory_info().rss for child in children) / 1e6


def start_header(port: int, size: int) -> socket.socket:
    """A connection that has sent a request line and `size` bytes of one header line, not yet ended."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=120)
    connection.sendall(b"GET /model HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ")
    for _ in range(size // CHUNK):
        connection.sendall(b"a" * CHUNK)
    return connection


def finish(connection: socket.socket) -> int:
    """End the headers and read the status code of the answer."""
    connection.sendall(b"\r\n\r\n")
    status = int(connection.recv(4096).split(b" ", 2)[1])
    connection.close()
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--megabytes", type=int, default=8)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "header_flood.json")
    args = parser.parse_args()
    payload_images()  # exits, naming `make run`, where there is no champion to serve
    with tempfile.TemporaryDirectory() as tmp:
        server = benchmarked_service(Path(tmp) / "server.log")
        try:
            served = served_model(server.url)
            time.sleep(2)
            before = workers_rss_mb(server)
            with ThreadPoolExecutor(args.connections) as pool:
                size = args.megabytes * 1024 * 1024
                connections = list(pool.map(lambda _: start_header(server.port, size), range(args.connections)))
                time.sleep(2)
                holding = workers_rss_mb(server)
                statuses = list(pool.map(finish, connections))
            time.sleep(2)
            after = workers_rss_mb(server)
            workers = len(psutil.Process(server.process.pid).children(recursive=True))
        finally:
            server.close()
    results = {
        "cpus": os.cpu_count(),
        "worker_processes": workers,
        "connections": args.connections,
        "header_megabytes": args.megabytes,
        "statuses": sorted(set(statuses)),
        "rss_mb": {"before": round(before), "holding_headers": round(holding), "after_431": round(after)},
    }
    publish(results, table(results), args.output, served)


def table(results: dict) -> str:
    rss = results["rss_mb"]
    return "\n".join(
        [
            f"{results['connections']} connections, each sending a {results['header_megabytes']} MB header line to "
            f"`bentoml serve` ({results['worker_processes']} processes under its supervisor, {results['cpus']} CPUs); "
            f"answers: {', '.join(map(str, results['statuses']))}.",
            "",
            "| workers' memory (RSS) | MB |",
            "|---|---:|",
            f"| before | {rss['before']:,} |",
            f"| while the connections hold their unfinished headers | {rss['holding_headers']:,} |",
            f"| after the headers end and each is answered | {rss['after_431']:,} |",
        ]
    )


if __name__ == "__main__":
    main()

"""A bounded HTTP load generator, run in its own process: N concurrent clients, a request count and a
time limit; prints one JSON line with throughput, latency percentiles and non-2xx counts."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np


def load_payloads(path: Path, endpoint: str, batch: int) -> list[tuple[str, object]]:
    """Request bodies built before the clock starts: PNG files for /predict, JSON for /predict_batch."""
    with np.load(path, allow_pickle=False) as f:
        if endpoint == "predict":
            return [("png", bytes(f[key])) for key in sorted(f.files)]
        images = f["images"]
    return [("json", json.dumps({"images": images[:batch].tolist()}).encode())]


async def run(url: str, endpoint: str, payloads, concurrency: int, total: int, duration: float) -> dict:
    latencies, statuses = [], {}
    deadline = time.perf_counter() + duration
    issued = 0

    async def client(session: aiohttp.ClientSession, worker: int):
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            kind, body = payloads[issued % len(payloads)]
            issued += 1
            if kind == "png":
                data = aiohttp.FormData()
                data.add_field("image", body, filename="image.png", content_type="image/png")
                kwargs = {"data": data}
            else:
                kwargs = {"data": body, "headers": {"content-type": "application/json"}}
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/{endpoint}", **kwargs) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            latencies.append(time.perf_counter() - start)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = statuses.get("200", 0)
    ms = sorted(1000 * x for x in latencies)
    return {
        "endpoint": endpoint, "concurrency": concurrency, "requests": len(latencies), "ok": ok,
        "non_2xx": {k: v for k, v in statuses.items() if k != "200"}, "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(ms) if ms else None,
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--endpoint", choices=["predict", "predict_batch"], required=True)
    parser.add_argument("--payloads", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    payloads = load_payloads(args.payloads, args.endpoint, args.batch)
    result = asyncio.run(run(args.url, args.endpoint, payloads, args.concurrency, args.requests, args.duration))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()

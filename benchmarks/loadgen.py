"""A bounded HTTP load generator, run in its own process: N concurrent clients send requests until a request
count or a time limit is reached; prints one JSON line with throughput, latency percentiles and errors.

Kinds of request: `png` (one PNG per request, multipart field `image`, to /predict), `json` (one image as
JSON pixel arrays, to /predict_batch), `bulk` (`--batch` images per JSON request, to /predict_batch) and
`tensor` (one image as a binary tensor of Triton's HTTP extension, to /v2/models/fashion/infer); `--path`
posts to another path.
Every body is built, and every client's connection opened with a first request, before the clock starts: the
client spends its CPU on HTTP only, and the figures are those of requests served on open connections (the first
requests, connection set-up included, are reported apart; their errors count with the others).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

BOUNDARY = "loadgen-boundary-7d3f"


def png_file(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_upload(pixels: np.ndarray) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_file(pixels)
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def tensor_request(images: np.ndarray) -> tuple[bytes, int]:
    """Images [N, 1, 28, 28] as Triton's binary tensor extension takes them: a JSON header, then the raw pixels;
    (body, header length)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(images.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
        }
    ).encode()
    return header + images.tobytes(), len(header)


def requests_for(kind: str, images: np.ndarray, batch: int) -> tuple[str, dict, list[bytes]]:
    """(path, headers, bodies) for a kind of request."""
    if kind == "tensor":
        tensors = [tensor_request(image[None, None]) for image in images[:200]]
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(tensors[0][1])}
        return "/v2/models/fashion/infer", headers, [body for body, _ in tensors]
    if kind == "png":
        return (
            "/predict",
            {"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
            [png_upload(image) for image in images[:200]],
        )
    if kind == "json":
        bodies = [json.dumps({"images": [image.tolist()]}).encode() for image in images[:200]]
    else:
        bodies = [
            json.dumps({"images": images[start : start + batch].tolist()}).encode()
            for start in range(0, len(images) - batch + 1, batch)
        ]
    return "/predict_batch", {"content-type": "application/json"}, bodies


async def run(
    url: str, path: str, headers: dict, bodies: list[bytes], concurrency: int, total: int, duration: float
) -> dict:
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    issued = 0

    async def post(session: aiohttp.ClientSession, body: bytes) -> float:
        """One request's latency in seconds; its status counted."""
        start = time.perf_counter()
        try:
            async with session.post(url + path, data=body, headers=headers) as response:
                await response.read()
                status = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        statuses[status] = statuses.get(status, 0) + 1
        return time.perf_counter() - start

    async def client(session: aiohttp.ClientSession, deadline: float):
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            latencies.append(await post(session, body))

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        # every client's connection opened and its first request answered before the clock starts: the run then
        # measures requests served, not `concurrency` connections opened in the same instant (reported apart)
        firsts = await asyncio.gather(*(post(session, bodies[i % len(bodies)]) for i in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(client(session, started + duration) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    errors = {status: count for status, count in statuses.items() if not status.startswith("2")}
    result = summary(path, concurrency, latencies, elapsed, errors)
    first_ms = sorted(1000 * x for x in firsts)
    first = {"requests": len(first_ms), "p50_ms": statistics.median(first_ms), "max_ms": first_ms[-1]}
    result["first_requests"] = first
    return result


def summary(path: str, concurrency: int, latencies: list[float], elapsed: float, errors: dict[str, int]) -> dict:
    """A run's line: throughput over `elapsed` seconds, latency percentiles in ms, errors by status."""
    ms = sorted(1000 * x for x in latencies)
    return {
        "path": path,
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "errors": errors,
        "p50_ms": statistics.median(ms) if ms else None,
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=["png", "json", "bulk", "tensor"], required=True)
    parser.add_argument("--path", help="the path to post to, where not the kind's default")
    parser.add_argument("--images", type=Path, required=True, help=".npy file of uint8 images [N,28,28]")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    path, headers, bodies = requests_for(args.kind, np.load(args.images), args.batch)
    path = args.path or path
    result = asyncio.run(run(args.url, path, headers, bodies, args.concurrency, args.requests, args.duration))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()

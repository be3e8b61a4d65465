"""The front Triton needs for image uploads, as `make bench` runs it: Triton's HTTP API takes tensors, so this
small aiohttp server (one process per worker, sharing the port) decodes each PNG upload (multipart field
`image`, POST /predict) or JSON body (POST /predict_batch) as the service does, sends the pixels to Triton
as a binary tensor and answers in the service's format.

    TRITON_URL=http://127.0.0.1:8000 PEER_MODEL=export/model.int8.onnx python -m benchmarks.triton.front --port 3002
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os

import numpy as np
from aiohttp import ClientSession, TCPConnector, web

from benchmarks.answers import answer, read_card
from benchmarks.loadgen import tensor_request

TRITON = os.environ.get("TRITON_URL", "http://127.0.0.1:8000") + "/v2/models/fashion"


def make_app() -> web.Application:
    card = read_card(os.environ["PEER_MODEL"])

    async def infer(images: np.ndarray) -> np.ndarray:
        body, header_length = tensor_request(images)
        headers = {"inference-header-content-length": str(header_length)}
        async with app["triton"].post(f"{TRITON}/infer", data=body, headers=headers) as response:
            response.raise_for_status()
            output = (await response.json())["outputs"][0]
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])

    async def probabilities(images: np.ndarray) -> np.ndarray:
        """All at once, in requests of the model's max_batch_size (config.pbtxt, as Triton reports it)."""
        size = app["max_batch_size"]
        parts = [infer(images[start : start + size]) for start in range(0, len(images), size)]
        return np.concatenate(await asyncio.gather(*parts))

    async def predict(request: web.Request) -> web.Response:
        upload = (await request.post())["image"]
        if not isinstance(upload, web.FileField):
            raise web.HTTPBadRequest(text="the multipart field `image` must be a file")
        pixels = card.decode(upload.file.read())
        return web.json_response(answer((await probabilities(pixels[None]))[0], card.class_names))

    async def predict_batch(request: web.Request) -> web.Response:
        images = np.asarray((await request.json())["images"], dtype=np.uint8)[:, None]
        return web.json_response([answer(p, card.class_names) for p in await probabilities(images)])

    async def ready(_: web.Request) -> web.Response:
        return web.Response(text="ready")

    async def client(app: web.Application):
        app["triton"] = ClientSession(connector=TCPConnector(limit=0))
        async with app["triton"].get(f"{TRITON}/config") as response:
            app["max_batch_size"] = (await response.json())["max_batch_size"]
        yield
        await app["triton"].close()

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.add_routes(
        [web.post("/predict", predict), web.post("/predict_batch", predict_batch), web.get("/readyz", ready)]
    )
    return app


def serve(port: int) -> None:
    web.run_app(make_app(), host="127.0.0.1", port=port, reuse_port=True, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    workers = [multiprocessing.Process(target=serve, args=(args.port,)) for _ in range(args.workers)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()

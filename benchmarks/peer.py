"""The obvious alternative our service is measured against: FastAPI + uvicorn calling the model once per
request, written the way most tutorials do (library defaults, no batching, no tuning).

`PEER_BACKEND=onnx` runs an exported ONNX file with onnxruntime (peer 1: PEER_MODEL, by default the fp32
export/model.onnx, what a user would write; export/model.int8.onnx for the int8 one the service serves on
the CPU), `PEER_BACKEND=torch` the champion's PyTorch weights eagerly (peer 2). All use the service's own
upload preprocessing and answer in the service's format, so every server does the same work per image:

    PEER_BACKEND=onnx PEER_MODEL=export/model.int8.onnx uvicorn benchmarks.peer:app --workers 2 --port 3001
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, UploadFile
from pydantic import BaseModel, Field

from benchmarks.answers import answer
from benchmarks.local_server import REPO
from common.files import read_json
from common.model_store import read_metadata
from common.preprocess import MAX_IMAGE_PIXELS, image_to_input

ONNX_PATH = Path(os.environ.get("PEER_MODEL", REPO / "export" / "model.onnx"))
BACKEND = os.environ.get("PEER_BACKEND", "onnx")
METADATA = read_metadata(ONNX_PATH)
CLASS_NAMES: list[str] = METADATA["class_names"]


def onnx_model():
    import onnxruntime as ort

    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["probabilities"], {"images": images})[0]


def torch_model():
    import torch

    from training.checkpoint import load_augmented
    from training.config import CARD_FILE, Params

    name, params = METADATA["model_name"], Params.load()
    net = load_augmented(name, params, read_json(CARD_FILE))

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(net(torch.from_numpy(np.ascontiguousarray(images).copy())), dim=1).numpy()

    return run


model = {"onnx": onnx_model, "torch": torch_model}[BACKEND]()
app = FastAPI(title=f"peer: FastAPI + {BACKEND} ({METADATA.get('precision', 'fp32')})")


class Batch(BaseModel):
    images: list[list[list[Annotated[int, Field(ge=0, le=255)]]]]


@app.post("/predict")
async def predict(image: UploadFile = File(...)):
    pixels = image_to_input(await image.read(), 28, METADATA["upload_fit"], MAX_IMAGE_PIXELS)
    return answer(model(pixels[None])[0], CLASS_NAMES)


@app.post("/predict_batch")
async def predict_batch(batch: Batch):
    images = np.asarray(batch.images, dtype=np.uint8)[:, None]
    return [answer(p, CLASS_NAMES) for p in model(images)]

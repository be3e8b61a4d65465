"""TorchServe's handler for `make bench` (module-level `handle`, TorchServe's custom-handler form): each call
gets a batch of up to `batchSize` requests, PNG uploads (multipart field `image`) or JSON bodies
(`{"images": [...]}`), decodes each, runs the exported file once for the whole batch and answers each request
in the service's format."""

from __future__ import annotations

import os

import numpy as np

from benchmarks.answers import PeerModel

model: PeerModel | None = None


def images_of(request: dict, model: PeerModel) -> np.ndarray:
    """One request's images, uint8 [k, 1, 28, 28]."""
    if "image" in request:
        return model.card.decode(request["image"])[None]
    body = request["body"]
    return np.asarray(body["images"], dtype=np.uint8)[:, None]


def handle(data: list[dict] | None, context) -> list | None:
    global model
    if model is None:
        properties = context.system_properties
        model = PeerModel(os.path.join(properties["model_dir"], context.manifest["model"]["serializedFile"]))
    if data is None:
        return None
    per_request = [images_of(request, model) for request in data]
    answers = model.answers(np.concatenate(per_request))
    replies, start = [], 0
    for request, images in zip(data, per_request, strict=True):
        end = start + len(images)
        replies.append(answers[start] if "image" in request else answers[start:end])
        start = end
    return replies

"""The work every peer framework in `make bench` does, in the service's own code so that all do the same per
image: decode an upload as the service does, run onnxruntime once per batch with the service's thread count,
answer in the service's format. Imports nothing but numpy, Pillow and onnxruntime (and common.preprocess),
so that it runs in each framework's own environment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from common.preprocess import MAX_IMAGE_PIXELS, image_to_input


def session(path: str) -> ort.InferenceSession:
    """An onnxruntime CPU session with PEER_THREADS intra-op threads (1 by default: the service's split of two
    CPUs into two workers)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Card:
    """What decoding and answering need from the exported file's metadata."""

    class_names: list[str]
    fit: int

    def decode(self, upload: bytes) -> np.ndarray:
        """An uploaded image file to the model's uint8 [1, 28, 28]."""
        return image_to_input(bytes(upload), 28, self.fit, MAX_IMAGE_PIXELS)


def card_of(model: ort.InferenceSession) -> Card:
    metadata = model.get_modelmeta().custom_metadata_map
    return Card(json.loads(metadata["class_names"]), int(json.loads(metadata["upload_fit"])))


def read_card(path: str) -> Card:
    return card_of(session(path))


def answer(probabilities: np.ndarray, class_names: list[str]) -> dict:
    """One image's answer in the service's format."""
    order = np.argsort(-probabilities)
    return {
        "label": int(order[0]),
        "class_name": class_names[order[0]],
        "confidence": float(probabilities[order[0]]),
        "top_k": [{"class_name": class_names[i], "probability": float(probabilities[i])} for i in order[:3]],
    }


class PeerModel:
    """An exported ONNX file in one session, with its card."""

    def __init__(self, path: str):
        self.session = session(path)
        self.card = card_of(self.session)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 1, 28, 28] to float [N, classes]: one session.run."""
        return self.session.run(["probabilities"], {"images": images})[0]

    def answers(self, images: np.ndarray) -> list[dict]:
        return [answer(p, self.card.class_names) for p in self.probabilities(images)]

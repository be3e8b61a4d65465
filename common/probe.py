"""The probe batch: a few validation images and what the exported file answered for them at export, stored in
the file's own metadata. Whoever loads the file on another machine, in another session or after a download
runs the probe first and serves the file only if it answers the same (same classes, probabilities within the
export's parity tolerance, out-of-distribution scores within its relative tolerance)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

PROBE_IMAGES = 16
METADATA_KEY = "probe"


def probe_record(
    images: np.ndarray, probabilities: np.ndarray, ood_score: np.ndarray, atol: float, rtol: float
) -> dict:
    """What the metadata holds: uint8 images [N,1,28,28] (base64), the file's answers, the tolerances."""
    return {
        "images": base64.b64encode(np.ascontiguousarray(images, np.uint8).tobytes()).decode(),
        "shape": list(images.shape),
        "probabilities": probabilities.astype(float).tolist(),
        "ood_score": ood_score.astype(float).tolist(),
        "atol": atol,
        "score_rtol": rtol,
    }


def probe_images(record: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(record["images"]), np.uint8).reshape(record["shape"])


def probe_mismatch(record: dict[str, Any], probabilities: np.ndarray, ood_score: np.ndarray) -> str | None:
    """How the answers to the probe images differ from those recorded at export, or None where they agree."""
    expected, scores = np.asarray(record["probabilities"]), np.asarray(record["ood_score"])
    changed = int(np.sum(probabilities.argmax(1) != expected.argmax(1)))
    if changed:
        return f"{changed} of {len(expected)} probe images change class"
    difference = float(np.abs(probabilities - expected).max())
    if difference > record["atol"]:
        return f"probabilities differ by up to {difference:.2e} (tolerance {record['atol']:.0e})"
    relative = float((np.abs(ood_score - scores) / np.maximum(1.0, np.abs(scores))).max())
    if relative > record["score_rtol"]:
        return (
            f"out-of-distribution scores differ by up to {relative:.2e} relative (tolerance {record['score_rtol']:.0e})"
        )
    return None

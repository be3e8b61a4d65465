"""The champion/challenger gate: the exported challenger against the registry's champion, both as the service
runs them (the fp32 ONNX file, test-time augmentation and preprocessing inside), on the same images: the
official test set and each extra folder's held-out share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import Prepared
from training.export import onnx_outputs

TEST = "test"


def gated_splits(prepared: Prepared) -> list[str]:
    """The official test set, then every extra folder's held-out set in the prepared data."""
    return [TEST, *sorted(key[2:] for key in prepared.arrays if key.startswith("x_holdout_"))]


def accuracies(model: Path, prepared: Prepared) -> dict[str, float]:
    """The ONNX file's accuracy on each gated split (an empty split scores nothing)."""
    scores = {}
    for split in gated_splits(prepared):
        images, labels = prepared.images(split), prepared.labels(split)
        if len(labels):
            predicted = onnx_outputs(model, images)["probabilities"].argmax(1)
            scores[split] = float(np.mean(predicted == labels))
    return scores


@dataclass
class Decision:
    promote: bool
    reason: str  # one line with the figures


def decide(challenger: dict[str, float], champion: dict[str, float] | None, tolerance_points: float) -> Decision:
    """Promote unless the challenger is worse than the champion on the official test set by more than
    `tolerance_points` (percentage points), or worse at all on a held-out folder; a first run promotes."""
    if champion is None:
        return Decision(True, f"promoted: no champion yet (challenger test {challenger[TEST]:.2%})")
    worse = []
    test_drop = (champion[TEST] - challenger[TEST]) * 100
    if test_drop > tolerance_points:
        worse.append(
            f"test {challenger[TEST]:.2%} against the champion's {champion[TEST]:.2%}, "
            f"{test_drop:.2f} points worse (tolerance {tolerance_points:g})"
        )
    for split in sorted(set(challenger) & set(champion) - {TEST}):
        if challenger[split] < champion[split]:
            worse.append(f"{split} {challenger[split]:.2%} against the champion's {champion[split]:.2%}")
    if worse:
        return Decision(False, "kept the champion: the challenger scores " + "; ".join(worse))
    compared = ", ".join(
        f"{split} {challenger[split]:.2%} (champion {champion[split]:.2%})" for split in challenger if split in champion
    )
    return Decision(True, f"promoted: {compared}")

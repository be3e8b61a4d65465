"""The challenger against the champion on live traffic: the requests both answered (the champion's records and
the challenger's, joined on the prediction id), how often they agree, each one's accuracy where feedback
labelled the prediction (95% Wilson intervals), McNemar's test on those labels (training.paired), and each
one's latency. `make monitor` reports it; `make promote` decides with it."""

from __future__ import annotations

from collections import Counter

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from training.paired import Paired, compare

COMPARED = ("id", "time", "label", "model_version", "model_ms")  # the columns of the log this reads


def accuracy_with_interval(correct: np.ndarray) -> dict:
    """The share of right answers, with its 95% Wilson interval (None for no answers)."""
    right = int(correct.sum())
    low, high = proportion_confint(right, len(correct), alpha=0.05, method="wilson") if len(correct) else (0, 0)
    return {
        "accuracy": right / len(correct) if len(correct) else None,
        "interval_95": [float(low), float(high)] if len(correct) else None,
    }


def latency(rows: list[dict]) -> dict:
    """The model's time on the batches that answered these predictions (ms), its median and 95th percentile."""
    times = [r["model_ms"] for r in rows if r["model_ms"] is not None]
    if not times:
        return {"p50_ms": None, "p95_ms": None}
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def challenger_version(challenger_rows: list[dict]) -> str | None:
    """The challenger that answered most of these records."""
    versions = Counter(r["model_version"] for r in challenger_rows)
    return versions.most_common(1)[0][0] if versions else None


def live_comparison(
    champion_rows: list[dict], challenger_rows: list[dict], feedback: dict[str, int], version: str | None = None
) -> tuple[dict, Paired | None]:
    """The predictions both the champion and challenger `version` (by default the one that answered most)
    made, compared; and the paired result on the labelled ones (None where none is labelled)."""
    version = version or challenger_version(challenger_rows)
    shadowed = {r["id"]: r for r in challenger_rows if r["model_version"] == version}
    pairs = [(row, shadowed[row["id"]]) for row in champion_rows if row["id"] in shadowed]
    if version is None or not pairs:
        return {"challenger_version": version, "paired_predictions": 0}, None
    champion_versions = Counter(row["model_version"] for row, _ in pairs)
    labelled = [(row, other, feedback[row["id"]]) for row, other in pairs if row["id"] in feedback]
    champion_right = np.array([row["label"] == truth for row, _, truth in labelled], bool)
    challenger_right = np.array([other["label"] == truth for _, other, truth in labelled], bool)
    paired = compare(champion_right, challenger_right) if labelled else None
    figures = {
        "challenger_version": version,
        "champion_version": champion_versions.most_common(1)[0][0],
        "paired_predictions": len(pairs),
        "agreement": float(np.mean([row["label"] == other["label"] for row, other in pairs])),
        "labelled": len(labelled),
        "champion": {**accuracy_with_interval(champion_right), **latency([row for row, _ in pairs])},
        "challenger": {**accuracy_with_interval(challenger_right), **latency([other for _, other in pairs])},
        "mcnemar": None if paired is None else paired.figures(),
    }
    return figures, paired

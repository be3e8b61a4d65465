"""`make monitor`: a drift and quality report for a window of served traffic, against the validation split.

Reads the prediction log (every worker's files) and the feedback labels, and compares the window with the
reference the export stage stored with the served model (the validation images as that very file sees them):
embedding drift (Evidently's EmbeddingsDrift, a domain classifier on 20 principal components: its ROC AUC is
the drift score, 0.5 for traffic like the reference), input-statistics drift, prediction drift (the class
distribution and the confidence), the out-of-distribution share, and live accuracy per class with a 95%
Wilson interval where feedback labelled predictions of the window; the challenger tried on the same traffic
(monitoring.shadow: agreement, each model's live accuracy, McNemar's test, latency); and whether to retrain
(params.yaml's `monitor` group). Writes reports/monitoring/latest.html and
latest.json, and a copy of each named after the window; logs the figures and both files to MLflow (the
experiment `<dataset>-monitoring`).

    python -m monitoring.report                          # the last 24 hours
    python -m monitoring.report --since 2026-12-01T08:00  # from then on (ISO time, UTC where no offset)
    python -m monitoring.report --last 1000               # the last 1,000 predictions
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import bentoml
import mlflow
import numpy as np
import pandas as pd
from bentoml.exceptions import NotFound
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import EmbeddingsDrift, ValueDrift
from evidently.metrics.embeddings import ModelDriftMethod

from common.log_layout import CHALLENGER
from common.log_queries import (
    LOG_DIR_HELP,
    Location,
    default_location,
    location,
    read_feedback,
    read_labels,
    read_predictions,
)
from common.model_store import REFERENCE_FILE
from common.statistics import STATISTICS
from monitoring.shadow import COMPARED, accuracy_with_interval, live_comparison
from training import tracking
from training.config import MonitorSettings, Params

MONITORED = (  # the columns of the log the report reads
    *COMPARED, "model_tag", "precision", "embedding", "class_name", "confidence", "out_of_distribution", *STATISTICS,
)  # fmt: skip
REPORTS = Path("reports/monitoring")
EMBEDDING_DRIFT = ModelDriftMethod(pca_components=20)  # drift when the classifier's ROC AUC passes 0.55
DISTRIBUTION_DRIFT = {"numerical": ("wasserstein", 0.1), "categorical": ("jensenshannon", 0.1)}  # method, threshold


class MonitoringError(Exception):
    """Nothing to report on; the message says why and what to do."""


def parse_time(text: str) -> float:
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def served_model(rows: list[dict]) -> tuple[str, str, dict[str, np.ndarray], dict, float]:
    """The model that answered most of the window: tag, precision, its reference arrays, its metadata and when
    it was saved (a Unix time)."""
    (tag, precision), _ = Counter((r["model_tag"], r["precision"]) for r in rows).most_common(1)[0]
    try:
        stored = bentoml.models.get(tag)
    except NotFound:
        raise MonitoringError(f"BentoML model {tag}, which served this traffic, is not in the local store") from None
    with np.load(stored.path_of(REFERENCE_FILE)) as reference:
        return tag, precision, dict(reference), dict(stored.info.metadata), stored.info.creation_time.timestamp()


def retrain_advice(drift: bool, accuracy: float | None, new_labels: int, settings: MonitorSettings) -> tuple[bool, str]:
    """Whether to retrain, and why, in one line: drift or live accuracy under the threshold, once enough labels
    arrived since the served model was trained to learn from."""
    low = accuracy is not None and accuracy < settings.min_live_accuracy
    causes = (["drift detected"] if drift else []) + (
        [f"live accuracy {accuracy:.2%} under {settings.min_live_accuracy:.2%}"] if low else []
    )
    if not causes:
        return False, "no drift, and live accuracy " + ("unknown (no feedback)" if accuracy is None else "fine")
    if new_labels < settings.min_new_labels:
        return False, f"{' and '.join(causes)}, but only {new_labels} new labels (at least {settings.min_new_labels})"
    return True, f"{' and '.join(causes)}, with {new_labels} new labels since the model was trained: `make retrain`"


def frames(rows: list[dict], reference: dict[str, np.ndarray], precision: str, class_names: list[str]):
    """The window and the reference as Evidently datasets: embedding columns, input statistics, the predicted
    class and its confidence."""
    embeddings = np.stack([np.frombuffer(r["embedding"], np.float32) for r in rows])
    columns = [f"embedding_{i}" for i in range(embeddings.shape[1])]
    current = pd.DataFrame(embeddings, columns=columns)
    for name in STATISTICS:
        current[name] = [r[name] for r in rows]
    current["predicted_class"] = [r["class_name"] for r in rows]
    current["confidence"] = [r["confidence"] for r in rows]
    probabilities = reference[f"{precision}_probabilities"]
    past = pd.DataFrame(reference[f"{precision}_embedding"], columns=columns)
    for i, name in enumerate(STATISTICS):
        past[name] = reference["input_statistics"][:, i]
    past["predicted_class"] = [class_names[label] for label in probabilities.argmax(1)]
    past["confidence"] = probabilities.max(1)
    definition = DataDefinition(
        embeddings={"embedding": columns},
        numerical_columns=[*STATISTICS, "confidence"],
        categorical_columns=["predicted_class"],
    )
    return Dataset.from_pandas(current, data_definition=definition), Dataset.from_pandas(
        past, data_definition=definition
    )


def drift_checks(current: Dataset, reference: Dataset, dimensions: int):
    """Evidently's report over the window, and each check's score, threshold and verdict."""
    embedding = EmbeddingsDrift(
        embeddings_name="embedding", drift_method=EMBEDDING_DRIFT.copy(update={"pca_components": min(20, dimensions)})
    )
    columns = {name: "numerical" for name in (*STATISTICS, "confidence")} | {"predicted_class": "categorical"}
    value_drifts = {
        name: ValueDrift(column=name, method=DISTRIBUTION_DRIFT[kind][0], threshold=DISTRIBUTION_DRIFT[kind][1])
        for name, kind in columns.items()
    }
    snapshot = Report([embedding, *value_drifts.values()]).run(current, reference)
    values = [float(metric["value"]) for metric in snapshot.dict()["metrics"]]
    checks = {
        "embedding_drift": {
            "method": "domain classifier ROC AUC on 20 principal components (Evidently EmbeddingsDrift, model)",
            "score": values[0],
            "threshold": EMBEDDING_DRIFT.threshold,
            "drift_detected": values[0] > EMBEDDING_DRIFT.threshold,
        }
    }
    for (name, kind), score in zip(columns.items(), values[1:], strict=True):
        method, threshold = DISTRIBUTION_DRIFT[kind]
        group = "input_statistics" if name in STATISTICS else "predictions"
        checks.setdefault(group, {})[name] = {
            "method": method,
            "score": score,
            "threshold": threshold,
            "drift_detected": score >= threshold,
        }
    return snapshot, checks


def live_accuracy(rows: list[dict], feedback: dict[str, int], class_names: list[str]) -> dict:
    """Accuracy on the window's labelled predictions, overall and per true class, with 95% Wilson intervals."""
    labelled = [(feedback[r["id"]], r["label"]) for r in rows if r["id"] in feedback]

    def figures(pairs: list[tuple[int, int]]) -> dict:
        return {
            "labelled": len(pairs),
            **accuracy_with_interval(np.array([truth == predicted for truth, predicted in pairs])),
        }

    if not labelled:
        return {"labelled": 0, "accuracy": None, "per_class": {}}
    per_class = {
        name: figures(pairs)
        for label, name in enumerate(class_names)
        if (pairs := [pair for pair in labelled if pair[0] == label])
    }
    return {**figures(labelled), "per_class": per_class}


def build(log_dir: Location, since: float | None, last: int | None, settings: MonitorSettings) -> tuple[dict, Report]:
    rows = read_predictions(log_dir, since=None if last else since, last=last, columns=MONITORED)
    if not rows:
        window = f"the last {last} predictions" if last else f"since {iso(since or 0)}"
        raise MonitoringError(f"no predictions in the log at {log_dir} ({window}): serve the model and send some")
    tag, precision, reference, metadata, saved = served_model(rows)
    rows = [r for r in rows if r["model_tag"] == tag]
    class_names = metadata["class_names"]
    current, past = frames(rows, reference, precision, class_names)
    snapshot, checks = drift_checks(current, past, reference[f"{precision}_embedding"].shape[1])
    feedback = read_feedback(log_dir)
    accuracy = live_accuracy(rows, feedback, class_names)
    challenger = read_predictions(log_dir, since=rows[0]["time"], role=CHALLENGER, columns=COMPARED)
    shadow, _ = live_comparison(rows, challenger, feedback)
    embedding = checks["embedding_drift"]
    new_labels = sum(time > saved for time, _, _ in read_labels(log_dir))
    retrain, reason = retrain_advice(embedding["drift_detected"], accuracy["accuracy"], new_labels, settings)
    summary = {
        "drift_detected": embedding["drift_detected"],
        "drift_score": embedding["score"],
        "predictions": len(rows),
        "feedback": accuracy["labelled"],
        "live_accuracy": accuracy["accuracy"],
        "ood_share": float(np.mean([r["out_of_distribution"] for r in rows])),
        "retrain_recommended": retrain,
        "retrain_reason": reason,
        "new_labels": new_labels,
        "window": {"from": iso(rows[0]["time"]), "to": iso(rows[-1]["time"]), "last": last},
        "model": {"bentoml_tag": tag, "precision": precision, "dataset": metadata["dataset"]},
        "reference": {"images": len(reference["input_statistics"]), "split": "validation"},
        "checks": {**checks, "live_accuracy": accuracy},
        "shadow": shadow if shadow["paired_predictions"] else None,
    }
    return summary, snapshot


def publish(summary: dict, snapshot, folder: Path) -> list[Path]:
    """latest.html and latest.json, and copies named after the window."""
    folder.mkdir(parents=True, exist_ok=True)
    window = summary["window"]
    name = f"{window['from']}--{window['to']}".replace(":", "").replace("+0000", "Z")
    written = []
    for stem in ("latest", name):
        snapshot.save_html(str(folder / f"{stem}.html"))
        (folder / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
        written += [folder / f"{stem}.html", folder / f"{stem}.json"]
    return written


def log_to_mlflow(summary: dict, files: list[Path]) -> None:
    tracking.setup(f"{summary['model']['dataset']}-monitoring")
    window = summary["window"]
    with tracking.start_run(run_name=f"{window['from']} to {window['to']}"):
        mlflow.set_tags({"bentoml_tag": summary["model"]["bentoml_tag"], "precision": summary["model"]["precision"]})
        figures = {k: summary[k] for k in ("drift_score", "predictions", "feedback", "ood_share", "live_accuracy")}
        figures["drift_detected"] = int(summary["drift_detected"])
        figures["retrain_recommended"] = int(summary["retrain_recommended"])
        for group in ("input_statistics", "predictions"):
            figures |= {f"{group}.{k}": v["score"] for k, v in summary["checks"][group].items()}
        if summary["shadow"]:
            shadow = summary["shadow"]
            figures |= {"shadow.agreement": shadow["agreement"], "shadow.labelled": shadow["labelled"]}
            figures |= {f"shadow.{role}_accuracy": shadow[role]["accuracy"] for role in ("champion", "challenger")}
        mlflow.log_metrics({k: float(v) for k, v in figures.items() if v is not None})
        for path in files[:2]:
            mlflow.log_artifact(str(path), artifact_path="monitoring")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--since", help="ISO time the window starts at (default: 24 hours ago)")
    parser.add_argument("--last", type=int, help="the window is the last N predictions instead")
    parser.add_argument("--log-dir", type=location, help=LOG_DIR_HELP)
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args()
    log_dir = args.log_dir or default_location()
    since = parse_time(args.since) if args.since else time.time() - 86400
    try:
        summary, snapshot = build(log_dir, since, args.last, Params.load().monitor)
    except MonitoringError as exc:
        sys.exit(f"monitor: {exc}")
    files = publish(summary, snapshot, args.out)
    log_to_mlflow(summary, files)
    print(
        f"{summary['predictions']} predictions {summary['window']['from']} to {summary['window']['to']}: drift "
        f"{'detected' if summary['drift_detected'] else 'not detected'} (score {summary['drift_score']:.3f}), "
        f"out of distribution {summary['ood_share']:.1%}, live accuracy "
        + ("n/a (no feedback)" if summary["live_accuracy"] is None else f"{summary['live_accuracy']:.2%}")
        + f" on {summary['feedback']} labels; retrain: {summary['retrain_reason']}; {files[0]}, {files[1]}"
    )
    if summary["shadow"]:
        print(shadow_line(summary["shadow"]))


def shadow_line(shadow: dict) -> str:
    """The challenger on live traffic, in one line."""
    if not shadow["labelled"]:
        accuracies = "no labels yet"
    else:
        accuracies = (
            f"on {shadow['labelled']} labels {shadow['challenger']['accuracy']:.2%} against the champion's "
            f"{shadow['champion']['accuracy']:.2%} (McNemar p = {shadow['mcnemar']['p_value']:.3g})"
        )
    return (
        f"challenger version {shadow['challenger_version']} shadowed {shadow['paired_predictions']} predictions of "
        f"version {shadow['champion_version']}: agreement {shadow['agreement']:.2%}, {accuracies}; model time p50 "
        f"{shadow['challenger']['p50_ms']:.1f} ms against {shadow['champion']['p50_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()

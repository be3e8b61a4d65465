"""The service's own Prometheus metrics, beside BentoML's request metrics on /metrics. No label takes more values
than the model has classes: never an id. Live accuracy is a PromQL ratio of the feedback counter
(monitoring/alerts.yml)."""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZES = Histogram(
    "serving_batch_size", "images per onnxruntime call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
PREDICTIONS = Counter(
    "serving_predictions",
    "predictions answered, by class and by the out-of-distribution flag",
    ["class_name", "out_of_distribution"],
)
CONFIDENCE = Histogram(
    "serving_prediction_confidence",
    "probability of the predicted class",
    buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
FEEDBACK = Counter("serving_feedback", "labels received for logged predictions, by outcome", ["outcome"])
LOG_DROPPED = Counter("serving_prediction_log_dropped", "prediction log records dropped (queue full or disk failing)")
LOG_UPLOAD_FAILURES = Counter(
    "serving_prediction_log_upload_failures", "tries to upload a closed prediction log file that failed (retried)"
)
MODEL_INFO = Gauge(
    "serving_model_info",
    "1 for the model each worker serves (role champion) and shadows (role challenger), 0 for those it replaced",
    ["role", "version", "tag", "precision"],
    multiprocess_mode="liveall",
)
RELOAD_FAILURES = Counter(
    "serving_model_reload_failures",
    "registry versions a worker did not take: the old model kept, by alias and reason (download, checksum, load, "
    "probe, crash)",
    ["alias", "reason"],
)
REGISTRY_ERRORS = Counter("serving_registry_errors", "looks at the registry's aliases that failed (unreachable store)")
SHADOW_DROPPED = Counter(
    "serving_shadow_dropped", "requests sampled for the challenger but not shadowed: its queue was full, or it failed"
)
SHADOW_FAILURES = Counter("serving_shadow_failures", "batches the challenger failed to answer (its error logged)")


def count_predictions(class_names: list[str], labels: np.ndarray, confidence: np.ndarray, flagged: np.ndarray) -> None:
    """One batch's answers in the counters: a few calls per class, not one per image."""
    for ood in (False, True):
        counts = np.bincount(labels[flagged == ood], minlength=len(class_names))
        for label in np.flatnonzero(counts).tolist():
            PREDICTIONS.labels(class_names[label], str(ood).lower()).inc(int(counts[label]))
    for value in confidence.tolist():
        CONFIDENCE.observe(value)

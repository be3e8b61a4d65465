"""Where the prediction log keeps what: the names its writer (serving/prediction_log.py) and its readers
(common/log_queries.py) share.

    predictions/date=<UTC day>/host=<host>/<token>-<pid>-<n>.parquet    closed files, row groups of ~2048 records
    feedback/date=<UTC day>/host=<host>/<token>-<pid>-<n>.parquet       one label each
    .open/<token>-<pid>-<n>/journal                                     a worker's open file

The same keys below `prediction-log/` in the bucket. A prediction id is the worker's random 64-bit token and a
sequence number, so an id names the files that may hold it.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from pathlib import Path

from common.model_store import WORKSPACE, in_workspace

PREDICTIONS, FEEDBACK, OPEN = "predictions", "feedback", ".open"
JOURNAL = "journal"  # an open file's records, as its worker appends them
PREFIX = "prediction-log"  # the log's keys in the bucket
CHAMPION, CHALLENGER = "champion", "challenger"  # whose answers a record holds
FILE_NAME = re.compile(r"^(?P<token>[0-9a-f]{16})-(?P<pid>\d+)-(?P<n>\d+)$")


def parse_id(prediction_id: str) -> tuple[str, int]:
    """An id's worker token and sequence number."""
    return prediction_id[:16], int(prediction_id[16:], 16)


def partition(root: Path, kind: str, when: float) -> Path:
    """The folder of `kind` records written on `when`'s (UTC) date by this host."""
    day = datetime.datetime.fromtimestamp(when, datetime.UTC).date().isoformat()
    return root / kind / f"date={day}" / f"host={socket.gethostname()}"


def storage_url() -> str | None:
    """$STORAGE_URL (`make storage`'s bucket) where set; else none: the log stays in its folder"""
    return os.environ.get("STORAGE_URL") or None


def prediction_log_dir() -> Path:
    """`logs/predictions` in the workspace; in a built bento, `prediction_log` in BentoML's home"""
    if in_workspace():
        return WORKSPACE / "logs" / "predictions"
    return Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")) / "prediction_log"

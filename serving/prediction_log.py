"""The prediction log: one record per prediction, written off the request path, never slowing or failing one.

Each worker process writes its own folder under the log's root (`<host>-<pid>-<start>`), never a file another
process writes: SQLite segments of `predictions`, a new one past a size, and a `feedback.sqlite` for the labels
POST /feedback stores. Records leave the event loop through a bounded queue and a writer thread stores them in
batches; a full queue or a failing disk drops records, counted (`on_drop`) and warned about once. Retention,
by size and by age over the whole root, deletes the oldest segments no writer is still appending to.
Readers (the feedback route, `make monitor`) open every segment read-only: SQLite's write-ahead log lets them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.statistics import STATISTICS, input_statistics

log = logging.getLogger("bentoml.serving")
SEGMENTS_PER_LOG = 16  # a segment is at most this share of the size limit, so retention deletes in small steps
FLUSH_S = 0.2  # how long records gather between two writes: one transaction per flush, not one per request
RETAIN_EVERY_S = 600  # retention also runs this often, so a quiet log ages out too
LOOKUP_S = 1.0  # how long a lookup waits for a record still in some worker's queue
PREDICTIONS = f"""CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY, time REAL NOT NULL, route TEXT, model_tag TEXT, precision TEXT, input_sha256 TEXT,
    {", ".join(f"{name} REAL" for name in STATISTICS)},
    label INTEGER, class_name TEXT, confidence REAL, probabilities BLOB, embedding BLOB, ood_score REAL,
    out_of_distribution INTEGER, latency_ms REAL, model_input BLOB);"""
FEEDBACK = """CREATE TABLE IF NOT EXISTS feedback (
    prediction_id TEXT NOT NULL, label INTEGER NOT NULL, time REAL NOT NULL, predicted_label INTEGER);"""


def new_ids(count: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(count)]


@dataclass
class Outputs:
    """The served graph's outputs for a batch, as the service computes them once: [N, classes] probabilities,
    [N] OOD scores, [N, D] embeddings."""

    probabilities: np.ndarray
    ood_score: np.ndarray
    embedding: np.ndarray


@dataclass
class Pending:
    """One request's records, as they leave the event loop: everything else is computed by the writer."""

    ids: list[str]
    time: float
    route: str
    latency_ms: float
    inputs: np.ndarray  # uint8 [N,1,28,28]
    outputs: Outputs


class PredictionLog:
    def __init__(
        self,
        root: Path,
        model_tag: str,
        precision: str,
        class_names: list[str],
        threshold: float,
        keep_inputs: bool,
        queue_requests: int,
        max_bytes: int,
        max_age_s: float,
        on_drop: Callable[[int], None],
    ):
        self.root = root
        self.folder = root / f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}"
        self.model_tag, self.precision, self.class_names = model_tag, precision, class_names
        self.threshold, self.keep_inputs = threshold, keep_inputs
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self.segment_bytes = max(1 << 20, max_bytes // SEGMENTS_PER_LOG)
        self.on_drop = on_drop
        self.queue: queue.Queue[Pending | None] = queue.Queue(queue_requests)
        self.connection: sqlite3.Connection | None = None
        self.feedback_lock = threading.Lock()
        self.warned = False
        self.next_retention = 0.0
        self.writer = threading.Thread(target=self._write_forever, name="prediction-log", daemon=True)
        self.writer.start()

    # the event loop's side: one call per request, never blocking

    def record(self, pending: Pending) -> None:
        try:
            self.queue.put_nowait(pending)
        except queue.Full:
            self._dropped(len(pending.ids), f"its queue is full ({self.queue.maxsize} requests)")

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=5)
        self.writer.join(timeout=10)

    # the writer thread

    def _dropped(self, count: int, why: str) -> None:
        self.on_drop(count)
        if not self.warned:
            self.warned = True
            log.warning("prediction log: dropping records, %s (counted in serving_prediction_log_dropped_total)", why)

    def _write_forever(self) -> None:
        while True:
            try:
                batch = [self.queue.get(timeout=FLUSH_S * 10)]
            except queue.Empty:
                batch = []
            while len(batch) < 512:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if time.monotonic() > self.next_retention:
                self.next_retention = time.monotonic() + RETAIN_EVERY_S
                with contextlib.suppress(OSError):
                    retain(self.root, self.max_bytes, self.max_age_s)
            stop = None in batch
            pending = [p for p in batch if p is not None]
            if pending:
                try:
                    self._write(pending)
                except (OSError, sqlite3.Error) as exc:
                    self._dropped(sum(len(p.ids) for p in pending), f"writing {self.folder} failed: {exc}")
                    self._close_segment()
            if stop:
                self._close_segment()
                return
            time.sleep(FLUSH_S)

    def _segment(self) -> sqlite3.Connection:
        if self.connection is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"predictions-{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns()}.sqlite"
            self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.connection.execute("PRAGMA journal_mode=WAL")
            # no fsync: half the cost of a record. A crashed service loses nothing written; a power cut may
            # lose or damage the segment being written (readers skip one that does not open)
            self.connection.execute("PRAGMA synchronous=OFF")
            self.connection.executescript(PREDICTIONS)
            self.segment_path = path
        return self.connection

    def _close_segment(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self.connection.close()
            self.connection = None

    def _write(self, pending: list[Pending]) -> None:
        inputs = np.concatenate([p.inputs for p in pending])
        probabilities = np.concatenate([p.outputs.probabilities for p in pending]).astype(np.float32)
        embeddings = np.concatenate([p.outputs.embedding for p in pending]).astype(np.float32)
        scores = np.concatenate([p.outputs.ood_score for p in pending]).astype(float).tolist()
        statistics = input_statistics(inputs).tolist()
        labels = probabilities.argmax(1).tolist()
        confidence = probabilities.max(1).tolist()
        requests = [(p.ids[j], p.time, p.route, p.latency_ms) for p in pending for j in range(len(p.ids))]
        rows = []
        for i, (prediction_id, when, route, latency_ms) in enumerate(requests):
            pixels = inputs[i].tobytes()
            rows.append(
                (
                    prediction_id,
                    when,
                    route,
                    self.model_tag,
                    self.precision,
                    hashlib.sha256(pixels).hexdigest(),
                    *statistics[i],
                    labels[i],
                    self.class_names[labels[i]],
                    confidence[i],
                    probabilities[i].tobytes(),
                    embeddings[i].tobytes(),
                    scores[i],
                    int(scores[i] > self.threshold),
                    latency_ms,
                    pixels if self.keep_inputs else None,
                )
            )
        connection = self._segment()
        with connection:
            connection.executemany(f"INSERT INTO predictions VALUES ({', '.join('?' * len(rows[0]))})", rows)
        if self.segment_path.stat().st_size + wal_size(self.segment_path) > self.segment_bytes:
            self._close_segment()
            retain(self.root, self.max_bytes, self.max_age_s)

    # feedback: the labels people send back for predictions

    def find(self, prediction_id: str) -> dict | None:
        """The logged prediction `prediction_id` (from any worker), waiting briefly for one still queued."""
        deadline = time.monotonic() + LOOKUP_S
        while True:
            found = find_prediction(self.root, prediction_id)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(FLUSH_S)

    def store_feedback(self, prediction_id: str, label: int, predicted_label: int) -> None:
        """Append a label for a prediction to this worker's feedback file, durably: a later one replaces it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.feedback_lock, contextlib.closing(sqlite3.connect(self.folder / "feedback.sqlite")) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(FEEDBACK)
            with db:
                db.execute(
                    "INSERT INTO feedback VALUES (?, ?, ?, ?)", (prediction_id, label, time.time(), predicted_label)
                )


def wal_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def segments(root: Path) -> list[Path]:
    return sorted(root.glob("*/predictions-*.sqlite"))


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def find_prediction(root: Path, prediction_id: str) -> dict | None:
    for path in reversed(segments(root)):  # the newest first: feedback is mostly on recent predictions
        try:
            with contextlib.closing(read_only(path)) as db:
                db.row_factory = sqlite3.Row
                row = db.execute("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        except sqlite3.Error:  # a segment being created or deleted right now
            continue
        if row is not None:
            return dict(row)
    return None


def writer_alive(folder: Path) -> bool:
    """Whether the process that writes `folder` may still be appending to its newest segment."""
    parts = folder.name.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return True  # another machine's (a replica on a shared volume): only age retires its newest segment
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def retain(root: Path, max_bytes: int, max_age_s: float) -> list[Path]:
    """Delete the oldest closed segments until the log fits `max_bytes`, and every closed one older than
    `max_age_s`; a segment is closed once its writer has moved on to a newer one or is gone."""
    now = time.time()
    every = segments(root)
    newest = {}
    for path in every:
        newest[path.parent] = path
    closed = [p for p in every if newest[p.parent] != p or not writer_alive(p.parent)]
    sizes = {p: p.stat().st_size + wal_size(p) for p in every}
    total = sum(sizes.values())
    deleted = []
    for path in sorted(closed, key=lambda p: p.stat().st_mtime):
        if total <= max_bytes and now - path.stat().st_mtime <= max_age_s:
            continue
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            file.unlink(missing_ok=True)
        total -= sizes[path]
        deleted.append(path)
    return deleted


def read_predictions(root: Path, since: float | None = None, last: int | None = None) -> list[dict]:
    """Logged predictions, oldest first (a request's in the order it answered them): from `since` (a Unix time),
    or the `last` N of them, or all."""
    where = " WHERE time >= ?" if since is not None else ""
    limit = f" ORDER BY time DESC, rowid DESC LIMIT {int(last)}" if last else ""
    found: list[tuple[float, int, int, dict]] = []
    for index, path in enumerate(segments(root)):
        try:
            with contextlib.closing(read_only(path)) as db:
                db.row_factory = sqlite3.Row
                query = f"SELECT rowid AS written, * FROM predictions{where}{limit}"
                records = [dict(row) for row in db.execute(query, () if since is None else (since,))]
        except sqlite3.DatabaseError as exc:  # a segment a power cut damaged, or one being created
            log.warning("prediction log: skipping %s (%s)", path, exc)
            continue
        found += [(record["time"], index, record.pop("written"), record) for record in records]
    found.sort(key=lambda item: item[:3])
    rows = [record for *_, record in found]
    return rows[-last:] if last else rows


def read_feedback(root: Path) -> dict[str, int]:
    """The latest label sent for each prediction, from every worker's feedback file."""
    labels: list[tuple[float, str, int]] = []
    for path in sorted(root.glob("*/feedback.sqlite")):
        with contextlib.closing(read_only(path)) as db:
            labels += db.execute("SELECT time, prediction_id, label FROM feedback").fetchall()
    return {prediction_id: label for _, prediction_id, label in sorted(labels)}

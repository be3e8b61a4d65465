"""The prediction log: one record per prediction, written off the request path, never slowing or failing one.

Each worker process writes its own folder under the log's root (`<host>-<pid>-<token>`), never a file another
process writes: SQLite segments, a new one past a size, and a `feedback.sqlite` for the labels POST /feedback
stores. A prediction id is the worker's random token and a sequence number, so an id names the folder and,
through each chunk's sequence range, the chunk that holds it: no index to write. Records leave the event loop
through a bounded queue; a writer thread stores what gathered every fraction of a second as one chunk, the
records' fields as columns (an .npz): a row per prediction in SQLite cost as much CPU as a tenth of a request.
A full queue or a failing disk drops records, counted (`on_drop`) and warned about once. Each chunk names the
model that answered (BentoML tag, registered version, precision) and its role: `champion` records are the
answers the service gave; `challenger` records, written by the shadow process, are what the challenger would
have answered for the same prediction ids. Retention, by size
and by age over the whole root, deletes the oldest segments no writer is still appending to. Readers (the
feedback route, `make monitor`) open every segment read-only: SQLite's write-ahead log lets them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import queue
import secrets
import socket
import sqlite3
import threading
import time
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
CHAMPION, CHALLENGER = "champion", "challenger"  # whose answers a chunk holds
PREDICTIONS = """CREATE TABLE IF NOT EXISTS chunks (
    chunk INTEGER PRIMARY KEY, first_sequence INTEGER, last_sequence INTEGER, first_time REAL, last_time REAL,
    model_tag TEXT, precision TEXT, class_names TEXT, records INTEGER, data BLOB, model_version TEXT, role TEXT);"""
FEEDBACK = """CREATE TABLE IF NOT EXISTS feedback (
    prediction_id TEXT NOT NULL, label INTEGER NOT NULL, time REAL NOT NULL, predicted_label INTEGER);"""


class PredictionIds:
    """A worker's prediction ids: 32 hex digits, its random 64-bit token then a 64-bit sequence number."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        self.sequence = itertools.count()

    def take(self, count: int) -> list[str]:
        return [f"{self.token}{n:016x}" for n in itertools.islice(self.sequence, count)]


def parse_id(prediction_id: str) -> tuple[str, int]:
    """An id's worker token and sequence number."""
    return prediction_id[:16], int(prediction_id[16:], 16)


@dataclass(frozen=True)
class ModelName:
    """What names the model that answered: its BentoML tag, registered version (or the tag's version where it
    is not registered) and precision."""

    tag: str
    version: str
    precision: str


@dataclass
class Outputs:
    """The served graph's outputs for a batch, as the service computes them once: [N, classes] probabilities,
    [N] OOD scores and flags (by the answering model's threshold), [N, D] embeddings (None: not logged)."""

    probabilities: np.ndarray
    ood_score: np.ndarray
    out_of_distribution: np.ndarray
    embedding: np.ndarray | None


@dataclass
class Pending:
    """One request's records, as they leave the event loop: everything else is computed by the writer."""

    ids: list[str]
    time: float
    route: str
    latency_ms: float  # the request's, from its first byte to its answer
    model_ms: float  # the model's run of the batch that answered it
    model: ModelName
    inputs: np.ndarray | None  # uint8 [N,1,28,28]; None: not logged (a challenger's, whose inputs the champion's hold)
    outputs: Outputs


class PredictionLog:
    def __init__(
        self,
        root: Path,
        token: str,
        class_names: list[str],
        keep_inputs: bool,
        queue_requests: int,
        max_bytes: int,
        max_age_s: float,
        on_drop: Callable[[int], None],
        role: str = CHAMPION,
    ):
        self.root = root
        self.folder = root / f"{socket.gethostname()}-{os.getpid()}-{token}"
        self.class_names, self.keep_inputs, self.role = class_names, keep_inputs, role
        self.class_json = json.dumps(class_names)
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
            stop = None in batch
            pending = [p for p in batch if p is not None]
            if pending:
                try:
                    self._write(pending)
                except (OSError, sqlite3.Error) as exc:
                    self._dropped(sum(len(p.ids) for p in pending), f"writing {self.folder} failed: {exc}")
                    self._close_segment()
            if time.monotonic() > self.next_retention:  # after the write, and apart: it never drops a record
                self.next_retention = time.monotonic() + RETAIN_EVERY_S
                with contextlib.suppress(OSError):
                    retain(self.root, self.max_bytes, self.max_age_s)
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
        """One chunk per model that answered the gathered requests."""
        by_model: dict[ModelName, list[Pending]] = {}
        for request in pending:
            by_model.setdefault(request.model, []).append(request)
        for model, requests in by_model.items():
            self._write_chunk(model, requests)
        if self.segment_path.stat().st_size + wal_size(self.segment_path) > self.segment_bytes:
            self._close_segment()
            self.next_retention = 0.0  # right after this write

    def _write_chunk(self, model: ModelName, pending: list[Pending]) -> None:
        counts = [len(p.ids) for p in pending]
        columns = {
            "id": np.array([i for p in pending for i in p.ids]),
            "time": np.repeat([p.time for p in pending], counts),
            "route": np.repeat([p.route for p in pending], counts),
            "latency_ms": np.repeat([p.latency_ms for p in pending], counts).astype(np.float32),
            "model_ms": np.repeat([p.model_ms for p in pending], counts).astype(np.float32),
            "probabilities": np.concatenate([p.outputs.probabilities for p in pending]).astype(np.float32),
            "ood_score": np.concatenate([p.outputs.ood_score for p in pending]).astype(np.float32),
            "out_of_distribution": np.concatenate([p.outputs.out_of_distribution for p in pending]),
        }
        if all(p.outputs.embedding is not None for p in pending):
            columns["embedding"] = np.concatenate([p.outputs.embedding for p in pending]).astype(np.float32)
        if all(p.inputs is not None for p in pending):
            inputs = np.concatenate([p.inputs for p in pending])
            columns["input_sha256"] = np.array([hashlib.sha256(image).hexdigest() for image in inputs])
            columns["statistics"] = input_statistics(inputs)
            if self.keep_inputs:
                columns["model_input"] = inputs
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **columns)
        sequences = [parse_id(i)[1] for p in pending for i in (p.ids[0], p.ids[-1])]
        connection = self._segment()
        with connection:
            connection.execute(
                "INSERT INTO chunks (first_sequence, last_sequence, first_time, last_time, model_tag, precision, "
                "class_names, records, data, model_version, role) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    min(sequences),
                    max(sequences),
                    pending[0].time,
                    pending[-1].time,
                    model.tag,
                    model.precision,
                    self.class_json,
                    sum(counts),
                    buffer.getvalue(),
                    model.version,
                    self.role,
                ),
            )

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
    try:
        return path.with_name(path.name + "-wal").stat().st_size
    except FileNotFoundError:
        return 0


def segments(root: Path) -> list[Path]:
    return sorted(root.glob("*/predictions-*.sqlite"))


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def records(chunk: sqlite3.Row, positions: slice | list[int] | None = None) -> list[dict]:
    """A chunk's records (or those at `positions`), one dict each: the log's fields, blobs as bytes, None for a
    field the chunk does not hold (a challenger's records hold its answers alone)."""
    with np.load(io.BytesIO(chunk["data"]), allow_pickle=False) as data:
        columns = {name: data[name] for name in data.files}
    chosen = slice(None) if positions is None else positions
    picked = {name: values[chosen] for name, values in columns.items()}
    class_names = json.loads(chunk["class_names"])
    probabilities = picked["probabilities"]
    labels = probabilities.argmax(1)
    named = dict(zip(chunk.keys(), chunk, strict=True))  # a segment written before a column existed lacks it
    found = []
    for n in range(len(labels)):
        statistics = picked["statistics"][n].tolist() if "statistics" in picked else [None] * len(STATISTICS)
        record = {
            "id": str(picked["id"][n]),
            "time": float(picked["time"][n]),
            "route": str(picked["route"][n]),
            "role": chunk_role(chunk),
            "model_tag": chunk["model_tag"],
            "model_version": named.get("model_version"),
            "precision": chunk["precision"],
            "input_sha256": str(picked["input_sha256"][n]) if "input_sha256" in picked else None,
            **dict(zip(STATISTICS, statistics, strict=True)),
            "label": int(labels[n]),
            "class_name": class_names[labels[n]],
            "class_names": class_names,  # the served model's: what a label (an index) means
            "confidence": float(probabilities[n, labels[n]]),
            "probabilities": probabilities[n].tobytes(),
            "embedding": picked["embedding"][n].tobytes() if "embedding" in picked else None,
            "ood_score": float(picked["ood_score"][n]),
            "out_of_distribution": bool(picked["out_of_distribution"][n]),
            "latency_ms": float(picked["latency_ms"][n]),
            "model_ms": float(picked["model_ms"][n]) if "model_ms" in picked else None,
            "model_input": picked["model_input"][n].tobytes() if "model_input" in picked else None,
        }
        found.append(record)
    return found


def chunk_role(chunk: sqlite3.Row) -> str:
    """Whose answers a chunk holds (a segment written before roles existed holds the champion's)."""
    return dict(zip(chunk.keys(), chunk, strict=True)).get("role") or CHAMPION


def find_prediction(root: Path, prediction_id: str) -> dict | None:
    """The logged prediction `prediction_id` (a valid id), from the folder its token names."""
    token, sequence = parse_id(prediction_id)
    for path in sorted(root.glob(f"*-{token}/predictions-*.sqlite"), reverse=True):  # recent ones are asked most
        try:
            with contextlib.closing(read_only(path)) as db:
                db.row_factory = sqlite3.Row
                chunks = db.execute(
                    "SELECT * FROM chunks WHERE first_sequence <= ? AND last_sequence >= ?", (sequence, sequence)
                ).fetchall()
        except sqlite3.Error:  # a segment being created or deleted right now
            continue
        for chunk in chunks:
            with np.load(io.BytesIO(chunk["data"]), allow_pickle=False) as data:
                positions = np.flatnonzero(data["id"] == prediction_id).tolist()
            if positions:
                return records(chunk, positions)[0]
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
    `max_age_s`; a segment is closed once its writer has moved on to a newer one or is gone. Every worker runs
    this over the whole root: a segment a sibling deletes meanwhile is simply gone, never an error."""
    now = time.time()
    every = segments(root)
    newest = {}
    for path in every:
        newest[path.parent] = path
    found = {}  # path: (bytes, mtime), for the segments still there
    for path in every:
        with contextlib.suppress(FileNotFoundError):
            found[path] = (path.stat().st_size + wal_size(path), path.stat().st_mtime)
    closed = [p for p in found if newest[p.parent] != p or not writer_alive(p.parent)]
    total = sum(size for size, _ in found.values())
    deleted = []
    for path in sorted(closed, key=lambda p: found[p][1]):
        size, mtime = found[path]
        if total <= max_bytes and now - mtime <= max_age_s:
            continue
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            file.unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted


def read_predictions(
    root: Path, since: float | None = None, last: int | None = None, role: str = CHAMPION
) -> list[dict]:
    """Logged predictions, oldest first (a request's in the order it answered them): from `since` (a Unix time),
    or the `last` N of them, or all; the answers served (`champion`), or the challenger's (`challenger`)."""
    chunks: list[sqlite3.Row] = []
    for path in segments(root):
        try:
            with contextlib.closing(read_only(path)) as db:
                db.row_factory = sqlite3.Row
                where = " WHERE last_time >= ?" if since is not None else ""  # constant SQL; the value is bound
                query = "SELECT * FROM chunks" + where  # noqa: S608 -- two constant strings
                found = db.execute(query, () if since is None else (since,)).fetchall()
        except sqlite3.DatabaseError as exc:  # a segment a power cut damaged, or one being created
            log.warning("prediction log: skipping %s (%s)", path, exc)
            continue
        chunks += [chunk for chunk in found if chunk_role(chunk) == role]
    chunks.sort(key=lambda chunk: chunk["first_time"])
    if last:  # only the newest chunks that hold the last N
        kept, count = [], 0
        for chunk in reversed(chunks):
            if count >= last:
                break
            kept.append(chunk)
            count += chunk["records"]
        chunks = kept[::-1]
    rows = [record for chunk in chunks for record in records(chunk) if since is None or record["time"] >= since]
    rows.sort(key=lambda record: record["time"])  # stable: a request's records keep their order
    return rows[-last:] if last else rows


def read_labels(root: Path) -> list[tuple[float, str, int]]:
    """Every label sent, from every worker's feedback file: (time, prediction id, label), oldest first."""
    labels: list[tuple[float, str, int]] = []
    for path in sorted(root.glob("*/feedback.sqlite")):
        with contextlib.closing(read_only(path)) as db:
            labels += db.execute("SELECT time, prediction_id, label FROM feedback").fetchall()
    return sorted(labels)


def read_feedback(root: Path) -> dict[str, int]:
    """The latest label sent for each prediction."""
    return {prediction_id: label for _, prediction_id, label in read_labels(root)}

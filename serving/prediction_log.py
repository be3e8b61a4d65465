"""The prediction log: one record per answer, as Parquet files any engine reads (DuckDB, pandas, Spark), written
off the request path, never slowing or failing one.

Layout, hive-style (a folder per date and host), the same in the log's folder and, where storage is set, in the
bucket under `prediction-log/` (serving/log_uploads.py):

    predictions/date=2026-12-06/host=<host>/<token>-<pid>-<n>.parquet    one row group per flush
    feedback/date=2026-12-06/host=<host>/<token>-<pid>-<n>.parquet       one label each

Each worker process writes its own files, never one another process writes. A prediction id is the worker's
random 64-bit token and a sequence number, so an id names the files that may hold it. Records leave the event
loop through a bounded queue; a writer thread stores what gathered every FLUSH_S as one part of the worker's
open file (`.open/<token>-<pid>-<n>/`, uncompressed Arrow IPC, which this host's readers read at once), and
every `file_s` seconds, or past a size, closes it: its parts become one Parquet file of one row group each,
under the date it was opened, then uploaded. A closed file is what other hosts see: a prediction served
elsewhere can be labelled once its worker's flush interval (`file_s`) has passed. A full queue or a failing disk
drops records, counted (`on_drop`) and warned about once. Records name the model that answered and its role:
`champion` records are the answers the service gave; `challenger` records, written by the shadow process, are
what the challenger would have answered for the same prediction ids. Retention, by size and by age over the
local folder, deletes the oldest closed files, those not yet uploaded last. docs/monitoring.md documents the
schema.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from serving.log_uploads import UPLOADED, Uploader
from serving.statistics import STATISTICS, input_statistics

log = logging.getLogger("bentoml.serving")
FLUSH_S = 0.2  # how long records gather between two writes: one part (a future row group) per flush
FILE_S = 2.0  # default of SERVING_PREDICTION_LOG_FILE_S: how long a file stays open before others see it
FILES_PER_LOG = 64  # a file is at most this share of the size limit, so retention deletes in small steps
RETAIN_EVERY_S = 600  # retention also runs this often, so a quiet log ages out too
PREDICTIONS, FEEDBACK, OPEN = "predictions", "feedback", ".open"
PART, CLOSING = ".arrow", ".closing-"  # an open file's parts; the name of one being closed
CHAMPION, CHALLENGER = "champion", "challenger"  # whose answers a record holds
FILE_NAME = re.compile(r"^(?P<token>[0-9a-f]{16})-(?P<pid>\d+)-(?P<n>\d+)$")
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("time", pa.float64()),  # Unix seconds, when the answer left
        ("role", pa.string()),
        ("route", pa.string()),
        ("model_tag", pa.string()),
        ("model_version", pa.string()),
        ("precision", pa.string()),
        ("class_names", pa.string()),  # the answering model's, as JSON: what a label (an index) means
        ("label", pa.int16()),
        ("class_name", pa.string()),
        ("confidence", pa.float32()),
        ("probabilities", pa.list_(pa.float32())),
        ("ood_score", pa.float32()),
        ("out_of_distribution", pa.bool_()),
        ("latency_ms", pa.float32()),  # the request's, from its first byte to its answer
        ("model_ms", pa.float32()),  # the model's run of the batch that answered it
        ("input_sha256", pa.string()),
        *[(name, pa.float32()) for name in STATISTICS],
        ("embedding", pa.list_(pa.float32())),
        ("model_input", pa.binary()),  # the 28x28 uint8 pixels the model took
    ]
)
# the columns of few distinct values, dictionary-encoded; encoding ids, hashes and pixels so cost 3 times the CPU
DICTIONARY = ["role", "route", "model_tag", "model_version", "precision", "class_names", "class_name"]
FEEDBACK_SCHEMA = pa.schema(
    [("prediction_id", pa.string()), ("label", pa.int16()), ("time", pa.float64()), ("predicted_label", pa.int16())]
)


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
    latency_ms: float
    model_ms: float
    model: ModelName
    inputs: np.ndarray | None  # uint8 [N,1,28,28]; None: not logged (a challenger's, whose inputs the champion's hold)
    outputs: Outputs


def partition(root: Path, kind: str, when: float) -> Path:
    """The folder of `kind` records written on `when`'s (UTC) date by this host."""
    day = datetime.datetime.fromtimestamp(when, datetime.UTC).date().isoformat()
    return root / kind / f"date={day}" / f"host={socket.gethostname()}"


def list_array(rows: np.ndarray) -> pa.Array:
    """A [N, D] float array as N lists of D float32."""
    flat = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1)
    offsets = np.arange(0, len(rows) * rows.shape[1] + 1, rows.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def binary_array(rows: np.ndarray) -> pa.Array:
    """A [N, ...] uint8 array as N byte strings."""
    data = np.ascontiguousarray(rows, dtype=np.uint8).reshape(len(rows), -1)
    offsets = np.arange(0, data.size + 1, data.shape[1], dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def strings(values: list | np.ndarray) -> pa.Array:
    """Python strings as an Arrow string array (`from_pandas`: pyarrow's typed conversion of a list of strings
    took 100 µs per string, a tenth of a request's CPU)."""
    return pa.array(values, pa.string(), from_pandas=True)


def repeated(values: list, counts: list[int]) -> pa.Array:
    """Each request's string once per record of the request."""
    return strings(np.repeat(np.array(values, dtype=object), counts))


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
        file_s: float = FILE_S,
        storage_url: str | None = None,
        on_upload_failure: Callable[[], None] = lambda: None,
    ):
        self.root, self.name = root, f"{token}-{os.getpid()}"
        self.class_names, self.keep_inputs, self.role = class_names, keep_inputs, role
        self.class_json = json.dumps(class_names)
        self.max_bytes, self.max_age_s, self.file_s = max_bytes, max_age_s, file_s
        self.file_bytes = max(1 << 20, max_bytes // FILES_PER_LOG)
        self.on_drop = on_drop
        self.uploader = Uploader(root, storage_url, on_upload_failure) if storage_url else None
        self.queue: queue.Queue[Pending | None] = queue.Queue(queue_requests)
        self.numbers = itertools.count()
        self.open_parts: Path | None = None
        self.opened_at, self.open_bytes, self.open_count = 0.0, 0, 0
        self.feedback_lock = threading.Lock()
        self.warned = False
        self.next_retention = 0.0
        for folder in sorted((root / OPEN).glob("*")):  # a crashed writer's open file: closed for it
            if not writer_alive(folder.name.removeprefix(CLOSING)):
                with contextlib.suppress(OSError):
                    self._close(folder)
        if self.uploader is not None:  # what a process before this one closed and never uploaded
            closed = [*root.glob(f"{PREDICTIONS}/*/*/*.parquet"), *root.glob(f"{FEEDBACK}/*/*/*.parquet")]
            self.uploader.resume(sorted(p for p in closed if not writer_alive(p.name)))
        self.writer = threading.Thread(target=self._write_forever, name="prediction-log", daemon=True)
        self.writer.start()

    # the event loop's side: one call per request, never blocking

    def record(self, pending: Pending) -> None:
        try:
            self.queue.put_nowait(pending)
        except queue.Full:
            self._dropped(len(pending.ids), f"its queue is full ({self.queue.maxsize} requests)")

    def close(self) -> None:
        """Write what is queued, close the open file, upload what is closed (a few seconds at most), then stop."""
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=5)
        self.writer.join(timeout=10)
        if self.uploader is not None:
            self.uploader.close(timeout=10)

    # the writer thread

    def _dropped(self, count: int, why: str) -> None:
        self.on_drop(count)
        if not self.warned:
            self.warned = True
            log.warning("prediction log: dropping records, %s (counted in serving_prediction_log_dropped_total)", why)

    def _write_forever(self) -> None:
        while True:
            try:
                batch = [self.queue.get(timeout=FLUSH_S)]
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
                    self._write_part(self._table(pending))
                except OSError as exc:
                    self._dropped(sum(len(p.ids) for p in pending), f"writing {self.root} failed: {exc}")
            if self.open_parts is not None and (
                stop or time.monotonic() - self.opened_at >= self.file_s or self.open_bytes > self.file_bytes
            ):
                parts, self.open_parts = self.open_parts, None
                self.next_retention = 0.0  # right after a file closes
                try:
                    self._close(parts)
                except OSError as exc:  # its parts stay, hidden: the next start on this host closes them
                    log.warning("prediction log: closing %s failed: %s", parts, exc)
            if time.monotonic() > self.next_retention:  # apart from the write: it never drops a record
                self.next_retention = time.monotonic() + RETAIN_EVERY_S
                with contextlib.suppress(OSError):
                    retain(self.root, self.max_bytes, self.max_age_s, self.uploader is not None, self.on_drop)
            if stop:
                return
            time.sleep(FLUSH_S)

    def _write_part(self, table: pa.Table) -> None:
        """One flush's records, as the open file's next part: an Arrow IPC file, uncompressed (written under a
        hidden name, then renamed); the Parquet encoding happens once, when the file closes."""
        if self.open_parts is None:
            self.open_parts = self.root / OPEN / f"{self.name}-{next(self.numbers)}"
            self.open_parts.mkdir(parents=True, exist_ok=True)
            self.opened_at, self.open_bytes, self.open_count = time.monotonic(), 0, 0
        part = self.open_parts / f"{self.open_count:06d}{PART}"
        hidden = part.with_name(f".{part.name}")
        with pa.ipc.new_file(hidden, SCHEMA) as writer:
            writer.write_table(table)
        hidden.rename(part)
        self.open_count += 1
        self.open_bytes += table.nbytes

    def _close(self, parts: Path) -> None:
        """An open file's parts as one closed file of one row group each, under the date its first part was
        written; then queued for upload. Hidden while it is made, its parts hidden as soon as it starts."""
        name = parts.name.removeprefix(CLOSING)
        closing = parts if parts.name.startswith(CLOSING) else parts.rename(parts.with_name(CLOSING + name))
        files = sorted(closing.glob(f"[0-9]*{PART}"))
        if files:
            target = partition(self.root, PREDICTIONS, files[0].stat().st_mtime) / f"{name}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            hidden = target.with_name(f".{target.name}")
            with pq.ParquetWriter(hidden, SCHEMA, compression="zstd", use_dictionary=DICTIONARY) as writer:
                for file in files:
                    with pa.memory_map(str(file)) as source:
                        writer.write_table(pa.ipc.open_file(source).read_all())
            hidden.rename(target)
            if self.uploader is not None:
                self.uploader.enqueue(target)
        shutil.rmtree(closing, ignore_errors=True)

    def _table(self, pending: list[Pending]) -> pa.Table:
        counts = [len(p.ids) for p in pending]
        probabilities = np.concatenate([p.outputs.probabilities for p in pending]).astype(np.float32)
        labels = probabilities.argmax(1)
        records = len(labels)
        names = np.array(self.class_names, dtype=object)
        columns: dict[str, pa.Array] = {
            "id": strings([i for p in pending for i in p.ids]),
            "time": pa.array(np.repeat([p.time for p in pending], counts), pa.float64()),
            "role": strings([self.role] * records),
            "route": repeated([p.route for p in pending], counts),
            "model_tag": repeated([p.model.tag for p in pending], counts),
            "model_version": repeated([p.model.version for p in pending], counts),
            "precision": repeated([p.model.precision for p in pending], counts),
            "class_names": strings([self.class_json] * records),
            "label": pa.array(labels.astype(np.int16)),
            "class_name": strings(names[labels]),
            "confidence": pa.array(probabilities[np.arange(records), labels]),
            "probabilities": list_array(probabilities),
            "ood_score": pa.array(np.concatenate([p.outputs.ood_score for p in pending]).astype(np.float32)),
            "out_of_distribution": pa.array(np.concatenate([p.outputs.out_of_distribution for p in pending])),
            "latency_ms": pa.array(np.repeat([p.latency_ms for p in pending], counts).astype(np.float32)),
            "model_ms": pa.array(np.repeat([p.model_ms for p in pending], counts).astype(np.float32)),
        }
        if all(p.outputs.embedding is not None for p in pending):
            columns["embedding"] = list_array(np.concatenate([p.outputs.embedding for p in pending]))
        if all(p.inputs is not None for p in pending):
            inputs = np.concatenate([p.inputs for p in pending])
            columns["input_sha256"] = strings([hashlib.sha256(image).hexdigest() for image in inputs])
            statistics = input_statistics(inputs)
            columns |= {name: pa.array(statistics[:, i]) for i, name in enumerate(STATISTICS)}
            if self.keep_inputs:
                columns["model_input"] = binary_array(inputs)
        return pa.table(
            [columns.get(f.name, pa.nulls(records, f.type)) for f in SCHEMA],
            schema=SCHEMA,  # absent: nulls
        )

    # feedback: the labels people send back for predictions

    def find(self, prediction_id: str) -> dict | None:
        """The logged prediction `prediction_id`, from this host's files (open ones included) or the bucket's,
        waiting one flush interval for one still being written somewhere."""
        from serving.log_queries import find_prediction  # DuckDB, loaded by the first lookup, not at start

        deadline = time.monotonic() + self.file_s + 2 * FLUSH_S
        while True:
            found = find_prediction(self.root, prediction_id)
            if found is None and self.uploader is not None:
                found = find_prediction(self.uploader.url, prediction_id)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(FLUSH_S)

    def store_feedback(self, prediction_id: str, label: int, predicted_label: int) -> None:
        """A label for a prediction, as a file of its own written durably before this returns (a later label
        for the same prediction replaces it), then uploaded."""
        row = {"prediction_id": [prediction_id], "label": [label], "time": [time.time()]}
        table = pa.table(row | {"predicted_label": [predicted_label]}, schema=FEEDBACK_SCHEMA)
        with self.feedback_lock:
            target = partition(self.root, FEEDBACK, time.time()) / f"{self.name}-{next(self.numbers)}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            hidden = target.with_name(f".{target.name}")
            pq.write_table(table, hidden)
            with open(hidden, "rb") as written:
                os.fsync(written.fileno())
            hidden.rename(target)
        if self.uploader is not None:
            self.uploader.enqueue(target)


def writer_alive(name: str) -> bool:
    """Whether the process that writes the file `name` (`<token>-<pid>-<n>`) may still be writing it: it runs
    on this host (every host has a folder of its own)."""
    found = FILE_NAME.match(name.removesuffix(".parquet"))
    if found is None:
        return True
    try:
        os.kill(int(found["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def closed_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"{PREDICTIONS}/*/*/*.parquet"))


def retain(
    root: Path, max_bytes: int, max_age_s: float, uploads: bool = False, on_drop: Callable[[int], None] | None = None
) -> list[Path]:
    """Delete the oldest closed prediction files until the log fits `max_bytes`, and every one older than
    `max_age_s`. With `uploads`, files the bucket holds go first, and one waiting for its upload goes only to
    keep the size limit (its records counted as dropped). Every worker runs this over the whole folder: a file a
    sibling deletes meanwhile is simply gone, never an error."""
    now = time.time()
    found = {}  # path: (bytes, mtime, uploaded)
    for path in closed_files(root):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            found[path] = (stat.st_size, stat.st_mtime, path.with_name(path.name + UPLOADED).exists())
    total = sum(size for size, _, _ in found.values())
    deleted = []
    for path in sorted(found, key=lambda p: (not found[p][2], found[p][1])):  # uploaded first, oldest first
        size, mtime, uploaded = found[path]
        over_size, too_old = total > max_bytes, now - mtime > max_age_s
        if not (over_size or (too_old and (uploaded or not uploads))):
            continue
        if uploads and not uploaded and on_drop is not None:
            with contextlib.suppress(OSError):
                on_drop(pq.ParquetFile(path).metadata.num_rows)
        path.unlink(missing_ok=True)
        path.with_name(path.name + UPLOADED).unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted

"""The prediction log: one record per answer, as Parquet files any engine reads (DuckDB, pandas, Spark), written
off the request path, never slowing or failing one.

Layout, hive-style (a folder per date and host), the same in the log's folder and, where storage is set, in the
bucket under `prediction-log/` (serving/log_uploads.py):

    predictions/date=2026-12-06/host=<host>/<token>-<pid>-<n>.parquet    one row group per flush
    feedback/date=2026-12-06/host=<host>/<token>-<pid>-<n>.parquet       one label each

Each worker process writes its own files, never one another process writes. A prediction id is the worker's
random 64-bit token and a sequence number, so an id names the files that may hold it. Before a request's answer
leaves, its records are appended to the open file's journal (`.open/<token>-<pid>-<n>/journal`: handed to the
operating system, so a killed process loses none of the answers it gave) and queued; a writer thread stores what
gathered every FLUSH_S as one part of the open file (uncompressed Arrow IPC, which this host's readers read at
once), and every `file_s` seconds, or past a size, closes it: its parts become one Parquet file of one row group
each, under the date of its first record, then uploaded. The next start on the host closes a killed worker's
open file from its journal. A closed file is what other hosts see: a prediction served
elsewhere can be labelled once its worker's flush interval (`file_s`) has passed. A full queue or a failing disk
drops records, counted (`on_drop`) and warned about once. Records name the model that answered and its role:
`champion` records are the answers the service gave; `challenger` records, written by the shadow process, are
what the challenger would have answered for the same prediction ids. Retention, by size and by age over the
local folder, deletes the oldest closed files, those not yet uploaded last. docs/monitoring.md documents the
schema.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.log_layout import CHAMPION, FEEDBACK, FILE_NAME, OPEN, PART, PREDICTIONS, partition
from serving.log_records import (
    DICTIONARY,
    JOURNAL_PROTOCOL,
    SCHEMA,
    Pending,
    journal_entry,
    journal_tables,
    records_table,
)
from serving.log_uploads import UPLOADED, Uploader

log = logging.getLogger("bentoml.serving")
FLUSH_S = 0.2  # how long records gather between two writes: one part (a future row group) per flush
FILES_PER_LOG = 64  # a file is at most this share of the size limit, so retention deletes in small steps
RETAIN_EVERY_S = 600  # retention also runs this often, so a quiet log ages out too
CLOSING, JOURNAL = ".closing-", "journal"  # an open file being closed; its journal
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


def part_tables(folder: Path) -> Iterator[pa.Table]:
    for part in sorted(folder.glob(f"[0-9]*{PART}")):
        with pa.memory_map(str(part)) as source:
            yield pa.ipc.open_file(source).read_all()


@contextlib.contextmanager
def published(target: Path) -> Iterator[Path]:
    """A hidden path to write `target` at, renamed to it once written: readers see whole files or none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    hidden = target.with_name(f".{target.name}")
    try:
        yield hidden
    except BaseException:
        hidden.unlink(missing_ok=True)
        raise
    hidden.rename(target)


@dataclass(eq=False)
class OpenFile:
    """A file being written: its folder of parts and journal, the journal's descriptor, what was journalled
    (requests, bytes) and how many of those requests the writer has taken from the queue."""

    folder: Path
    journal: int
    opened_at: float = field(default_factory=time.monotonic)
    requests: int = 0
    bytes: int = 0
    taken: int = 0
    parts: int = 0


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
        file_s: float,
        role: str = CHAMPION,
        storage_url: str | None = None,
        on_upload_failure: Callable[[], None] = lambda: None,
    ):
        self.root, self.name = root, f"{token}-{os.getpid()}"
        self.header = (role, class_names, keep_inputs)  # how records_table makes records of what the journal holds
        self.max_bytes, self.max_age_s, self.file_s = max_bytes, max_age_s, file_s
        self.file_bytes = max(1 << 20, max_bytes // FILES_PER_LOG)
        self.on_drop = on_drop
        self.uploader = Uploader(root, storage_url, on_upload_failure) if storage_url else None
        self.queue: queue.Queue[tuple[OpenFile, Pending] | None] = queue.Queue(queue_requests)
        self.numbers = itertools.count()
        self.lock = threading.Lock()  # the open file, as requests journal into it and the writer closes it
        self.current: OpenFile | None = None
        self.closing: list[OpenFile] = []  # closed to requests, still in the queue
        self.feedback_lock = threading.Lock()
        self.warned = False
        self.next_retention = 0.0
        for folder in sorted((root / OPEN).glob("*")):  # a killed writer's open file: closed for it
            if not writer_alive(folder.name.removeprefix(CLOSING)):
                with contextlib.suppress(OSError):
                    self._close(folder, recovering=True)
        if self.uploader is not None:  # what a process before this one closed and never uploaded
            closed = [*root.glob(f"{PREDICTIONS}/*/*/*.parquet"), *root.glob(f"{FEEDBACK}/*/*/*.parquet")]
            self.uploader.resume(sorted(p for p in closed if not writer_alive(p.name)))
        self.writer = threading.Thread(target=self._write_forever, name="prediction-log", daemon=True)
        self.writer.start()

    # the event loop's side: one call per request, never waiting on the writer

    def record(self, pending: Pending) -> None:
        """Journal a request's records, then queue them for the writer; dropped (and counted) when the queue is
        full or the disk fails."""
        entry = journal_entry(pending)
        with self.lock:
            if self.queue.full():
                self._dropped(len(pending.ids), f"its queue is full ({self.queue.maxsize} requests)")
                return
            try:
                file = self.current if self.current is not None else self._open_file()
                written = os.write(file.journal, entry)
            except OSError as exc:
                self._dropped(len(pending.ids), f"writing {self.root} failed: {exc}")
                return
            if written != len(entry):  # a full disk: the torn entry ends the journal, so the file closes here
                self.closing.append(file)
                self.current = None
                self._dropped(len(pending.ids), f"writing {self.root} failed: the disk is full")
                return
            file.requests += 1
            file.bytes += written
            self.queue.put_nowait((file, pending))

    def _open_file(self) -> OpenFile:
        folder = self.root / OPEN / f"{self.name}-{next(self.numbers)}"
        folder.mkdir(parents=True, exist_ok=True)
        journal = os.open(folder / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(journal, pickle.dumps(self.header, JOURNAL_PROTOCOL))
        self.current = OpenFile(folder, journal)
        return self.current

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
            for file, group in itertools.groupby((item for item in batch if item is not None), lambda i: i[0]):
                pending = [p for _, p in group]
                try:
                    self._write_part(file, records_table(pending, *self.header))
                except OSError as exc:
                    self._dropped(sum(len(p.ids) for p in pending), f"writing {self.root} failed: {exc}")
                file.taken += len(pending)
            with self.lock:
                file = self.current
                if file is not None and (
                    stop or time.monotonic() - file.opened_at >= self.file_s or file.bytes > self.file_bytes
                ):
                    self.closing.append(file)
                    self.current = None
            for file in [f for f in self.closing if f.taken == f.requests]:  # all its records in its parts
                self.closing.remove(file)
                os.close(file.journal)
                self.next_retention = 0.0  # right after a file closes
                try:
                    self._close(file.folder)
                except OSError as exc:  # its folder stays: the next start on this host closes it
                    log.warning("prediction log: closing %s failed: %s", file.folder, exc)
            if time.monotonic() > self.next_retention:  # apart from the write: it never drops a record
                self.next_retention = time.monotonic() + RETAIN_EVERY_S
                with contextlib.suppress(OSError):
                    retain(self.root, self.max_bytes, self.max_age_s, self.uploader is not None, self.on_drop)
            if stop:  # a file with records still queued stays open: the next start closes it from its journal
                return
            time.sleep(FLUSH_S)

    def _write_part(self, file: OpenFile, table: pa.Table) -> None:
        """One flush's records, as the open file's next part: an Arrow IPC file, uncompressed; the Parquet
        encoding happens once, when the file closes."""
        with published(file.folder / f"{file.parts:06d}{PART}") as hidden, pa.ipc.new_file(hidden, SCHEMA) as out:
            out.write_table(table)
        file.parts += 1

    def _close(self, folder: Path, recovering: bool = False) -> None:
        """An open file as one closed file, a row group per part (or, for a killed writer's, from its journal),
        under the date of its first record; then queued for upload. Its folder is hidden as soon as this
        starts; the closed file is the same whichever start closes it."""
        name = folder.name.removeprefix(CLOSING)
        closing = folder if folder.name.startswith(CLOSING) else folder.rename(folder.with_name(CLOSING + name))
        journal = closing / JOURNAL
        tables = journal_tables(journal) if recovering and journal.exists() else part_tables(closing)
        first = next(tables, None)
        if first is not None:
            target = partition(self.root, PREDICTIONS, first["time"][0].as_py()) / f"{name}.parquet"
            with (
                published(target) as hidden,
                pq.ParquetWriter(hidden, SCHEMA, compression="zstd", use_dictionary=DICTIONARY) as writer,
            ):
                writer.write_table(first)
                for table in tables:
                    writer.write_table(table)
            if self.uploader is not None:
                self.uploader.enqueue(target)
        shutil.rmtree(closing, ignore_errors=True)

    # feedback: the labels people send back for predictions

    def find(self, prediction_id: str) -> dict | None:
        """The logged prediction `prediction_id`, from this host's files (open ones included) or the bucket's,
        waiting one flush interval for one still being written somewhere."""
        from common.log_queries import find_prediction  # DuckDB, loaded by the first lookup, not at start

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
            with published(target) as hidden:
                pq.write_table(table, hidden)
                with open(hidden, "rb") as written:
                    os.fsync(written.fileno())
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

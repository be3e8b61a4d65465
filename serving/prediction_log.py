"""The prediction log: one record per answer, as Parquet files any engine reads (DuckDB, pandas, Spark), written
off the request path, never slowing or failing one. common/log_layout.py names its files; common/log_records.py
holds the schema, the records and the journal's entries; docs/monitoring.md documents them.

Each worker process writes its own files, never one another process writes. Before any answer of a batch leaves,
the batch's records are appended, in one write, to the journal of the worker's open file
(`.open/<token>-<pid>-<n>/journal`: handed to the operating system, so a killed process loses none of the answers
it gave, and this host's readers read it at once) and kept in memory; every `file_s` seconds, or past a size, a
writer thread closes the file: its records become one Parquet file of row groups of ROW_GROUP_RECORDS records
(common/log_records.py), under the date of its first record, then
uploaded (serving/log_uploads.py). The next start on the host closes a killed worker's open file from its
journal. A closed file is what other hosts see: a prediction served elsewhere can be labelled once its worker's
file has closed. Records past `queue_requests` waiting for the writer, or a failing disk, are dropped, counted
(`on_drop`) and warned about once. Records name the model that answered and its role: `champion` records are the
answers the service gave; `challenger` records, written by the shadow process, are what the challenger would have
answered for the same prediction ids. Retention, by size and by age over the local folder, deletes the oldest
closed files, those not yet uploaded last.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.log_layout import CHAMPION, FEEDBACK, FILE_NAME, JOURNAL, OPEN, PREDICTIONS, partition
from common.log_records import (
    DICTIONARY,
    SCHEMA,
    Pending,
    journal_entry,
    journal_header,
    journal_tables,
    records_table,
    row_groups,
)
from serving.log_uploads import UPLOADED, Uploader

log = logging.getLogger("bentoml.serving")
FLUSH_S = 0.2  # how often the writer looks for a file to close
# lz4: half zstd's CPU for a fifth more bytes, as the log is written on the serving CPUs; none for the lists of
# floats (probabilities, embeddings), which lz4 does not shrink. Keyed by Parquet column path: a list's values
# are `<name>.list.element`.
COMPRESSION = {f.name: "lz4" for f in SCHEMA if not pa.types.is_list(f.type)} | {
    f"{f.name}.list.element": "none" for f in SCHEMA if pa.types.is_list(f.type)
}
FILES_PER_LOG = 64  # a file is at most this share of the size limit, so retention deletes in small steps
RETAIN_EVERY_S = 600  # retention also runs this often, so a quiet log ages out too
CLOSING = ".closing-"  # an open file being closed
FAILED = ".failed-"  # an open file whose records could not be written: kept, never closed again
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
    """A file being written: its folder, its journal's descriptor and size, and the batches it holds."""

    folder: Path
    journal: int
    opened_at: float = field(default_factory=time.monotonic)
    bytes: int = 0
    batches: list[Pending] = field(default_factory=list)


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
        self.header = (role, class_names, keep_inputs)
        self.max_waiting, self.max_bytes, self.max_age_s, self.file_s = queue_requests, max_bytes, max_age_s, file_s
        self.file_bytes = max(1 << 20, max_bytes // FILES_PER_LOG)
        self.on_drop = on_drop
        self.uploader = Uploader(root, storage_url, on_upload_failure) if storage_url else None
        self.numbers = itertools.count()
        self.lock = threading.Lock()  # the open file, as batches journal into it and the writer takes it
        self.current: OpenFile | None = None
        self.waiting = 0  # requests journalled and not yet in a closed file
        self.stopping = threading.Event()
        self.feedback_lock = threading.Lock()
        self.warned = False
        self.next_retention = 0.0
        self.retention_failure = ""  # the last round's error, if it failed
        for folder in sorted((root / OPEN).glob("*")):  # a killed writer's open file: closed for it
            if not writer_alive(folder.name.removeprefix(CLOSING)):
                self._close_or_keep(folder)
        if self.uploader is not None:  # what a process before this one closed and never uploaded
            closed = [*root.glob(f"{PREDICTIONS}/*/*/*.parquet"), *root.glob(f"{FEEDBACK}/*/*/*.parquet")]
            self.uploader.resume(sorted(p for p in closed if not writer_alive(p.name)))
        self.writer = threading.Thread(target=self._write_forever, name="prediction-log", daemon=True)
        self.writer.start()

    # the event loop's side: one call per batch, never waiting on the writer

    def record(self, pending: Pending) -> None:
        """Journal a batch's records and hold them for the writer; dropped (and counted) past `queue_requests`
        requests waiting or when the disk fails."""
        entry = journal_entry(pending)
        with self.lock:
            if self.waiting >= self.max_waiting:
                self._dropped(len(pending.ids), f"its queue is full ({self.max_waiting} requests)")
                return
            try:
                file = self.current if self.current is not None else self._open_file()
                written = os.write(file.journal, entry)
            except OSError as exc:
                self._dropped(len(pending.ids), f"writing {self.root} failed: {exc}")
                return
            file.bytes += written
            if written != len(entry):  # a full disk: the torn entry ends the journal, so the file ends here
                self.current = None
                self._dropped(len(pending.ids), f"writing {self.root} failed: the disk is full")
                return
            file.batches.append(pending)
            self.waiting += len(pending.requests)

    def _open_file(self) -> OpenFile:
        folder = self.root / OPEN / f"{self.name}-{next(self.numbers)}"
        folder.mkdir(parents=True, exist_ok=True)
        journal = os.open(folder / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(journal, journal_header(*self.header))
        self.current = OpenFile(folder, journal)
        return self.current

    def close(self) -> None:
        """Close the open file, upload what is closed (a few seconds at most), then stop."""
        self.stopping.set()
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
            stop = self.stopping.wait(FLUSH_S)
            with self.lock:
                file = self.current
                due = file is not None and (
                    stop or time.monotonic() - file.opened_at >= self.file_s or file.bytes > self.file_bytes
                )
                if due:
                    self.current = None
            if due and file is not None:  # every record it holds is in its journal; no batch adds one now
                os.close(file.journal)
                self._close_or_keep(file.folder, file.batches)
                with self.lock:
                    self.waiting -= sum(len(batch.requests) for batch in file.batches)
                self.next_retention = 0.0  # right after a file closes
            if time.monotonic() > self.next_retention:  # apart from the write: it never drops a record
                self.next_retention = time.monotonic() + RETAIN_EVERY_S
                try:
                    retain(self.root, self.max_bytes, self.max_age_s, self.uploader is not None, self.on_drop)
                    self.retention_failure = ""
                except Exception as exc:  # the next round tries again; the writer goes on
                    if repr(exc) != self.retention_failure:  # said once, not at every round it repeats
                        log.exception("prediction log: retention over %s failed", self.root)
                    self.retention_failure = repr(exc)
            if stop:  # a record journalled after this stays in an open file: the next start closes it
                return

    def _close_or_keep(self, folder: Path, batches: list[Pending] | None = None) -> None:
        """Close an open file; where the disk fails, its folder stays for the next start on this host. Records that
        cannot become a file at all (any other error) never will: their folder is set aside as `.failed-<name>`
        for whoever looks into it, and counted as dropped, and the writer goes on with the next file."""
        try:
            self._close(folder, batches)
        except OSError as exc:
            log.warning("prediction log: closing %s failed: %s", folder, exc)
        except Exception:
            name = folder.name.removeprefix(CLOSING)
            kept = folder.with_name(FAILED + name)
            log.exception("prediction log: the records of %s cannot be written; journal kept in %s", name, kept)
            with contextlib.suppress(OSError):
                folder.with_name(CLOSING + name).rename(kept)
            self.on_drop(sum(len(batch.ids) for batch in batches or ()))

    def _close(self, folder: Path, batches: list[Pending] | None = None) -> None:
        """An open file's records (`batches`, or a killed writer's from its journal) as one closed file under
        the date of its first record, then queued for upload; its folder is hidden from readers as this starts
        and deleted once the closed file is in place. Whichever start closes it, the closed file is the same."""
        name = folder.name.removeprefix(CLOSING)
        closing = folder if folder.name.startswith(CLOSING) else folder.rename(folder.with_name(CLOSING + name))
        if batches is None:
            tables = journal_tables(closing / JOURNAL)
        else:
            tables = (records_table(group, *self.header) for group in row_groups(batches))
        first = next(tables, None)
        if first is not None:
            target = partition(self.root, PREDICTIONS, first["time"][0].as_py()) / f"{name}.parquet"
            with (
                published(target) as hidden,
                pq.ParquetWriter(hidden, SCHEMA, compression=COMPRESSION, use_dictionary=DICTIONARY) as writer,
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
        waiting for a file still open elsewhere to close (`file_s` and two polls of its writer)."""
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
            with contextlib.suppress(OSError, pa.ArrowException):  # a file it cannot read: deleted, uncounted
                on_drop(pq.ParquetFile(path).metadata.num_rows)
        path.unlink(missing_ok=True)
        path.with_name(path.name + UPLOADED).unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted

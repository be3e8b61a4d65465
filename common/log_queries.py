"""The prediction log read with DuckDB, from a local folder (closed files, and this host's open ones) or from the
bucket (`s3://<bucket>/prediction-log`: every replica's closed files), each query reading only the columns its
caller names. DuckDB's S3 reader is the httpfs extension from PyPI (`duckdb-extension-httpfs`), loaded from its
wheel: DuckDB never downloads an extension here."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import numpy as np
import pyarrow as pa

from common.log_layout import (
    CHAMPION,
    FEEDBACK,
    FILE_NAME,
    JOURNAL,
    OPEN,
    PREDICTIONS,
    PREFIX,
    parse_id,
    prediction_log_dir,
    storage_url,
)
from common.log_records import SCHEMA, journal_tables
from common.statistics import STATISTICS

Location = Path | str  # a local folder, or an s3:// URL
LOG_DIR_HELP = (
    "the prediction log: a folder or an s3:// URL (default: the bucket where storage is set, else the folder)"
)
CONNECTIONS = threading.local()  # DuckDB's, by bucket settings: a connection serves one thread at a time
READ_FILES = "SELECT * FROM read_parquet(?, union_by_name = true, filename = true, file_row_number = true)"
BYTES_COLUMNS = ("probabilities", "embedding")  # lists of float32, handed out as their bytes
RECORD_COLUMNS = (
    "id", "time", "route", "role", "model_tag", "model_version", "precision", "input_sha256", *STATISTICS,
    "label", "class_name", "class_names", "confidence", "probabilities", "embedding", "ood_score",
    "out_of_distribution", "latency_ms", "model_ms", "model_input",
)  # fmt: skip


def in_bucket(where: Location) -> bool:
    return str(where).startswith("s3://")


def log_location(folder: Path, storage_url: str | None) -> Location:
    """Where a reader finds every replica's records: the bucket where storage is set, else `folder`."""
    return f"{storage_url.rstrip('/')}/{PREFIX}" if storage_url else folder


def location(text: str) -> Location:
    """A command line's log location: an s3:// URL as it is, else a folder."""
    return text if in_bucket(text) else Path(text)


def default_location() -> Location:
    """The service's own, as its settings say: SERVING_PREDICTION_LOG_BUCKET (default STORAGE_URL) where set, else
    SERVING_PREDICTION_LOG_DIR (default logs/predictions in the workspace)."""
    folder = os.environ.get("SERVING_PREDICTION_LOG_DIR") or prediction_log_dir()
    return log_location(Path(folder), os.environ.get("SERVING_PREDICTION_LOG_BUCKET") or storage_url())


def bucket_settings() -> tuple[tuple[str, str], ...]:
    """DuckDB's S3 secret from the AWS variables: their endpoint, keys and region."""
    endpoint = urlsplit(os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com"))
    return (
        ("KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID", "")),
        ("SECRET", os.environ.get("AWS_SECRET_ACCESS_KEY", "")),
        ("REGION", os.environ.get("AWS_REGION", "us-east-1")),
        ("ENDPOINT", endpoint.netloc),
        ("USE_SSL", str(endpoint.scheme == "https").lower()),
    )


def connect(where: Location) -> duckdb.DuckDBPyConnection:
    """DuckDB in memory, for the bucket with httpfs and the bucket's settings as its S3 secret: one connection per
    thread and settings, kept (a new one costs 10 ms, 60 ms with httpfs: more than most queries)."""
    settings = bucket_settings() if in_bucket(where) else ()
    kept = CONNECTIONS.__dict__.setdefault("by_settings", {})
    if settings not in kept:
        connection = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
        if settings:
            import duckdb_extension_httpfs

            package = Path(duckdb_extension_httpfs.__file__).parent
            connection.load_extension(str(next(package.glob("extensions/*/httpfs.duckdb_extension"))))
            quoted = ", ".join(f"{name} '{value.replace(chr(39), chr(39) * 2)}'" for name, value in settings)
            connection.execute(f"CREATE SECRET storage (TYPE s3, URL_STYLE 'path', {quoted})")
        kept[settings] = connection
    return kept[settings]


def sources(where: Location, kind: str, token: str | None = None) -> tuple[list[str], list[Path]]:
    """The closed files of `kind` (predictions or feedback), those of one worker's `token` only where given (in the
    bucket, a glob), and in a folder the journals of its open prediction files."""
    name = f"{token}-*.parquet" if token else "*.parquet"
    if in_bucket(where):
        return [f"{str(where).rstrip('/')}/{kind}/*/*/{name}"], []
    root = Path(where)
    closed = [p for p in root.glob(f"{kind}/*/*/{name}") if FILE_NAME.match(p.name.removesuffix(".parquet"))]
    journals: list[Path] = []
    if kind == PREDICTIONS:
        open_files = [p for p in root.glob(f"{OPEN}/{token or ''}*") if FILE_NAME.match(p.name)]
        journals = sorted(folder / JOURNAL for folder in open_files)
    return sorted(str(p) for p in closed), journals


def open_records(journals: list[Path]) -> pa.Table | None:
    """The records of the journals still there (a closing writer moves them), as one table with their file name
    and row numbers, as DuckDB's reader adds them to the closed files' rows."""
    tables = []
    for journal in journals:
        try:
            table = pa.concat_tables(list(journal_tables(journal)) or [SCHEMA.empty_table()])
        except FileNotFoundError:
            continue
        table = table.append_column("filename", pa.array([str(journal)] * len(table), pa.string()))
        tables.append(table.append_column("file_row_number", pa.array(range(len(table)), pa.int64())))
    return pa.concat_tables(tables) if tables else None


def query(where: Location, kind: str, columns: str, tail: str = "", parameters: tuple = (), token: str | None = None):
    """`SELECT columns FROM <the files> tail` as an Arrow table, or None where there are no files. A local file
    that retention or a closing writer moves meanwhile: the listing is taken again."""
    for _ in range(3):
        files, journals = sources(where, kind, token)
        open_rows = open_records(journals)
        if not files and open_rows is None:
            return None
        connection = connect(where)
        selects = []
        if files:
            selects.append(READ_FILES)
        if open_rows is not None:
            connection.register("open_rows", open_rows)
            selects.append("SELECT * FROM open_rows")
        rows = " UNION ALL BY NAME ".join(selects)
        sql = f"SELECT {columns} FROM ({rows}) {tail}"  # noqa: S608 -- the callers' constant SQL; values are bound
        values = [files, *parameters] if files else list(parameters)  # in the order of the `?`s
        try:
            return connection.execute(sql, values).to_arrow_table()
        except duckdb.IOException as exc:
            if "No files found" in str(exc):
                return None
            if in_bucket(where):
                raise
        finally:
            if open_rows is not None:
                connection.unregister("open_rows")
    return None


def as_records(table: pa.Table | None) -> list[dict]:
    """Rows as dicts, the float lists as their bytes and class_names as a list."""
    if table is None:
        return []
    columns = {name: table.column(name) for name in table.column_names if name in RECORD_COLUMNS}
    values = {name: column.to_pylist() for name, column in columns.items() if name not in BYTES_COLUMNS}
    for name in BYTES_COLUMNS:
        if name in columns:
            lists = columns[name].to_pylist()
            values[name] = [None if v is None else np.asarray(v, np.float32).tobytes() for v in lists]
    decoded: dict[str, list] = {}
    if "class_names" in values:
        decoded = {text: json.loads(text) for text in set(values["class_names"])}
        values["class_names"] = [decoded[text] for text in values["class_names"]]
    return [dict(zip(values, row, strict=True)) for row in zip(*values.values(), strict=True)]


def read_predictions(
    where: Location,
    since: float | None = None,
    last: int | None = None,
    role: str = CHAMPION,
    columns: tuple[str, ...] = RECORD_COLUMNS,
    ids: list[str] | None = None,
) -> list[dict]:
    """Logged predictions, oldest first (a request's in the order it answered them): from `since` (a Unix time),
    or the `last` N of them, or all, or those of `ids`; the answers served (`champion`), or the challenger's
    (`challenger`); only `columns` of each."""
    where_sql = "WHERE role = ?" + (" AND time >= ?" if since is not None else "")
    where_sql += " AND list_contains(?, id)" if ids is not None else ""
    parameters = (role,) + ((since,) if since is not None else ()) + ((ids,) if ids is not None else ())
    direction = " DESC" if last else ""
    order = "ORDER BY " + ", ".join(f"{c}{direction}" for c in ("time", "filename", "file_row_number"))
    limit = f" LIMIT {int(last)}" if last else ""
    table = query(where, PREDICTIONS, ", ".join(f'"{c}"' for c in columns), f"{where_sql} {order}{limit}", parameters)
    rows = as_records(table)
    return rows[::-1] if last else rows


def count_predictions(where: Location, role: str = CHAMPION) -> tuple[int, int]:
    """How many records of `role` the log holds, and how many distinct prediction ids: equal where every answer
    was logged once."""
    table = query(where, PREDICTIONS, "count(*) AS records, count(DISTINCT id) AS ids", "WHERE role = ?", (role,))
    if table is None:
        return 0, 0
    return table.column("records")[0].as_py(), table.column("ids")[0].as_py()


def find_prediction(where: Location, prediction_id: str) -> dict | None:
    """The answer logged for `prediction_id` (a valid id), from the files of the worker its token names."""
    token, _ = parse_id(prediction_id)
    columns = ", ".join(f'"{c}"' for c in RECORD_COLUMNS)
    table = query(where, PREDICTIONS, columns, "WHERE id = ? AND role = ? LIMIT 1", (prediction_id, CHAMPION), token)
    found = as_records(table)
    return found[0] if found else None


def read_labels(where: Location) -> list[tuple[float, str, int]]:
    """Every label sent, from every worker (and replica, in the bucket): (time, prediction id, label), oldest
    first."""
    table = query(where, FEEDBACK, "time, prediction_id, label", "ORDER BY time")
    if table is None:
        return []
    return list(zip(*(table.column(c).to_pylist() for c in ("time", "prediction_id", "label")), strict=True))


def read_feedback(where: Location) -> dict[str, int]:
    """The latest label sent for each prediction."""
    return {prediction_id: label for _, prediction_id, label in read_labels(where)}

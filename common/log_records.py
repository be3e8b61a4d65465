"""What a prediction log record is: the schema (docs/monitoring.md's table is made from it), a batch's records
as the service hands them over (Pending), as an Arrow table, and as a journal entry, the form a batch's records
take before any of its answers leaves."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from common.statistics import STATISTICS, input_statistics

JOURNAL_PROTOCOL = 5
ROW_GROUP_RECORDS = 2048  # records per row group of a closed file, in whole batches (a group may hold a few more)
STATISTIC_DOCS = {
    "mean_intensity": "the input's mean pixel (0-1)",
    "ink_fraction": "the share of its pixels that are ink",
    "top": "the ink's first row (-1: no ink)",
    "left": "the ink's first column",
    "bottom": "the ink's last row",
    "right": "the ink's last column",
}


def column(name: str, kind: pa.DataType, doc: str) -> pa.Field:
    """A column and what it holds, kept in the schema (docs/monitoring.md's table is made from it)."""
    return pa.field(name, kind, metadata={"doc": doc})


SCHEMA = pa.schema(
    [
        column("id", pa.string(), "the prediction id the answer gave"),
        column("time", pa.float64(), "Unix seconds when the answer left"),
        column("role", pa.string(), "`champion` (the answer served) or `challenger` (what the shadowed one answered)"),
        column("route", pa.string(), "`/predict`, `/predict_batch`, `/api/...`, `/v2/...`"),
        column("model_tag", pa.string(), "the BentoML tag of the model that answered"),
        column("model_version", pa.string(), "its registered version (or its tag's version where not registered)"),
        column("precision", pa.string(), "`int8` or `fp32`"),
        column("class_names", pa.string(), "that model's class names as a JSON list: what `label` means"),
        column("label", pa.int16(), "the predicted class"),
        column("class_name", pa.string(), "its name"),
        column("confidence", pa.float32(), "its probability"),
        column("probabilities", pa.list_(pa.float32()), "every class's probability, in class order"),
        column("ood_score", pa.float32(), "the out-of-distribution score"),
        column("out_of_distribution", pa.bool_(), "the score past the model's threshold"),
        column("latency_ms", pa.float32(), "the request's time from its first byte to its answer"),
        column("model_ms", pa.float32(), "the model's run of the batch that answered it"),
        column("input_sha256", pa.string(), "the sha256 of the model input (null in a challenger's records)"),
        *[column(name, pa.float32(), f"input statistic: {STATISTIC_DOCS[name]}") for name in STATISTICS],
        column("embedding", pa.list_(pa.float32()), "the model's embedding (null in a challenger's records)"),
        column(
            "model_input",
            pa.binary(),
            "the 784 bytes of the 28x28 model input (null with `SERVING_PREDICTION_LOG_INPUTS=false`)",
        ),
    ]
)


def schema_table() -> str:
    """SCHEMA as the Markdown table docs/monitoring.md shows."""
    rows = ["| column | type | what |", "|---|---|---|"]
    rows += [f"| `{f.name}` | `{f.type}` | {f.metadata[b'doc'].decode()} |" for f in SCHEMA]
    return "\n".join(rows) + "\n"


# the columns of few distinct values, dictionary-encoded; encoding ids, hashes and pixels so cost 3 times the CPU
DICTIONARY = ["role", "route", "model_tag", "model_version", "precision", "class_names", "class_name"]


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


class Request(NamedTuple):
    """A request of a batch, as its records tell it."""

    records: int
    answered_at: float  # Unix time of its answer
    route: str
    latency_ms: float  # from its first byte to its answer


@dataclass
class Pending:
    """A batch's records, as they leave the event loop: its requests in order, their records' ids, the model and
    its time for the batch, the inputs and outputs row by row; everything else is computed by the writer."""

    ids: list[str]
    requests: list[Request]
    model_ms: float
    model: ModelName
    inputs: np.ndarray | None  # uint8 [N,1,28,28]; None: not logged (a challenger's, whose inputs the champion's hold)
    outputs: Outputs


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


def records_table(pending: list[Pending], role: str, class_names: list[str], keep_inputs: bool) -> pa.Table:
    """Batches' records as one table of SCHEMA."""
    counts = [len(p.ids) for p in pending]
    requests = [request for p in pending for request in p.requests]
    per_request = [request.records for request in requests]
    probabilities = np.concatenate([p.outputs.probabilities for p in pending]).astype(np.float32)
    labels = probabilities.argmax(1)
    records = len(labels)
    names = np.array(class_names, dtype=object)
    columns: dict[str, pa.Array] = {
        "id": strings([i for p in pending for i in p.ids]),
        "time": pa.array(np.repeat([request.answered_at for request in requests], per_request), pa.float64()),
        "role": strings([role] * records),
        "route": repeated([request.route for request in requests], per_request),
        "model_tag": repeated([p.model.tag for p in pending], counts),
        "model_version": repeated([p.model.version for p in pending], counts),
        "precision": repeated([p.model.precision for p in pending], counts),
        "class_names": strings([json.dumps(class_names)] * records),
        "label": pa.array(labels.astype(np.int16)),
        "class_name": strings(names[labels]),
        "confidence": pa.array(probabilities[np.arange(records), labels]),
        "probabilities": list_array(probabilities),
        "ood_score": pa.array(np.concatenate([p.outputs.ood_score for p in pending]).astype(np.float32)),
        "out_of_distribution": pa.array(np.concatenate([p.outputs.out_of_distribution for p in pending])),
        "latency_ms": pa.array(np.repeat([request.latency_ms for request in requests], per_request).astype(np.float32)),
        "model_ms": pa.array(np.repeat([p.model_ms for p in pending], counts).astype(np.float32)),
    }
    if all(p.outputs.embedding is not None for p in pending):
        columns["embedding"] = list_array(np.concatenate([p.outputs.embedding for p in pending]))
    if all(p.inputs is not None for p in pending):
        inputs = np.concatenate([p.inputs for p in pending])
        columns["input_sha256"] = strings([hashlib.sha256(image).hexdigest() for image in inputs])
        statistics = input_statistics(inputs)
        columns |= {name: pa.array(statistics[:, i]) for i, name in enumerate(STATISTICS)}
        if keep_inputs:
            columns["model_input"] = binary_array(inputs)
    return pa.table(
        [columns.get(f.name, pa.nulls(records, f.type)) for f in SCHEMA],
        schema=SCHEMA,  # absent: nulls
    )


Packed = tuple[tuple[int, ...], bytes]  # an array in a journal entry: its shape and its bytes


def packed(values: np.ndarray, dtype: type) -> Packed:
    return values.shape, np.ascontiguousarray(values, dtype=dtype).tobytes()


def unpacked(value: Packed, dtype: type) -> np.ndarray:
    shape, data = value
    return np.frombuffer(data, dtype).reshape(shape)


def journal_header(role: str, class_names: list[str], keep_inputs: bool) -> bytes:
    """A journal's first entry: what records_table needs besides the requests."""
    return pickle.dumps((role, class_names, keep_inputs), JOURNAL_PROTOCOL)


def journal_entry(p: Pending) -> bytes:
    """A batch's records as the journal holds them: a pickled tuple of Python values and byte strings only."""
    o, model = p.outputs, p.model
    entry = (
        (p.ids, [tuple(request) for request in p.requests], p.model_ms, model.tag, model.version, model.precision),
        None if p.inputs is None else packed(p.inputs, np.uint8),
        (packed(o.probabilities, np.float32), packed(o.ood_score, np.float32), packed(o.out_of_distribution, bool)),
        None if o.embedding is None else packed(o.embedding, np.float32),
    )
    return pickle.dumps(entry, JOURNAL_PROTOCOL)


def pending_from(entry: tuple) -> Pending:
    (
        (ids, requests, model_ms, tag, version, precision),
        inputs,
        (probabilities, scores, flags),
        embedding,
    ) = entry
    outputs = Outputs(
        unpacked(probabilities, np.float32),
        unpacked(scores, np.float32),
        unpacked(flags, bool),
        None if embedding is None else unpacked(embedding, np.float32),
    )
    images = None if inputs is None else unpacked(inputs, np.uint8)
    requests = [Request(*request) for request in requests]
    return Pending(ids, requests, model_ms, ModelName(tag, version, precision), images, outputs)


class JournalReader(pickle.Unpickler):
    """Reads a journal's entries, which hold no objects but Python's own: any other is refused, not built."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a journal holds no {module}.{name}")


def row_groups(batches: Iterable[Pending], records: int = ROW_GROUP_RECORDS) -> Iterator[list[Pending]]:
    """Whole batches, gathered until they hold `records` records (the last group: what is left)."""
    group: list[Pending] = []
    size = 0
    for batch in batches:
        group.append(batch)
        size += len(batch.ids)
        if size >= records:
            yield group
            group, size = [], 0
    if group:
        yield group


def journal_tables(path: Path) -> Iterator[pa.Table]:
    """A journal's records as tables of about ROW_GROUP_RECORDS records; a torn last entry (one being written, or
    the disk filled mid-write) ends it."""
    with open(path, "rb") as source:
        # a reader per entry: each entry is a pickle of its own, whose references (a route that two requests
        # share) count from its own start, and a reader's memo outlives its load()
        try:
            header = JournalReader(source).load()
        except (EOFError, pickle.UnpicklingError):
            return

        def batches() -> Iterator[Pending]:
            while True:
                try:
                    yield pending_from(JournalReader(source).load())
                except (EOFError, pickle.UnpicklingError, ValueError, TypeError):
                    return

        for group in row_groups(batches()):
            yield records_table(group, *header)

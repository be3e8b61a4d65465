"""The prediction log in-process: records as the service queues them, batches, drops, the Parquet files and
their layout, retention, feedback, files a crashed worker left open."""

import hashlib
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from common.log_layout import CHALLENGER, OPEN
from common.log_queries import find_prediction, read_feedback, read_labels, read_predictions
from common.log_records import ROW_GROUP_RECORDS, SCHEMA, ModelName, Outputs, Pending, Request
from serving.prediction_log import (
    FLUSH_S,
    PredictionIds,
    PredictionLog,
    closed_files,
    retain,
)
from tests.storage_fixtures import start_storage

CLASSES = [f"class {i}" for i in range(10)]
IDS = PredictionIds()
MODEL = ModelName("model:v1", "1", "int8")


def pending(
    count: int, seed: int = 0, route: str = "/predict", ids: PredictionIds = IDS, model: ModelName = MODEL
) -> Pending:
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(10), count).astype(np.float32)
    scores = rng.normal(0, 10, count).astype(np.float32)
    outputs = Outputs(probabilities, scores, scores > 5.0, rng.normal(0, 1, (count, 16)))
    inputs = rng.integers(0, 256, (count, 1, 28, 28), dtype=np.uint8)
    return Pending(ids.take(count), [Request(count, time.time(), route, 3.5)], 1.25, model, inputs, outputs)


def open_log(root, drops: list, ids: PredictionIds = IDS, **changes) -> PredictionLog:
    options = dict(keep_inputs=True, queue_requests=100, max_bytes=64 << 20, max_age_s=3600.0, file_s=60.0)
    options.update(changes)
    return PredictionLog(root, ids.token, CLASSES, on_drop=drops.append, **options)  # type: ignore[arg-type]


def test_every_record_holds_what_the_service_answered_and_the_input(tmp_path):
    drops: list[int] = []
    log = open_log(tmp_path, drops)
    batches = [pending(1, 1), pending(40, 2, "/predict_batch")]
    for batch in batches:
        log.record(batch)
    log.close()
    rows = list(read_predictions(tmp_path))
    assert len(rows) == 41 and drops == []
    first, batch = rows[0], batches[1]
    assert first["id"] == batches[0].ids[0] and first["route"] == "/predict"
    by_id = {row["id"]: row for row in rows}
    row = by_id[batch.ids[7]]
    pixels = batch.inputs[7].tobytes()
    assert row["model_input"] == pixels and row["input_sha256"] == hashlib.sha256(pixels).hexdigest()
    assert row["label"] == int(batch.outputs.probabilities[7].argmax()) and row["class_name"] == CLASSES[row["label"]]
    np.testing.assert_array_equal(np.frombuffer(row["probabilities"], np.float32), batch.outputs.probabilities[7])
    assert np.frombuffer(row["embedding"], np.float32).shape == (16,)
    assert row["out_of_distribution"] == int(batch.outputs.ood_score[7] > 5.0)
    assert (row["model_tag"], row["model_version"], row["precision"]) == ("model:v1", "1", "int8")
    assert (row["latency_ms"], row["model_ms"], row["role"]) == (3.5, 1.25, "champion")
    assert row["mean_intensity"] == pytest.approx(batch.inputs[7].mean() / 255, rel=1e-5)
    (closed,) = closed_files(tmp_path)  # one file: closed when the log closed
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert closed.parent == tmp_path / "predictions" / f"date={day}" / f"host={socket.gethostname()}"
    assert closed.name == f"{IDS.token}-{os.getpid()}-0.parquet"
    assert pq.read_schema(closed).remove_metadata() == SCHEMA
    assert not list((tmp_path / OPEN).iterdir())
    # any engine reads it: DuckDB, with hive partitions from the path
    query = "SELECT DISTINCT host FROM read_parquet(?, hive_partitioning = true)"
    hosts = duckdb.execute(query, [f"{tmp_path}/predictions/*/*/*.parquet"]).fetchall()
    assert hosts == [(socket.gethostname(),)]


def test_records_are_read_at_once_and_their_file_closes_after_its_interval_in_row_groups(tmp_path):
    """Records are found on this host as soon as their answer left, before their file closes (from its journal);
    the file closes after `file_s` even with no more traffic, in row groups of whole batches, ROW_GROUP_RECORDS
    records or a little more."""
    log = open_log(tmp_path, [], file_s=1.5, queue_requests=1000)
    first = pending(3, 1)
    log.record(first)
    assert find_prediction(tmp_path, first.ids[1])["id"] == first.ids[1]  # from the open file's journal
    assert closed_files(tmp_path) == []
    rest = [pending(8, seed) for seed in range(ROW_GROUP_RECORDS // 8 + 1)]
    for batch in rest:
        log.record(batch)
    time.sleep(1.5 + 4 * FLUSH_S)
    (closed,) = closed_files(tmp_path)
    groups = pq.ParquetFile(closed).metadata
    sizes = [groups.row_group(i).num_rows for i in range(groups.num_row_groups)]
    assert sizes == [3 + ROW_GROUP_RECORDS, 8]  # the first group reached its size within its last batch
    ids = [i for batch in [first, *rest] for i in batch.ids]
    assert [r["id"] for r in read_predictions(tmp_path, columns=("id",))] == ids
    log.close()


def test_an_open_files_records_read_back_as_written_when_requests_of_a_batch_share_values(tmp_path):
    """The requests of a batch share one route object and one answer time, as the service builds them; read from
    the open file's journal, batch after batch, each record still holds its own request's values."""
    log = open_log(tmp_path, [])
    route, answered_at = "/predict", time.time()
    batches = [pending(3, seed) for seed in range(3)]
    expected = []
    for batch in batches:
        batch.requests = [Request(1, answered_at, route, 2.0), Request(2, answered_at, route, 4.0)]
        log.record(batch)
        expected += [(batch.ids[0], route, 2.0), (batch.ids[1], route, 4.0), (batch.ids[2], route, 4.0)]

    def read() -> list[tuple]:
        rows = read_predictions(tmp_path, columns=("id", "route", "latency_ms"))
        return sorted((row["id"], row["route"], row["latency_ms"]) for row in rows)

    assert read() == expected  # from the journal
    log.close()
    assert read() == expected  # from the closed file


def test_an_id_finds_its_record_among_every_workers_log(tmp_path):
    workers = [PredictionIds() for _ in range(3)]
    logs = [open_log(tmp_path, [], ids) for ids in workers]
    batches = [[pending(4, 10 * w + i, ids=ids) for i in range(5)] for w, ids in enumerate(workers)]
    for log, requests in zip(logs, batches, strict=True):
        for request in requests:
            log.record(request)
            time.sleep(0.05)  # several chunks per worker
        log.close()
    for requests in batches:
        for request in (requests[0], requests[-1]):
            found = find_prediction(tmp_path, request.ids[2])
            assert found is not None and found["id"] == request.ids[2]
            assert found["model_input"] == request.inputs[2].tobytes()
    never_taken = workers[0].token + f"{10**6:016x}"
    assert find_prediction(tmp_path, never_taken) is None and find_prediction(tmp_path, "0" * 32) is None


def test_inputs_are_left_out_when_asked(tmp_path):
    log = open_log(tmp_path, [], keep_inputs=False)
    log.record(pending(3))
    log.close()
    assert [row["model_input"] for row in read_predictions(tmp_path)] == [None] * 3


def test_a_full_queue_drops_records_counts_them_and_never_blocks(tmp_path):
    drops: list[int] = []
    log = open_log(tmp_path, drops, queue_requests=1)
    started = time.perf_counter()
    for i in range(200):
        log.record(pending(5, i))
    assert time.perf_counter() - started < 5  # never waits for the writer
    log.close()
    written = len(list(read_predictions(tmp_path)))
    assert sum(drops) > 0 and written + sum(drops) == 1000


def test_an_unwritable_folder_drops_every_record_and_warns_once(tmp_path, caplog):
    root = tmp_path / "log"
    root.write_text("a file where the folder should be")
    drops: list[int] = []
    log = open_log(root, drops)
    for i in range(3):
        log.record(pending(4, i))
        time.sleep(0.3)
    log.close()
    assert sum(drops) == 12
    assert len([r for r in caplog.records if "dropping records" in r.getMessage()]) == 1


def test_records_that_cannot_be_written_are_set_aside_and_counted_and_the_writer_goes_on(tmp_path, caplog):
    drops: list[int] = []
    log = open_log(tmp_path, drops, file_s=0.2)
    broken = pending(2, 1)
    broken.outputs.probabilities = broken.outputs.probabilities[:1]  # fewer rows than ids: no table can hold it
    log.record(broken)
    wait_for(lambda: drops == [2])
    served = pending(3, 2)
    log.record(served)
    log.close()
    assert [row["id"] for row in read_predictions(tmp_path)] == served.ids
    (kept,) = (tmp_path / OPEN).iterdir()
    assert kept.name.startswith(".failed-") and (kept / "journal").stat().st_size > 0
    assert any("cannot be written" in r.getMessage() for r in caplog.records)
    open_log(tmp_path, drops).close()  # the next start leaves it where it is, closing nothing
    assert list((tmp_path / OPEN).iterdir()) == [kept] and len(closed_files(tmp_path)) == 1


def test_retention_deletes_the_oldest_closed_files_first(tmp_path):
    log = open_log(tmp_path, [], max_bytes=1 << 20)  # files of 1 MiB, the smallest
    requests = [pending(64, i) for i in range(60)]  # ~60 kB each: random pixels do not compress
    for request in requests:
        log.record(request)
        time.sleep(FLUSH_S / 2)
    log.close()
    kept = closed_files(tmp_path)
    assert sum(p.stat().st_size for p in kept) <= 1 << 20
    remaining = [r["id"] for r in read_predictions(tmp_path, columns=("id",))]
    assert remaining[-1] == requests[-1].ids[-1] and requests[0].ids[0] not in remaining  # the oldest went
    old = kept[-1]
    os.utime(old, (0, 0))
    assert retain(tmp_path, max_bytes=1 << 30, max_age_s=3600) == [old]  # past the age limit


def write_and_kill(root: str, sent) -> None:
    """A worker that logs two requests, then is killed (SIGKILL) before their file closes."""
    ids = PredictionIds()
    first, second = pending(4, 1, ids=ids), pending(3, 2, ids=ids)
    log = open_log(Path(root), [], ids=ids)
    log.record(first)
    log.record(second)
    sent.send(first.ids + second.ids)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_workers_open_file_is_closed_by_the_next_start_with_every_record_it_answered(tmp_path):
    context = multiprocessing.get_context("spawn")
    received, sent = context.Pipe(duplex=False)
    worker = context.Process(target=write_and_kill, args=(str(tmp_path), sent))
    worker.start()
    written = received.recv()
    worker.join(30)
    assert worker.exitcode == -signal.SIGKILL
    (folder,) = (tmp_path / OPEN).iterdir()  # its process is gone; its file was never closed
    assert find_prediction(tmp_path, written[-1]) is not None  # this host reads its journal meanwhile
    open_log(tmp_path, []).close()
    rows = list(read_predictions(tmp_path))
    assert [r["id"] for r in rows] == written
    second = pending(3, 2)  # the second request, made again
    for row, image, probabilities in zip(rows[4:], second.inputs, second.outputs.probabilities, strict=True):
        assert row["model_input"] == image.tobytes() and row["latency_ms"] == 3.5
        np.testing.assert_array_equal(np.frombuffer(row["probabilities"], np.float32), probabilities)
    assert [p.name for p in closed_files(tmp_path)] == [f"{folder.name}.parquet"]
    assert not list((tmp_path / OPEN).iterdir())


def test_feedback_keeps_the_latest_label_for_each_prediction(tmp_path):
    log = open_log(tmp_path, [])
    log.store_feedback("a" * 32, 3, 3)
    log.store_feedback("b" * 32, 1, 2)
    log.store_feedback("a" * 32, 4, 3)  # a second label replaces the first
    log.close()
    assert read_feedback(tmp_path) == {"a" * 32: 4, "b" * 32: 1}
    assert [label for _, _, label in read_labels(tmp_path)] == [3, 1, 4]
    assert len(list(tmp_path.glob("feedback/date=*/host=*/*.parquet"))) == 3  # each durable on its own


def test_a_window_by_time_or_by_count(tmp_path):
    log = open_log(tmp_path, [])
    first = pending(5, 1)
    first.requests = [Request(5, 1000.0, "/predict", 3.5)]
    second = pending(5, 2)
    log.record(first)
    log.record(second)
    log.close()
    assert len(list(read_predictions(tmp_path, since=2000.0))) == 5
    assert [r["id"] for r in read_predictions(tmp_path, last=3)] == second.ids[2:]


def test_each_record_names_the_model_that_answered_and_a_challengers_are_read_apart(tmp_path):
    """A swap between two requests of one flush: each record keeps its model; the shadow process's records
    (role challenger, no inputs) share the champion's ids and are not read as answers."""
    drops: list[int] = []
    log = open_log(tmp_path, drops)
    old, new = pending(3, 1), pending(2, 2, model=ModelName("model:v2", "2", "int8"))
    log.record(old)
    log.record(new)
    log.close()
    shadow_ids = PredictionIds()
    shadow = open_log(tmp_path, drops, ids=shadow_ids, keep_inputs=False, role=CHALLENGER)
    answered = pending(3, 3, model=ModelName("model:v3", "3", "int8"))
    answered.ids, answered.inputs = old.ids, None
    answered.outputs.embedding = None
    shadow.record(answered)
    shadow.close()
    rows = read_predictions(tmp_path)
    assert [(r["id"], r["model_version"]) for r in rows] == [(i, "1") for i in old.ids] + [(i, "2") for i in new.ids]
    challenger = read_predictions(tmp_path, role=CHALLENGER)
    assert [(r["id"], r["model_version"], r["role"]) for r in challenger] == [(i, "3", CHALLENGER) for i in old.ids]
    assert challenger[0]["model_input"] is None and challenger[0]["embedding"] is None
    assert challenger[0]["input_sha256"] is None and drops == []
    assert find_prediction(tmp_path, old.ids[0])["model_version"] == "1"  # feedback finds the answer served


def retain_all(root: str) -> str:
    """One worker's retention over a shared folder, everything past its limit: what went wrong, if anything."""
    try:
        retain(Path(root), max_bytes=0, max_age_s=3600)
    except OSError as exc:
        return repr(exc)
    return ""


def test_retention_by_sibling_workers_at_once_never_fails_on_a_file_the_other_deleted(tmp_path):
    """Every worker runs retention over the whole folder: one deletes a file another has just listed."""
    folder = tmp_path / "predictions" / "date=1970-01-01" / f"host={socket.gethostname()}"
    folder.mkdir(parents=True)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        for _ in range(3):
            for worker in range(4):
                for n in range(150):
                    (folder / f"{worker:016x}-999999999-{n}.parquet").write_bytes(b"x" * 4096)
            assert pool.map(retain_all, [str(tmp_path)] * 8) == [""] * 8
            assert closed_files(tmp_path) == []


@pytest.mark.slow
def test_closed_files_go_to_the_bucket_and_wait_there_while_it_is_away(tmp_path, monkeypatch):
    """SeaweedFS as `make storage` runs it: each closed file and label lands under the same key in the bucket
    (readable there with DuckDB); while the store is stopped the log keeps its files, counts the failed tries,
    and uploads them when the store is back, every record exactly once."""
    store = start_storage(tmp_path / "storage")
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    failures: list[int] = []
    root = tmp_path / "log"
    log = open_log(
        root, [], file_s=0.5, storage_url=store.env["STORAGE_URL"], on_upload_failure=lambda: failures.append(1)
    )
    bucket = f"{store.env['STORAGE_URL']}/prediction-log"
    try:
        before = pending(5, 1)
        log.record(before)
        log.store_feedback(before.ids[0], 3, 2)
        wait_for(lambda: len(store.keys("prediction-log/")) == 2)
        assert sorted(key.split("/")[1] for key in store.keys("prediction-log/")) == ["feedback", "predictions"]
        assert [r["id"] for r in read_predictions(bucket)] == before.ids
        assert read_feedback(bucket) == {before.ids[0]: 3}

        store.close()
        during = pending(7, 2)
        log.record(during)
        wait_for(lambda: len(closed_files(root)) == 2 and len(failures) >= 2)
        assert not Path(f"{closed_files(root)[-1]}.uploaded").exists()  # kept, waiting

        store = start_storage(tmp_path / "storage", port=store.server.port)
        wait_for(lambda: len(store.keys("prediction-log/predictions/")) == 2, timeout=60)
        ids = [r["id"] for r in read_predictions(bucket)]
        assert ids == before.ids + during.ids  # each once
    finally:
        log.close()
        store.close()


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.25)

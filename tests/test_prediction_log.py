"""The prediction log in-process: records as the service queues them, batches, drops, retention, feedback."""

import hashlib
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from serving.prediction_log import (
    CHALLENGER,
    ModelName,
    Outputs,
    Pending,
    PredictionIds,
    PredictionLog,
    find_prediction,
    read_feedback,
    read_predictions,
    retain,
    segments,
)

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
    return Pending(ids.take(count), time.time(), route, 3.5, 1.25, model, inputs, outputs)


def open_log(root, drops: list, ids: PredictionIds = IDS, **changes) -> PredictionLog:
    options = dict(keep_inputs=True, queue_requests=100, max_bytes=64 << 20, max_age_s=3600.0)
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
    assert [p.parent for p in segments(tmp_path)] == [log.folder] and log.folder.name.endswith(IDS.token)


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


def test_retention_deletes_the_oldest_closed_segments_but_never_one_being_written(tmp_path):
    log = open_log(tmp_path, [], max_bytes=1 << 20)  # segments of 1 MiB, the smallest
    for i in range(60):
        log.record(pending(64, i))  # ~70 kB each
        time.sleep(0.01)
    log.close()
    kept = segments(tmp_path)
    assert sum(p.stat().st_size for p in kept) <= 2 << 20  # the limit, give or take the newest segment
    remaining = len(list(read_predictions(tmp_path)))
    assert 0 < remaining < 60 * 64  # the oldest went
    # a segment older than any age limit is kept while its writer (this process) may append to it; a dead
    # writer's goes
    for pid in (os.getpid(), 999999999):
        folder = tmp_path / f"{os.uname().nodename}-{pid}-{PredictionIds().token}"
        folder.mkdir()
        sqlite3.connect(folder / "predictions-19700101T000000-1.sqlite").close()
        os.utime(folder / "predictions-19700101T000000-1.sqlite", (0, 0))
    deleted = retain(tmp_path, max_bytes=1 << 30, max_age_s=3600)
    assert [p.parent.name.split("-")[-2] for p in deleted] == ["999999999"]


def test_feedback_keeps_the_latest_label_for_each_prediction(tmp_path):
    log = open_log(tmp_path, [])
    log.store_feedback("a" * 32, 3, 3)
    log.store_feedback("b" * 32, 1, 2)
    log.store_feedback("a" * 32, 4, 3)  # a second label replaces the first
    log.close()
    assert read_feedback(tmp_path) == {"a" * 32: 4, "b" * 32: 1}


def test_a_window_by_time_or_by_count(tmp_path):
    log = open_log(tmp_path, [])
    first = pending(5, 1)
    first.time = 1000.0
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
    """One worker's retention over a shared root, everything closed past its limit: what went wrong, if anything."""
    try:
        retain(Path(root), max_bytes=0, max_age_s=3600)
    except OSError as exc:
        return repr(exc)
    return ""


def test_retention_by_sibling_workers_at_once_never_fails_on_a_segment_the_other_deleted(tmp_path):
    """Every worker runs retention over the whole root: one deletes a segment another has just listed."""
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        for _ in range(3):
            for worker in range(4):
                folder = tmp_path / f"{os.uname().nodename}-999999999-{worker:016x}"  # a writer that is gone
                folder.mkdir(exist_ok=True)
                for n in range(150):
                    (folder / f"predictions-19700101T000000-{n}.sqlite").write_bytes(b"x" * 4096)
                    (folder / f"predictions-19700101T000000-{n}.sqlite-wal").write_bytes(b"x" * 4096)
            assert pool.map(retain_all, [str(tmp_path)] * 8) == [""] * 8
            assert segments(tmp_path) == []

"""The adaptive batcher, with a model that records the batches it is given."""

import asyncio
import threading

import numpy as np
import pytest

from serving.batcher import MicroBatcher


class RecordingModel:
    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        if self.fail:
            raise RuntimeError("model failed")
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True) * 2  # a per-image answer


def requests(count: int, size: int = 1) -> list[np.ndarray]:
    return [np.full((size, 1, 2, 2), i, dtype=np.int64) for i in range(count)]


async def call_all(batcher: MicroBatcher, inputs: list[np.ndarray]) -> list:
    async def one(images):
        with batcher.tracked():
            await asyncio.sleep(0)
            return await batcher(images)

    return await asyncio.gather(*(one(images) for images in inputs), return_exceptions=True)


def test_concurrent_calls_share_batches_and_each_gets_its_own_answer():
    model = RecordingModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    inputs = requests(20) + requests(3, size=3)
    outputs = asyncio.run(call_all(batcher, inputs))
    for images, output in zip(inputs, outputs, strict=True):
        assert output.model is model and output.model_ms >= 0
        assert (output.rows == images.reshape(len(images), -1).sum(axis=1, keepdims=True) * 2).all()
    assert sum(model.batches) == 29 and max(model.batches) <= 8 and len(model.batches) < 23


def test_a_call_larger_than_the_batch_limit_runs_alone():
    model = RecordingModel()
    outputs = asyncio.run(call_all(MicroBatcher(model, max_batch_size=4), requests(2, size=10)))
    assert model.batches == [10, 10] and [len(o.rows) for o in outputs] == [10, 10]


def test_a_lone_request_runs_at_once_without_the_model_thread():
    model = RecordingModel()
    batcher = MicroBatcher(model, max_batch_size=8)
    outputs = asyncio.run(call_all(batcher, requests(1)))
    assert model.batches == [1] and batcher.runner is None and outputs[0].rows.shape == (1, 1)


def test_every_caller_of_a_failed_batch_gets_the_error():
    outputs = asyncio.run(call_all(MicroBatcher(RecordingModel(fail=True), max_batch_size=8), requests(5)))
    assert all(isinstance(o, RuntimeError) and str(o) == "model failed" for o in outputs)


def test_callers_that_went_away_are_not_computed_for():
    model = RecordingModel()
    batcher = MicroBatcher(model, max_batch_size=64)

    async def scenario():
        with batcher.tracked(), batcher.tracked():  # two requests in flight: the batching path
            first = asyncio.create_task(batcher(requests(1)[0]))
            await asyncio.sleep(0)
            gone = [asyncio.create_task(batcher(images)) for images in requests(5, size=2)]
            await asyncio.sleep(0)
            for task in gone:
                task.cancel()
            await first
            await asyncio.gather(*gone, return_exceptions=True)

    asyncio.run(scenario())
    assert sum(model.batches) == 1  # the five cancelled calls never reached the model


@pytest.mark.parametrize("size", [1, 5])
def test_the_batch_size_observer_sees_every_batch(size):
    seen = []
    model = RecordingModel()
    asyncio.run(call_all(MicroBatcher(model, max_batch_size=64, on_batch=seen.append), requests(size)))
    assert seen == model.batches


def test_a_model_swapped_in_serves_the_next_batch_and_the_running_one_finishes_on_the_old():
    old, new = RecordingModel(), RecordingModel()
    batcher = MicroBatcher(old, max_batch_size=4)

    async def scenario():
        with batcher.tracked(), batcher.tracked():
            first = [asyncio.create_task(batcher(images)) for images in requests(4)]
            while not old.batches:  # the first batch has started on `old`
                await asyncio.sleep(0.001)
            batcher.model = new
            later = [asyncio.create_task(batcher(images)) for images in requests(4)]
            return await asyncio.gather(*first), await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert {a.model for a in first} == {old} and {a.model for a in later} == {new}
    assert sum(old.batches) == 4 and sum(new.batches) == 4


class Observed:
    """An `on_answered` that keeps each batch's notes and rows, and checks that none of its callers resumed yet."""

    def __init__(self):
        self.batches: list[list[tuple[int, list]]] = []
        self.resumed: set[int] = set()

    def __call__(self, images, answered, calls) -> None:
        assert not self.resumed & {note for note, _ in calls}
        self.batches.append([(note, answered.rows[rows].ravel().tolist()) for note, rows in calls])


def answer_all(batcher: MicroBatcher, observed: Observed, inputs: list[np.ndarray]) -> list:
    async def one(note, images):
        with batcher.tracked():
            await asyncio.sleep(0)
            answer = await batcher(images, note)
            observed.resumed.add(note)
            return answer.rows.ravel().tolist()

    async def every():
        return await asyncio.gather(*(one(note, images) for note, images in enumerate(inputs)))

    return asyncio.run(every())


@pytest.mark.parametrize("inputs", [requests(1), requests(12) + requests(2, size=3)], ids=["lone", "batched"])
def test_each_batch_is_seen_once_before_its_callers_resume_with_each_callers_note_and_rows(inputs):
    observed, model = Observed(), RecordingModel()
    outputs = answer_all(MicroBatcher(model, max_batch_size=8, on_answered=observed), observed, inputs)
    assert [sum(len(rows) for _, rows in batch) for batch in observed.batches] == model.batches
    assert sorted(note for batch in observed.batches for note, _ in batch) == list(range(len(inputs)))
    assert all(rows == outputs[note] for batch in observed.batches for note, rows in batch)


def test_a_caller_that_went_away_while_its_batch_ran_is_not_among_those_answered():
    started, go_on = threading.Event(), threading.Event()

    class Held(RecordingModel):
        def __call__(self, images):
            started.set()
            go_on.wait(10)
            return super().__call__(images)

    observed = Observed()
    batcher = MicroBatcher(Held(), max_batch_size=8, on_answered=observed)

    async def scenario():
        with batcher.tracked(), batcher.tracked():
            calls = [asyncio.create_task(batcher(images, note)) for note, images in enumerate(requests(3))]
            while not started.is_set():
                await asyncio.sleep(0.001)
            calls[1].cancel()
            go_on.set()
            return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(scenario())
    assert isinstance(answers[1], asyncio.CancelledError)
    assert [[note for note, _ in batch] for batch in observed.batches] == [[0, 2]]

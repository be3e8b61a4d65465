"""Adaptive batching in the worker's event loop, with no waiting: the requests that arrive while the model
is busy form its next batch. A lone request runs at once; under load, batches grow by themselves.

The model can be replaced while requests are served (`batcher.model = new`): each batch runs on the model that
was in place when it started, and every caller learns which one answered it. `on_answered` sees each batch once,
before any of its callers resumes: the prediction log records a batch in one write, not one per request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

Model = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Answered:
    """A call's share of a batch: the model that ran it, its output rows, and how long the batch took."""

    model: Model
    rows: np.ndarray
    model_ms: float


# a batch as `on_answered` sees it: its images, its answer, and each waiting caller's note and rows in it
OnAnswered = Callable[[np.ndarray, Answered, list[tuple[Any, slice]]], None]


class MicroBatcher:
    """`await batcher(images, note)` -> Answered: the model's output for those images, computed in a batch with the
    images of other concurrent calls (at most `max_batch_size` images, or one larger call on its own). The
    model runs on one dedicated thread, so the event loop keeps parsing requests meanwhile."""

    def __init__(
        self,
        model: Model,
        max_batch_size: int,
        on_batch: Callable[[int], None] = lambda size: None,
        on_answered: OnAnswered = lambda images, answered, notes: None,
    ):
        self.model = model
        self.callers = 0  # requests between `tracked()` and their answer: the load on this worker
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.on_answered = on_answered
        self.pending: deque[tuple[np.ndarray, Any, asyncio.Future[Answered]]] = deque()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.runner: asyncio.Task | None = None

    async def __call__(self, images: np.ndarray, note: Any = None) -> Answered:
        if len(images) == 1 and self._idle():
            await asyncio.sleep(0)  # requests already received get to announce themselves first
            if self._idle() and self.callers <= 1:
                # the only request in this worker: nothing to batch or overlap with, and a hop to the model
                # thread would only add latency
                self.on_batch(1)
                answered = run(self.model, images)
                self.on_answered(images, answered, [(note, slice(0, 1))])
                return answered
        future: asyncio.Future[Answered] = asyncio.get_running_loop().create_future()
        self.pending.append((images, note, future))
        if self._idle():
            self.runner = asyncio.create_task(self._run_pending())
        return await future

    def _idle(self) -> bool:
        return self.runner is None or self.runner.done()

    @contextlib.contextmanager
    def tracked(self):
        """Around a whole request (parsing included), so that the batcher knows whether others are coming."""
        self.callers += 1
        try:
            yield
        finally:
            self.callers -= 1

    def _next_batch(self) -> list[tuple[np.ndarray, Any, asyncio.Future[Answered]]]:
        batch: list[tuple[np.ndarray, Any, asyncio.Future[Answered]]] = []
        size = 0
        while self.pending:
            images, note, future = self.pending[0]
            if batch and size + len(images) > self.max_batch_size:
                break
            self.pending.popleft()
            if not future.done():  # a client that went away is not computed for
                batch.append((images, note, future))
                size += len(images)
        return batch

    async def _run_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            batch = self._next_batch()
            if not batch:
                continue
            images = batch[0][0] if len(batch) == 1 else np.concatenate([item[0] for item in batch])
            self.on_batch(len(images))
            ends = np.cumsum([len(part) for part, _, _ in batch]).tolist()
            parts = [slice(end - len(part), end) for (part, _, _), end in zip(batch, ends, strict=True)]
            try:
                answered = await loop.run_in_executor(self.executor, run, self.model, images)
                calls = zip(batch, parts, strict=True)
                self.on_answered(images, answered, [(note, rows) for (_, note, wait), rows in calls if not wait.done()])
            except Exception as exc:  # every caller of a failed batch gets the error
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), rows in zip(batch, parts, strict=True):
                if not future.done():
                    future.set_result(Answered(answered.model, answered.rows[rows], answered.model_ms))


def run(model: Model, images: np.ndarray) -> Answered:
    """One batch on `model` (the one in place when it starts: a swap meanwhile does not touch it)."""
    started = time.perf_counter()
    rows = model(images)
    return Answered(model, rows, (time.perf_counter() - started) * 1000)

"""Adaptive batching in the worker's event loop, with no waiting: the requests that arrive while the model
is busy form its next batch. A lone request runs at once; under load, batches grow by themselves."""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


class MicroBatcher:
    """`await batcher(images)` -> the model's output for those images, computed in a batch with the images
    of other concurrent calls (at most `max_batch_size` images, or one larger call on its own). The model
    runs on one dedicated thread, so the event loop keeps parsing requests meanwhile."""

    def __init__(self, model: Callable[[np.ndarray], np.ndarray], max_batch_size: int,
                 on_batch: Callable[[int], None] = lambda size: None):
        self.model = model
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.runner: asyncio.Task | None = None

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((images, future))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run_pending())
        return await future

    def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch, size = [], 0
        while self.pending:
            images, future = self.pending[0]
            if batch and size + len(images) > self.max_batch_size:
                break
            self.pending.popleft()
            if not future.done():  # a client that went away is not computed for
                batch.append((images, future))
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
            try:
                outputs = await loop.run_in_executor(self.executor, self.model, images)
            except Exception as exc:  # every caller of a failed batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for part, future in batch:
                if not future.done():
                    future.set_result(outputs[start: start + len(part)])
                start += len(part)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

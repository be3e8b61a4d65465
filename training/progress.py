"""Progress of long work: a bar on a terminal; in logs and CI, where a bar is noise, one line per step."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "step", terminal: bool | None = None
) -> Iterator[T]:
    """Yield `items`; report each one done: a tqdm bar when stderr is a terminal, else a line on stderr
    (`desc: step 3/8 done, 12.5 s`) after each step."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    if on_terminal() if terminal is None else terminal:
        yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)
        return
    started = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        print(
            f"{desc}: {unit} {done}/{total if total is not None else '?'} done, {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )

"""Bounded lookahead in a background thread: how the pipeline and Compose overlap their steps."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TypeVar

A, B = TypeVar("A"), TypeVar("B")


def ahead(fn: Callable[[A], B], inputs: Iterable[A], depth: int, pool: Executor | None = None) -> Iterator[B]:
    """`map(fn, inputs)` in order, computed in `pool` (default: one background thread) up to `depth` results
    ahead of the consumer. However it ends (an input or a result that raises, a consumer that stops), no call
    of its own pool is still running once it has."""
    own = pool is None
    pool = pool or ThreadPoolExecutor(1)
    source = iter(inputs)
    pending: deque[Future[B]] = deque()
    try:
        for _, x in zip(range(depth), source):
            pending.append(pool.submit(fn, x))
        while pending:
            result = pending.popleft().result()
            for x in source:  # refill one slot, if any input is left
                pending.append(pool.submit(fn, x))
                break
            yield result
    finally:
        for future in pending:
            future.cancel()
        if own:
            pool.shutdown(wait=True)

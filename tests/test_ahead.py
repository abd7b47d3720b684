"""ahead(): the bounded look-ahead every stage pipeline runs on."""

import threading
import time

import pytest

from lipsync_ray.ahead import ahead


def test_ahead_keeps_order_bounds_its_lookahead_and_reraises():
    started, threads = [], set()

    def square(x):
        started.append(x)
        threads.add(threading.current_thread().name)
        return x * x

    results = ahead(square, range(10), depth=2)
    assert next(results) == 0
    time.sleep(0.2)
    assert len(started) == 3  # the one taken and two ahead, no more
    assert list(results) == [x * x for x in range(1, 10)]
    assert threading.current_thread().name not in threads

    def fails_at_3(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    with pytest.raises(ValueError, match="bad item 3"):
        list(ahead(fails_at_3, range(10), depth=2))

    finished = []

    def slow(x):
        time.sleep(0.3)
        finished.append(x)

    def inputs_failing_at_1():  # as Compose's pasted frames when Generate fails: the write in flight must end first
        yield 0
        raise ValueError("bad input 1")

    with pytest.raises(ValueError, match="bad input 1"):
        list(ahead(slow, inputs_failing_at_1(), depth=2))
    assert finished == [0]

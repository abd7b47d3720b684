"""Video decoding by frame range (PyAV), one frame in memory at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np


def iter_frames(path: str | Path, start: int = 0, stop: int | None = None, threads: int = 0) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames (H, W, 3) with decode index in [start, stop)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        for i, frame in enumerate(container.decode(stream)):
            if stop is not None and i >= stop:
                break
            if i >= start:
                yield frame.to_ndarray(format="rgb24")

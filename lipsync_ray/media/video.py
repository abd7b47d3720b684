"""Video decoding by frame index (PyAV), holding at most a small block of frames in memory."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def iter_frames(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames (H, W, 3) with decode index in [start, stop)."""
    with FrameReader(path) as reader:
        end = reader.frames if stop is None else min(stop, reader.frames)
        for i in range(start, end):
            yield reader[i]


class FrameReader:
    """Random access to frames of a constant-frame-rate video. Forward reads continue the decoder; a jump
    backwards (ping-pong, a new chunk) seeks to the keyframe before a block and decodes that block into a cache
    of `block` frames, so memory stays bounded whatever the access pattern. The cache holds decoded frames and
    converts one to RGB when it is first read: most of a block is never read when the reads go forward.

    A jump forward (the next chunk a worker prepares) decodes on through the gap when no keyframe lies in it, as
    a seek would land on the keyframe before the gap and decode it all again. Keyframes are predicted from the
    shortest interval seen between two; before two have been seen, gaps up to `4 * block` frames are decoded."""

    def __init__(self, path: str | Path, block: int = 32):
        self.path = str(path)
        self.container = av.open(self.path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.fps = Fraction(self.stream.average_rate or self.stream.guessed_rate)
        self.frames = self.stream.frames or int(float(self.stream.duration * self.stream.time_base) * self.fps)
        self.start_pts = self.stream.start_time or 0
        self.block = block
        self.cache: OrderedDict[int, av.VideoFrame | np.ndarray] = OrderedDict()
        self._decoder: Iterator | None = None
        self._next = 0  # index the live decoder yields next
        self._key: int | None = None  # the last keyframe the live decoder yielded
        self._gop: int | None = None  # the shortest interval seen between two keyframes

    def _index(self, frame: av.VideoFrame) -> int:
        return round(float((frame.pts - self.start_pts) * self.stream.time_base * self.fps))

    def _seek(self, index: int) -> None:
        pts = self.start_pts + int(index / self.fps / self.stream.time_base)
        self.container.seek(pts, stream=self.stream, backward=True)
        self._decoder = iter(self.container.decode(self.stream))
        self._next, self._key = -1, None

    def _decodes_on(self, index: int) -> bool:
        """Whether the live decoder should decode on to `index` rather than seek."""
        if self._decoder is None or not 0 <= self._next <= index:
            return False
        if index < self._next + self.block:
            return True
        if self._key is None:
            return False
        if self._gop is None:
            return index < self._next + 4 * self.block
        return index < self._key + self._gop

    def _keep(self, index: int, frame: av.VideoFrame) -> None:
        self.cache[index] = frame
        while len(self.cache) > self.block:
            self.cache.popitem(last=False)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.frames:
            raise IndexError(f"{self.path}: frame {index} outside 0..{self.frames - 1}")
        if index in self.cache:
            return self._rgb(index)
        if not self._decodes_on(index):
            self._seek(max(0, index - self.block + 1) if index < self._next else index)
        try:
            for frame in self._decoder:
                i = self._index(frame)
                self._next = i + 1
                if frame.key_frame:
                    if self._key is not None and i > self._key:
                        self._gop = min(self._gop or i - self._key, i - self._key)
                    self._key = i
                if i >= index - self.block + 1:
                    self._keep(i, frame)
                if i >= index:
                    break
        except Exception:
            self._decoder = None  # an error ends the live decoder: the next read seeks afresh
            raise
        if index not in self.cache:  # stream shorter than its header said
            raise IndexError(f"{self.path}: frame {index} could not be decoded")
        return self._rgb(index)

    def _rgb(self, index: int) -> np.ndarray:
        image = self.cache[index]
        if isinstance(image, av.VideoFrame):
            image = self.cache[index] = image.to_ndarray(format="rgb24")
        return image

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

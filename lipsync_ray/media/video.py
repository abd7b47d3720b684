"""Video decoding by frame number (PyAV): frames in presentation order, upright, holding at most a small block of
frames in memory."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from .probe import MediaError, VideoInfo, probe_video

log = logging.getLogger(__name__)

MAX_STAND_IN = 12  # how far (in frames) a frame that does not decode may borrow a neighbour before it is an error


def iter_frames(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames (H, W, 3) numbered in [start, stop) in presentation order."""
    with FrameReader(path) as reader:
        end = reader.frames if stop is None else min(stop, reader.frames)
        for i in range(start, end):
            yield reader[i]


class FrameReader:
    """Random access to the frames of a video by their number in presentation order (`VideoInfo.pts`): a decoded
    frame is known by its timestamp, never by counting, so variable frame rates, gaps, B-frames, edit lists and
    non-zero start times need nothing special. Frames come out as full-range RGB by the stream's own matrix and
    range, turned upright by its rotation.

    Forward reads continue the decoder; a jump backwards (ping-pong, a new chunk) seeks to the keyframe before a
    block and decodes that block into a cache of `block` frames, so memory stays bounded whatever the access
    pattern. The cache holds decoded frames and converts one to RGB when it is first read: most of a block is
    never read when the reads go forward.

    A jump forward (the next chunk a worker prepares) decodes on through the gap when no keyframe lies in it, as
    a seek would land on the keyframe before the gap and decode it all again. Keyframes are predicted from the
    shortest interval seen between two; before two have been seen, gaps up to `4 * block` frames are decoded.

    A frame that does not decode (a damaged stream) shows its nearest decoded neighbour, with a warning, when one
    lies within MAX_STAND_IN frames; otherwise reading it is a MediaError naming the file and the time."""

    def __init__(self, path: str | Path, info: VideoInfo | None = None, block: int = 32):
        self.path = str(path)
        self.info = info or probe_video(self.path)
        self.frames = self.info.frames
        self._number = {int(pts): k for k, pts in enumerate(self.info.pts)}
        self.container = av.open(self.path)
        self.stream = self.container.streams[self.info.stream]
        self.stream.thread_type = "AUTO"
        self.block = block
        self.cache: OrderedDict[int, av.VideoFrame | np.ndarray] = OrderedDict()
        self._decoder: Iterator | None = None
        self._next = 0  # number the live decoder yields next; -1 right after a seek
        self._key: int | None = None  # the last keyframe the live decoder yielded
        self._gop: int | None = None  # the shortest interval seen between two keyframes
        self._failure = ""  # why the decoder stopped early, for the error message
        self._warned = False

    def _time(self, index: int) -> float:
        return float((self.info.pts[index] - self.info.pts[0]) * self.info.time_base)

    def _seek(self, index: int) -> None:
        self.container.seek(int(self.info.pts[index]), stream=self.stream, backward=True)
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
        if index not in self.cache:
            if not self._decodes_on(index):
                self._seek(max(0, index - self.block + 1) if index < self._next else index)
            if self._decode_to(index) and index not in self.cache:  # the seek landed past it: from the start
                self._seek(0)
                self._decode_to(index)
            if index not in self.cache:
                return self._rgb(self._stand_in(index))
        return self._rgb(index)

    def _decode_to(self, index: int) -> bool:
        """Decode on until frame `index`, keeping the block before it; True when a seek landed past it."""
        try:
            for frame in self._decoder:
                i = self._number.get(frame.pts if frame.pts is not None else frame.dts)
                if i is None:  # a frame the container's packets did not announce
                    continue
                landed_past = self._next == -1 and i > index
                self._next = i + 1
                if frame.key_frame:
                    if self._key is not None and i > self._key:
                        self._gop = min(self._gop or i - self._key, i - self._key)
                    self._key = i
                if i >= index - self.block + 1:
                    self._keep(i, frame)
                if i >= index:
                    return landed_past and index > 0
        except av.FFmpegError as err:
            self._failure = err.strerror or str(err)
        self._decoder = None  # ended or failed: the next read seeks afresh
        return False

    def _stand_in(self, index: int) -> int:
        """The nearest decoded frame to `index`, which did not decode."""
        near = min(self.cache, key=lambda i: abs(i - index), default=None)
        if near is None or abs(near - index) > MAX_STAND_IN:
            why = f" ({self._failure})" if self._failure else ""
            raise MediaError(f"{self.path}: the video cannot be decoded at {self._time(index):.2f} s{why}")
        if not self._warned:
            log.warning("%s: the frame at %.2f s does not decode; showing the one at %.2f s", self.path,
                        self._time(index), self._time(near))
            self._warned = True
        return near

    def _rgb(self, index: int) -> np.ndarray:
        image = self.cache[index]
        if isinstance(image, av.VideoFrame):
            rgb = image.to_ndarray(format="rgb24", src_color_range=image.color_range or None, dst_color_range="JPEG")
            if self.info.rotation:
                rgb = np.ascontiguousarray(np.rot90(rgb, self.info.rotation // 90))
            image = self.cache[index] = rgb
        return image

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Streaming H.264 encode with the target audio muxed in, written atomically.

Frames go to ffmpeg's stdin one at a time, so memory does not grow with video length. The output appears at its
final path only when ffmpeg has finished successfully; a failure leaves nothing there. RGB goes back to YUV by
the source's matrix and range, and the output carries the source's colour tags, so it looks as the input did
(an HDR source keeps its transfer and primaries: 8-bit, no tone-mapping).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ffmpeg
import numpy as np

from ..plan import FPS
from .probe import Colour, MediaError


class VideoWriter:
    """`frames`: the output's frame count; its audio is then cut, or padded with silence, to exactly that length
    (without it, the output ends with the shorter of the frames written and the audio). The audio keeps its
    sample rate and channels (AAC)."""

    def __init__(
        self, output: str | Path, width: int, height: int, audio: str | Path, fps: int = FPS, crf: int = 18,
        colour: Colour = Colour(), preset: str = "veryfast", frames: int | None = None,
    ):
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".mp4", dir=self.output.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.size = (width, height)
        self.frames = 0
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps).filter(
            "scale", out_color_matrix=colour.matrix, out_range="pc" if colour.range == "pc" else "tv"
        )
        tags = {name: value for name, value in (("colorspace", colour.space), ("color_range", colour.range),
                ("color_primaries", colour.primaries), ("color_trc", colour.transfer)) if value}
        sound = ffmpeg.input(str(audio)).audio
        ending = {"shortest": None}
        if frames is not None:  # starts with the video's first frame, ends with its last
            seconds = f"{frames / fps:.6f}"
            sound = sound.filter("asetpts", "PTS-STARTPTS").filter("apad", whole_dur=seconds).filter("atrim", end=seconds)
            ending = {}
        # yuv420p, which players expect, needs even sizes; odd sizes are encoded 4:4:4 to keep their resolution
        pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.process = (
            ffmpeg.output(
                video, sound, str(self.tmp), vcodec="libx264", pix_fmt=pix_fmt, crf=crf, preset=preset,
                acodec="aac", audio_bitrate="128k", movflags="+faststart", loglevel="error", **ending, **tags,
            )
            .overwrite_output()
            .run_async(pipe_stdin=True, pipe_stderr=True)
        )

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.size[1], self.size[0], 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.shape} {frame.dtype} does not match {self.size[1]}x{self.size[0]}x3 uint8")
        try:
            self.process.stdin.write(memoryview(np.ascontiguousarray(frame)))  # no copy of a contiguous frame
        except BrokenPipeError:
            self._fail()
        self.frames += 1

    def write_all(self, frames: list[np.ndarray]) -> int:
        for frame in frames:
            self.write(frame)
        return len(frames)

    def _fail(self) -> None:
        err = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
        self.abort()
        raise MediaError(f"{self.output}: encoding failed ({err.splitlines()[-1] if err else 'ffmpeg exited'})")

    def close(self) -> Path:
        self.process.stdin.close()
        if self.process.wait() != 0:
            self._fail()
        if self.frames == 0:
            self.abort()
            raise MediaError(f"{self.output}: no frames were written")
        os.replace(self.tmp, self.output)
        return self.output

    def abort(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

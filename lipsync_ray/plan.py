"""Planning a video: which source frame each output frame shows, the 16-frame model windows, the chunks that
workers process independently, and the crossfade weights that stitch them. Pure functions, no I/O.

- Output runs at 25 fps, round(audio seconds x 25) frames, and by default follows the audio: audio longer than
  the video ping-pongs the video (forward, backward, ... repeating the turn-around frame, as upstream); shorter
  audio cuts it. The other length modes (`LENGTH_MODES`) loop the video, end at the shorter of the two, or keep
  the whole video with the audio padded with silence. Each output frame shows the source frame on screen at its
  time (by presentation timestamps, so variable frame rates and gaps work).
- Model windows are 16 frames on one global grid with stride `window - window_overlap`; frames covered by two
  windows are crossfaded, which removes upstream's jump at every 16-frame boundary.
- Chunks are runs of whole windows. Neighbouring chunks share the frames of the window overlap between them,
  so a chunk's result depends only on its own frames, audio and the seed: any worker computes the same thing,
  and frames outside the shared overlaps are identical whatever the chunking, provided the generator batches
  windows by their global index (floating-point kernels are not batch-invariant): keep `windows_per_chunk` a
  multiple of the generator's windows per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

import numpy as np

FPS = 25
WINDOW = 16
# what decides the output's length: pingpong and loop follow the audio (the video plays forward and backward, or
# restarts); cut ends at the shorter of video and audio; silence keeps the whole video, the audio padded with silence
LengthMode = Literal["pingpong", "loop", "cut", "silence"]
LENGTH_MODES: tuple[str, ...] = get_args(LengthMode)


def output_frame_count(audio_samples: int, sample_rate: int = 16_000, video_frames: int | None = None, length: str = "pingpong") -> int:
    """Frames at 25 fps of the output: round(audio seconds x 25) (upstream emits two more: its feature loop
    overshoots), or with `cut` / `silence` the shorter / longer of that and the video's `video_frames`."""
    if length not in LENGTH_MODES:
        raise ValueError(f"length must be one of {', '.join(LENGTH_MODES)}, got {length!r}")
    audio = (2 * audio_samples * FPS + sample_rate) // (2 * sample_rate)
    if length in ("pingpong", "loop"):
        return audio
    if video_frames is None:
        raise ValueError(f"length {length!r} needs the video's frame count")
    return min(audio, video_frames) if length == "cut" else max(audio, video_frames)


def video_frame_count(pts: np.ndarray, end: int, time_base: Fraction) -> int:
    """25 fps frames the clip covers: output frame j (at j/25 s) is inside it while j/25 s is before `end`."""
    if len(pts) == 0:
        raise ValueError("the video has no frames")
    # output frame j starts at j * den / (FPS * num) time-base units
    return max(1, -(-(end - int(pts[0])) * FPS * time_base.numerator // time_base.denominator))


def fit_audio(wave: np.ndarray, n_out: int, sample_rate: int = 16_000) -> np.ndarray:
    """The audio of an `n_out`-frame output: `wave` cut, or padded with silence, to exactly its length."""
    n = n_out * sample_rate // FPS
    return wave[:n] if wave.size >= n else np.pad(wave, (0, n - wave.size))


def source_frame_map(n_out: int, pts: np.ndarray, end: int, time_base: Fraction, length: str = "pingpong") -> np.ndarray:
    """Source frame (an index into `pts`, the frames' presentation timestamps in `time_base` units, ascending) for
    each 25 fps output frame: output frame j at j/25 s shows the last frame whose timestamp, counted from the
    first frame's, is at or before that time, whatever the source's frame rate, its variations or gaps. The clip
    lasts until `end`; a longer output ping-pongs it (`length="loop"`: restarts it), a shorter one cuts it. Exact
    integer arithmetic, so every worker computes the same map."""
    pts = np.asarray(pts, np.int64)
    n25 = video_frame_count(pts, end, time_base)
    num, den = time_base.numerator, time_base.denominator
    loop, k = np.divmod(np.arange(n_out), n25)
    k25 = k if length == "loop" else np.where(loop % 2 == 0, k, n25 - 1 - k)
    return np.searchsorted(pts - pts[0], k25 * den // (FPS * num), side="right") - 1


@dataclass(frozen=True)
class Window:
    index: int  # position on the global grid
    start: int
    stop: int  # exclusive; the last window may be shorter than 16 and is padded by the generator


def windows(n_out: int, window: int = WINDOW, overlap: int = 4) -> list[Window]:
    """The global grid of model windows covering [0, n_out)."""
    if not 0 <= overlap <= window // 2:
        raise ValueError(f"window overlap must be in [0, {window // 2}], got {overlap}")
    stride = window - overlap
    starts = range(0, max(n_out - overlap, 1), stride)
    return [Window(i, s, min(s + window, n_out)) for i, s in enumerate(starts)]


def fade_out(overlap: int) -> np.ndarray:
    """Weights of the earlier of two windows over the frames they share (the later one gets 1 - these)."""
    return np.arange(overlap, 0, -1) / (overlap + 1)


def window_weights(wins: list[Window], overlap: int) -> list[np.ndarray]:
    """Per-window crossfade weights over its frames; across windows they sum to 1 for every frame."""
    weights = []
    for j, w in enumerate(wins):
        n = w.stop - w.start
        t = np.ones(n)
        if j > 0 and overlap:  # every window but the last is full length, and the last is longer than overlap
            t[:overlap] = 1 - fade_out(overlap)
        if j < len(wins) - 1 and overlap:
            t[-overlap:] = fade_out(overlap)
        weights.append(t)
    return weights


@dataclass(frozen=True)
class Chunk:
    index: int
    windows: tuple[Window, ...]

    @property
    def start(self) -> int:
        return self.windows[0].start

    @property
    def stop(self) -> int:
        return self.windows[-1].stop


def chunks(n_out: int, windows_per_chunk: int = 8, window: int = WINDOW, overlap: int = 4) -> list[Chunk]:
    """Split the window grid into chunks of `windows_per_chunk` windows (the last may have fewer)."""
    wins = windows(n_out, window, overlap)
    return [Chunk(c, tuple(wins[i : i + windows_per_chunk])) for c, i in enumerate(range(0, len(wins), windows_per_chunk))]

"""Planning a video: which source frame each output frame shows, the 16-frame model windows, the chunks that
workers process independently, and the crossfade weights that stitch them. Pure functions, no I/O.

- Output runs at 25 fps and follows the audio: audio longer than the video ping-pongs the video (forward,
  backward, ... repeating the turn-around frame, as upstream); shorter audio cuts it. Each output frame shows the
  source frame on screen at its time (by presentation timestamps, so variable frame rates and gaps work).
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

import numpy as np

FPS = 25
WINDOW = 16


def output_frame_count(audio_samples: int, sample_rate: int = 16_000) -> int:
    """Frames at 25 fps that the audio covers (upstream emits two more: its feature loop overshoots)."""
    return audio_samples * FPS // sample_rate


def source_frame_map(n_out: int, pts: np.ndarray, end: int, time_base: Fraction) -> np.ndarray:
    """Source frame (an index into `pts`, the frames' presentation timestamps in `time_base` units, ascending) for
    each 25 fps output frame: output frame j at j/25 s shows the last frame whose timestamp, counted from the
    first frame's, is at or before that time, whatever the source's frame rate, its variations or gaps. The clip
    lasts until `end`; audio longer than that ping-pongs it, shorter audio cuts it. Exact integer arithmetic, so
    every worker computes the same map."""
    pts = np.asarray(pts, np.int64)
    if pts.size == 0:
        raise ValueError("the video has no frames")
    num, den = time_base.numerator, time_base.denominator
    # output frame j starts at j * den / (FPS * num) time-base units; the clip shows output frames while j/25 < end
    n25 = max(1, -(-(end - int(pts[0])) * FPS * num // den))
    loop, k = np.divmod(np.arange(n_out), n25)
    k25 = np.where(loop % 2 == 0, k, n25 - 1 - k)
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

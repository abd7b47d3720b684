"""Probing and audio loading through ffmpeg (ffmpeg-python builds argument lists, never shell strings)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

SAMPLE_RATE = 16_000
SILENCE_PEAK = 1e-4  # full scale = 1.0


class MediaError(ValueError):
    """A media input that cannot be used; the message names the input and the problem."""


def _ffmpeg_reason(err: ffmpeg.Error) -> str:
    lines = [line for line in (err.stderr or b"").decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "ffmpeg failed"


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: Fraction
    frames: int
    duration: float
    has_audio: bool


def probe_video(path: str | Path) -> VideoInfo:
    path = str(path)
    if not Path(path).is_file():
        raise MediaError(f"{path}: no such file")
    try:
        info = ffmpeg.probe(path, count_packets=None)
    except ffmpeg.Error as err:
        raise MediaError(f"{path}: not a readable video ({_ffmpeg_reason(err)})") from None
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if video is None:
        raise MediaError(f"{path}: has no video stream")
    fps = Fraction(video.get("avg_frame_rate") or video.get("r_frame_rate") or "0/1")
    if fps <= 0:
        fps = Fraction(video.get("r_frame_rate", "0/1"))
    frames = int(video.get("nb_read_packets") or video.get("nb_frames") or 0)
    if frames <= 0 or fps <= 0:
        raise MediaError(f"{path}: the video has no frames")
    duration = float(video.get("duration") or info.get("format", {}).get("duration") or frames / fps)
    return VideoInfo(
        path, int(video["width"]), int(video["height"]), fps, frames, duration,
        any(s.get("codec_type") == "audio" for s in streams),
    )


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any container, rate or channel layout -> mono float32 at `sample_rate`; empty or silent audio is an error."""
    path = str(path)
    if not Path(path).is_file():
        raise MediaError(f"{path}: no such file")
    try:
        raw, _ = (
            ffmpeg.input(path)
            .output("pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, vn=None)
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as err:
        raise MediaError(f"{path}: not readable audio ({_ffmpeg_reason(err)})") from None
    audio = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
    if audio.size < sample_rate // 25:
        raise MediaError(f"{path}: the audio is empty (shorter than one video frame)")
    if np.abs(audio).max() < SILENCE_PEAK:
        raise MediaError(f"{path}: the audio is silent")
    return audio

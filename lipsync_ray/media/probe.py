"""Probing and audio loading through ffmpeg (ffmpeg-python builds argument lists, never shell strings)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import ffmpeg
import numpy as np

from ..plan import FPS

SAMPLE_RATE = 16_000
SILENCE_PEAK = 1e-4  # full scale = 1.0


class MediaError(ValueError):
    """A media input that cannot be used; the message names the input and the problem."""


def _ffmpeg_reason(err: ffmpeg.Error, path: str) -> str:
    """ffmpeg's last words, without the path it starts them with (the message names the input already)."""
    lines = [line for line in (err.stderr or b"").decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].removeprefix(f"{path}: ") if lines else "ffmpeg failed"


# ffprobe's colour names -> the matrix names of ffmpeg's scale filter (what the encoder converts RGB with)
_MATRIX = {"bt709": "bt709", "smpte170m": "smpte170m", "bt470bg": "bt470", "bt2020nc": "bt2020", "bt2020c": "bt2020",
           "fcc": "fcc", "smpte240m": "smpte240m"}


@dataclass(frozen=True)
class Colour:
    """The colour description of a video stream, as ffprobe names it ("" where the stream does not say)."""

    space: str = ""
    range: str = ""  # "tv" (limited) or "pc" (full)
    primaries: str = ""
    transfer: str = ""

    @property
    def matrix(self) -> str:
        """The YUV matrix frames are decoded with and encoded back with: the stream's, else BT.601 (what ffmpeg
        assumes for an untagged stream), so an untagged input comes out as it went in."""
        return _MATRIX.get(self.space, "bt601")

    @property
    def hdr(self) -> bool:
        return self.transfer in ("smpte2084", "arib-std-b67")


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """A video stream as it is displayed: its size after rotation and the presentation time of every frame.

    Frames are numbered in presentation order; `pts[k]` is frame k's timestamp in `time_base` units (ascending,
    gaps and variable intervals kept) and frame k is on screen until `pts[k + 1]` (the last one until `end`)."""

    path: str
    stream: int  # the video stream's index in the container (cover art is skipped)
    width: int
    height: int
    pts: np.ndarray
    time_base: Fraction
    end: int
    rotation: int  # degrees counter-clockwise that turn a decoded frame upright: 0, 90, 180 or 270
    colour: Colour
    has_audio: bool

    @property
    def frames(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        return float((self.end - self.pts[0]) * self.time_base)

    @property
    def fps(self) -> Fraction:
        """The average frame rate."""
        return Fraction(self.frames) / ((self.end - int(self.pts[0])) * self.time_base)


def probe_video(path: str | Path) -> VideoInfo:
    """Stream facts from ffprobe, and the frames' presentation timestamps from the container's packets (read
    without decoding, by the same libavformat that decodes them later; packets an edit list drops are left out)."""
    path = str(path)
    _check_file(path)
    try:
        info = ffmpeg.probe(path)
    except ffmpeg.Error as err:
        raise MediaError(f"{path}: not a readable video ({_ffmpeg_reason(err, path)})") from None
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")), None)
    if video is None:
        raise MediaError(f"{path}: has no video stream")
    try:
        with av.open(path) as container:
            stream = container.streams[video["index"]]
            time_base = stream.time_base
            packets = {p.pts if p.pts is not None else p.dts: p.duration or 0 for p in container.demux(stream)
                       if p.size and not p.is_discard and (p.pts is not None or p.dts is not None)}
    except av.FFmpegError as err:
        raise MediaError(f"{path}: not a readable video ({err.strerror or err})") from None
    if not packets:
        raise MediaError(f"{path}: the video has no frames")
    pts = np.array(sorted(packets), np.int64)
    step = int(np.median(np.diff(pts))) if len(pts) > 1 else 0
    last = packets[int(pts[-1])] or step or max(1, round(1 / (FPS * time_base)))  # a lone frame: one output frame
    rotation = _rotation(video)
    width, height = int(video["width"]), int(video["height"])
    if rotation % 180:
        width, height = height, width
    colour = Colour(*(_tag(video.get(f"color_{name}")) for name in ("space", "range", "primaries", "transfer")))
    return VideoInfo(
        path, video["index"], width, height, pts, time_base, int(pts[-1]) + int(last), rotation, colour,
        any(s.get("codec_type") == "audio" for s in streams),
    )


def _tag(value: str | None) -> str:
    return "" if value in (None, "unknown", "unspecified") else value


def _rotation(stream: dict) -> int:
    """Counter-clockwise degrees that turn the stored picture upright: the rotation of the display matrix."""
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return round(float(side["rotation"]) / 90) * 90 % 360
    return 0


def _check_file(path: str) -> None:
    if not Path(path).is_file():
        raise MediaError(f"{path}: no such file")
    if not Path(path).stat().st_size:
        raise MediaError(f"{path}: the file is empty (0 bytes)")


class AudioTooLong(MediaError):
    """Audio over the length allowed (`probe_audio`'s or `load_audio`'s `max_seconds`)."""


def _too_long(path: str, max_seconds: float, seconds: float | None = None) -> AudioTooLong:
    length = f" ({seconds:.1f} s)" if seconds is not None else ""
    return AudioTooLong(f"{path}: the audio{length} is longer than the {max_seconds:g} s allowed")


def probe_audio(path: str | Path, max_seconds: float | None = None) -> float | None:
    """The duration in seconds of a file's first audio stream as its container declares it (None where it does
    not), read without decoding; MediaError when the file has no audio stream, AudioTooLong when it declares more
    than `max_seconds`."""
    path = str(path)
    _check_file(path)
    try:
        with av.open(path) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise MediaError(f"{path}: has no audio stream")
            if stream.duration is not None and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / av.time_base if container.duration is not None else None
    except av.FFmpegError as err:
        raise MediaError(f"{path}: not readable audio ({err.strerror or err})") from None
    if seconds is not None and max_seconds is not None and seconds > max_seconds:
        raise _too_long(path, max_seconds, seconds)
    return seconds


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Any container, rate or channel layout -> mono float32 at `sample_rate`; empty or silent audio is an error.
    With `max_seconds`, decoding stops just past it and longer audio is AudioTooLong (whatever its header says)."""
    path = str(path)
    _check_file(path)
    limit = {} if max_seconds is None else {"t": max_seconds + 1}
    try:
        raw, _ = (
            ffmpeg.input(path)
            .output("pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, vn=None, **limit)
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as err:
        reason = _ffmpeg_reason(err, path)
        if "does not contain any stream" in reason:  # nothing to decode: -vn left no stream
            raise MediaError(f"{path}: has no audio stream") from None
        raise MediaError(f"{path}: not readable audio ({reason})") from None
    if max_seconds is not None and len(raw) // 2 > max_seconds * sample_rate:
        raise _too_long(path, max_seconds)
    audio = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
    if audio.size < sample_rate // FPS:
        raise MediaError(f"{path}: the audio is empty (shorter than one video frame)")
    if np.abs(audio).max() < SILENCE_PEAK:
        raise MediaError(f"{path}: the audio is silent")
    return audio

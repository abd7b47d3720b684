"""Lip-sync scoring with SyncNet: LSE-D, LSE-C and the AV offset of finished videos, and `lipsync-ray eval`.

The numbers are those of `syncnet_python`'s `evaluate` (the Wav2Lip and LatentSync papers' LSE-D / LSE-C):
- `sync_score`: 5-frame lip windows of 224x224 BGR face crops against 0.2 s MFCC windows; per window the L2
  distances to the audio at shifts -vshift..vshift, averaged over windows; LSE-D is the smallest mean distance,
  LSE-C the median minus it, the AV offset the shift where it lies.
- `SyncScorer`: faces found by the project's own detector on every frame, linked into face tracks and cropped
  with the published geometry (`face_crops`), each track scored against the audio of its frames. Published
  numbers also include a lossy step this leaves out (syncnet_python writes the crops as an XVID video and reads
  them back as JPEGs), and its S3FD boxes are shaped a little differently from this project's detectors'.
- `run_eval`: the command, for one video or a folder of them; with a reference (the original video) also how
  much the frame changed outside the pasted face, and the flicker at chunk seams against inside chunks.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter
from scipy.signal import medfilt

from .faces import FaceAligner, make_detector
from .faces.detect import Face
from .media import FrameReader, MediaError, VideoInfo, load_audio, probe_video
from .models.presets import checkpoints_root
from .models.syncnet import LIP_FRAMES, MFCC_PER_FRAME, MFCC_WINDOW, SyncNet, load_syncnet, mfcc
from .plan import FPS, chunks, source_frame_map

SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
CONF_SMOOTHING = 9  # windows of the median filter on the per-frame confidence, as syncnet_python reports it
# face tracks, as syncnet_python's pipeline builds them
TRACK_IOU = 0.5  # a face continues a track when its box overlaps the track's last box by more than this
TRACK_GAP = 25  # frames a track may go without a detection before it ends
BOX_SMOOTHING = 13  # frames of the median filter on box size and centre
MIN_TRACK = BOX_SMOOTHING  # shorter tracks are not scored
CROP_SCALE = 0.4
CROP_SIZE = 224
PAD_GREY = 110
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


# -- scoring ----------------------------------------------------------------------------------------------------
@dataclass
class SyncScore:
    offset: int  # AV offset in frames: the best match pairs video frame i with the audio of frame i - offset
    conf: float  # LSE-C: median minus smallest of `mean_dists` (higher is better)
    min_dist: float  # LSE-D: the smallest of `mean_dists` (lower is better)
    mean_dists: np.ndarray  # (2 * vshift + 1,) mean distance at audio shifts -vshift..vshift
    frame_conf: np.ndarray  # (windows,) per 5-frame window from frame 0: median of `mean_dists` minus its own
    # distance at `offset`, median-filtered over 9 windows. syncnet_python's "framewise conf" pads that filter
    # with zeros, which pulls the first and last 4 towards 0; here the end values are repeated instead.


@contextmanager
def full_fp32() -> Iterator[None]:
    """GPU convolutions and matrix products in full fp32 rather than TF32 (PyTorch's default for cuDNN
    convolutions): on an H100, TF32 moves the contract's features by up to 4e-2 and LSE-C by 3e-4 relative.
    The settings are process-wide while it lasts."""
    settings = (torch.backends.cudnn, torch.backends.cuda.matmul)
    saved = [s.allow_tf32 for s in settings]
    for s in settings:
        s.allow_tf32 = False
    try:
        yield
    finally:
        for s, value in zip(settings, saved):
            s.allow_tf32 = value


def sync_features(
    model: SyncNet, frames_bgr: Iterable[np.ndarray], audio: np.ndarray, batch_size: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lip and audio embeddings (W, D) of the 5-frame windows starting at frames 0..n-6, n = min(frames, audio
    frames), as syncnet_python (which leaves out the last window that fits). `frames_bgr` (T, 224, 224, 3) uint8
    may be any iterable: frames are consumed `batch_size` windows at a time, on the model's device, in fp32."""
    device = next(model.parameters()).device
    lips, run, count = [], [], 0
    with torch.inference_mode(), full_fp32():
        for frame in islice(frames_bgr, len(audio) // SAMPLES_PER_FRAME):
            run.append(torch.as_tensor(np.asarray(frame)))
            count += 1
            if len(run) == batch_size + LIP_FRAMES - 1:
                lips.append(_embed_lips(model, run, device))
                run = run[-(LIP_FRAMES - 1):]
        if len(run) >= LIP_FRAMES:
            lips.append(_embed_lips(model, run, device))
        windows = count - LIP_FRAMES
        if windows < 1:
            raise ValueError(f"too short to score: {count} frames with audio (at least {LIP_FRAMES + 1})")
        coefficients = torch.from_numpy(mfcc(audio, SAMPLE_RATE)).to(device)
        audio_windows = coefficients.unfold(1, MFCC_WINDOW, MFCC_PER_FRAME)[:, :windows].permute(1, 0, 2)[:, None]
        sound = [model.embed_audio(audio_windows[i : i + batch_size]) for i in range(0, windows, batch_size)]
    return torch.cat(lips)[:windows], torch.cat(sound)


def _embed_lips(model: SyncNet, frames: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    clip = torch.stack(frames).to(device).permute(3, 0, 1, 2)[None].float()  # (1, 3, F, 224, 224)
    return model.embed_lips(clip)[0]


def score_features(lips: torch.Tensor, sound: torch.Tensor, vshift: int = 15) -> SyncScore:
    """Distances between each lip window and the audio windows `vshift` before to `vshift` after it (zero
    embeddings beyond the ends), and the scores they give."""
    padded = F.pad(sound, (0, 0, vshift, vshift))
    dists = torch.stack([F.pairwise_distance(lips, padded[s : s + len(lips)]) for s in range(2 * vshift + 1)], 1)
    mean = dists.mean(0)
    min_dist, best = mean.min(0)
    median = mean.median()
    frame_conf = median_filter((median - dists[:, best]).cpu().numpy(), CONF_SMOOTHING, mode="nearest")
    return SyncScore(int(vshift - best), float(median - min_dist), float(min_dist), mean.cpu().numpy(), frame_conf)


def sync_score(
    model: SyncNet, frames_bgr: Iterable[np.ndarray], audio: np.ndarray, vshift: int = 15, batch_size: int = 20
) -> SyncScore:
    """SyncNet scores of 224x224 BGR uint8 face crops at 25 fps against 16 kHz int16 audio starting with them."""
    return score_features(*sync_features(model, frames_bgr, audio, batch_size), vshift)


# -- face tracks and crops --------------------------------------------------------------------------------------
@dataclass
class FaceTrack:
    """One face through consecutive frames; frames between its detections get interpolated boxes and points."""

    start: int  # first frame (at 25 fps)
    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2 per frame from `start`
    points: np.ndarray  # (n, 3, 2) the alignment points (see faces.detect.Face)

    @property
    def stop(self) -> int:
        return self.start + len(self.boxes)

    @property
    def mean_area(self) -> float:
        return float(np.mean((self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def face_tracks(detections: Sequence[list[Face]], min_frames: int = MIN_TRACK) -> list[FaceTrack]:
    """Link each frame's faces into tracks (a face continues the track whose last box it overlaps most, by IoU
    above 0.5, within 25 frames), longest first, the larger face first among equally long ones."""
    live: list[list[tuple[int, Face]]] = []
    ended: list[list[tuple[int, Face]]] = []
    for frame, faces in enumerate(detections):
        ended += [t for t in live if frame - t[-1][0] > TRACK_GAP]
        live = [t for t in live if frame - t[-1][0] <= TRACK_GAP]
        free = list(faces)
        for track in live:
            last = track[-1][1].box
            best = max(free, key=lambda f: _iou(f.box, last), default=None)
            if best is not None and _iou(best.box, last) > TRACK_IOU:
                track.append((frame, best))
                free.remove(best)
        live += [[(frame, face)] for face in free]
    tracks = [_interpolate(t) for t in ended + live if t[-1][0] - t[0][0] + 1 >= min_frames]
    return sorted(tracks, key=lambda t: (-len(t.boxes), -t.mean_area))


def _interpolate(track: list[tuple[int, Face]]) -> FaceTrack:
    seen = np.array([frame for frame, _ in track])
    every = np.arange(seen[0], seen[-1] + 1)
    boxes = np.stack([face.box for _, face in track])
    points = np.stack([face.points for _, face in track]).reshape(len(track), 6)
    fill = lambda values: np.stack([np.interp(every, seen, v) for v in values.T], 1)  # noqa: E731
    return FaceTrack(int(seen[0]), fill(boxes), fill(points).reshape(-1, 3, 2))


def face_crops(frames_rgb: Iterable[np.ndarray], track: FaceTrack) -> Iterator[np.ndarray]:
    """224x224 BGR crops of `track` from its frames (RGB, from `track.start` on), as syncnet_python's pipeline:
    half the box's larger side and its centre, each median-filtered over 13 frames; a square of 2.8 half-sides
    from one half-side above the centre (reaching below the chin), grey outside the frame."""
    w, h = track.boxes[:, 2] - track.boxes[:, 0], track.boxes[:, 3] - track.boxes[:, 1]
    half = medfilt(np.maximum(w, h) / 2, BOX_SMOOTHING)
    cx = medfilt((track.boxes[:, 0] + track.boxes[:, 2]) / 2, BOX_SMOOTHING)
    cy = medfilt((track.boxes[:, 1] + track.boxes[:, 3]) / 2, BOX_SMOOTHING)
    for frame, s, x, y in zip(frames_rgb, half, cx, cy):
        # syncnet_python pads the frame by int(1.8 s) and truncates coordinates in the padded frame
        pad = int(s * (1 + 2 * CROP_SCALE))
        top, bottom = int(y + pad - s) - pad, int(y + pad + s * (1 + 2 * CROP_SCALE)) - pad
        left, right = int(x + pad - s * (1 + CROP_SCALE)) - pad, int(x + pad + s * (1 + CROP_SCALE)) - pad
        crop = np.full((max(1, bottom - top), max(1, right - left), 3), PAD_GREY, np.uint8)
        y0, y1 = max(top, 0), min(bottom, frame.shape[0])
        x0, x1 = max(left, 0), min(right, frame.shape[1])
        if y1 > y0 and x1 > x0:
            crop[y0 - top : y1 - top, x0 - left : x1 - left] = frame[y0:y1, x0:x1]
        yield np.ascontiguousarray(cv2.resize(crop, (CROP_SIZE, CROP_SIZE))[..., ::-1])


# -- scoring videos ---------------------------------------------------------------------------------------------
def frames_at_25fps(info: VideoInfo) -> np.ndarray:
    """The video's frame on screen at each 25 fps tick of its duration (the identity for this project's outputs)."""
    ticks = math.ceil((info.end - int(info.pts[0])) * info.time_base * FPS)
    return source_frame_map(ticks, info.pts, info.end, info.time_base)


def audio_int16(path: str | Path) -> np.ndarray:
    """16 kHz mono int16 samples of any audio or video file (load_audio's float32 is exactly int16 / 32768)."""
    return np.round(load_audio(path, SAMPLE_RATE) * 32768).astype(np.int16)


@dataclass
class VideoScore:
    video: str
    lse_c: float
    lse_d: float
    av_offset: int
    frames: int  # the video's frames at 25 fps
    track: FaceTrack  # the face scored
    frame_conf: np.ndarray  # (frames,) confidence of the 5-frame window centred on each frame, NaN where none

    def columns(self) -> dict[str, float | int]:
        """What a manifest row records."""
        return {"lse_c": self.lse_c, "lse_d": self.lse_d, "av_offset": self.av_offset}


@dataclass
class TrackScore:
    track: FaceTrack
    score: SyncScore


class SyncScorer:
    """Scores videos against audio (by default their own track): the project's face detector on every frame at
    25 fps, face tracks, syncnet_python's crops, SyncNet. A plain class, like the pipeline's stages: construct,
    `setup()` (loads the models) once per worker, then call it on finished outputs, or rank the faces of a video
    by how well their mouths follow its audio (`score_tracks`)."""

    resources = {"num_cpus": 1}

    def __init__(
        self, model: str = "syncnet-v2", checkpoints: str | Path | None = None, detector: str = "auto",
        device: str = "auto", vshift: int = 15, batch_size: int = 20,
    ):
        self.model, self.checkpoints, self.detector_kind = model, checkpoints, detector
        self.device, self.vshift, self.batch_size = device, vshift, batch_size

    def setup(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.syncnet = load_syncnet(self.model, self.checkpoints, self.device)
        self.detector = make_detector(self.detector_kind, checkpoints_root(self.checkpoints) / "insightface", self.device)

    def tracks(self, reader: FrameReader, ticks: np.ndarray) -> list[FaceTrack]:
        """Face tracks over the frames `ticks` (numbers in `reader`), longest first."""
        return face_tracks([self.detector.detect(reader[int(k)]) for k in ticks])

    def score_track(self, reader: FrameReader, ticks: np.ndarray, track: FaceTrack, audio: np.ndarray) -> SyncScore:
        """`track` against `audio` (int16 from tick 0): the audio of the track's own frames."""
        frames = (reader[int(k)] for k in ticks[track.start : track.stop])
        sound = audio[track.start * SAMPLES_PER_FRAME : track.stop * SAMPLES_PER_FRAME]
        return sync_score(self.syncnet, face_crops(frames, track), sound, self.vshift, self.batch_size)

    def _open(self, video: str | Path, audio: str | Path | None) -> tuple[FrameReader, np.ndarray, np.ndarray]:
        info = probe_video(video)
        if audio is None and not info.has_audio:
            raise MediaError(f"{video}: has no audio track (give the audio to score it against)")
        return FrameReader(video, info), frames_at_25fps(info), audio_int16(audio if audio is not None else video)

    def __call__(self, video: str | Path, audio: str | Path | None = None) -> VideoScore:
        """Score the video's main face (its longest track) against `audio`, by default the video's own track."""
        reader, ticks, sound = self._open(video, audio)
        with reader:
            tracks = self.tracks(reader, ticks)
            if not tracks:
                raise MediaError(f"{video}: no face seen in {MIN_TRACK} or more consecutive frames")
            track = tracks[0]
            score = self.score_track(reader, ticks, track, sound)
        curve = np.full(len(ticks), np.nan)
        centre = track.start + LIP_FRAMES // 2
        curve[centre : centre + len(score.frame_conf)] = score.frame_conf
        return VideoScore(str(video), score.conf, score.min_dist, score.offset, len(ticks), track, curve)

    def score_tracks(self, video: str | Path, audio: str | Path | None = None, seconds: float | None = None) -> list[TrackScore]:
        """Every face track in the first `seconds` (default all) scored against `audio` (default the video's own),
        the most confident first: for choosing the active speaker."""
        reader, ticks, sound = self._open(video, audio)
        if seconds is not None:
            ticks = ticks[: max(1, round(seconds * FPS))]
        heard = len(sound) // SAMPLES_PER_FRAME
        with reader:
            tracks = [t for t in self.tracks(reader, ticks) if min(t.stop, heard) - t.start > LIP_FRAMES]
            scores = [TrackScore(t, self.score_track(reader, ticks, t, sound)) for t in tracks]
        return sorted(scores, key=lambda s: -s.score.conf)


# -- changes against the original -------------------------------------------------------------------------------
PASTE_MARGIN = 0.15  # of the pasted crop's size on each side: the paste's own blur margin (0.1) and detector noise


def chunk_seams(frames: int, windows_per_chunk: int = 8, overlap: int = 4) -> list[tuple[int, int]]:
    """Frames [start, stop) that neighbouring chunks of the pipeline share and crossfade (empty without overlap)."""
    parts = chunks(frames, windows_per_chunk, overlap=overlap)
    return [(later.start, earlier.stop) for earlier, later in zip(parts, parts[1:])]


def _paste_mask(matrix: np.ndarray, aligner: FaceAligner, shape: tuple[int, int]) -> np.ndarray:
    """Where the pipeline may have pasted a face: the aligned crop's quadrilateral in the frame, grown by
    PASTE_MARGIN."""
    inverse = cv2.invertAffineTransform(matrix.astype(np.float64))
    w, h = aligner.face_w, aligner.face_h
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], np.float64) @ inverse.T
    centre = corners.mean(0)
    grown = centre + (corners - centre) * (1 + 2 * PASTE_MARGIN)
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, np.round(grown).astype(np.int32), 1)
    return mask.astype(bool)


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) at each pixel of two grey float32 images."""
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def reference_metrics(
    video: str | Path, reference: str | Path, track: FaceTrack, seams: Sequence[tuple[int, int]]
) -> dict[str, float | None]:
    """How the lip-synced `video` differs from its original `reference` (frames matched as the pipeline maps
    them, the original ping-ponged or cut to the output's length):
    - `psnr_outside_mask` (dB) and `ssim_outside_mask` (of luma) away from the pasted face of `track`: only
      re-encoding should show there;
    - `jitter_seams` and `jitter_inside`: the mean absolute frame-to-frame change inside the pasted face beyond
      the original's own change, at transitions into the frames of chunk `seams` and at all others: the seams
      should flicker no more than the rest."""
    out_info, ref_info = probe_video(video), probe_video(reference)
    if (out_info.width, out_info.height) != (ref_info.width, ref_info.height):
        raise MediaError(f"{reference}: {ref_info.width}x{ref_info.height}, not the size of {video} "
                         f"({out_info.width}x{out_info.height}): not its original")
    ticks = frames_at_25fps(out_info)
    ref_ticks = source_frame_map(len(ticks), ref_info.pts, ref_info.end, ref_info.time_base)
    aligner = FaceAligner(256)  # the crop's region in the frame is the same at every resolution
    matrices = aligner.estimate(track.points)[0].numpy()
    at_seam = {j for start, stop in seams for j in range(start, stop + 1)}
    shape = (out_info.height, out_info.width)
    squared, counted, ssims, jitter = 0.0, 0, [], {True: [], False: []}
    previous = None
    with FrameReader(video, out_info) as outputs, FrameReader(reference, ref_info) as originals:
        for j, (k, r) in enumerate(zip(ticks, ref_ticks)):
            out, ref = outputs[int(k)], originals[int(r)]
            inside = track.start <= j < track.stop
            mask = _paste_mask(matrices[j - track.start], aligner, shape) if inside else np.zeros(shape, bool)
            keep = ~mask
            difference = out.astype(np.float32) - ref.astype(np.float32)
            squared += float((difference[keep] ** 2).sum())
            counted += int(keep.sum()) * 3
            if keep.any():
                grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32) for x in (out, ref)]
                ssims.append(float(_ssim_map(*grey)[keep].mean()))
            if previous is not None and (both := mask & previous[1]).any():
                jitter[j in at_seam].append(float(np.abs(difference - previous[0])[both].mean()))
            previous = (difference, mask)
    mse = squared / max(counted, 1)
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return {
        "psnr_outside_mask": 10 * math.log10(255**2 / mse) if mse > 0 else math.inf,
        "ssim_outside_mask": mean(ssims),
        "jitter_seams": mean(jitter[True]),
        "jitter_inside": mean(jitter[False]),
    }


# -- the command --------------------------------------------------------------------------------------------------
def plot_confidence(score: VideoScore, seams: Sequence[tuple[int, int]], path: str | Path) -> None:
    """PNG of the per-frame confidence with the chunk seams shaded: where a video loses sync, and whether that
    happens at seams."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for n, (start, stop) in enumerate(seams):
        axes.axvspan(start - 0.5, max(stop, start + 1) - 0.5, color="tab:orange", alpha=0.3, lw=0,
                     label="chunk seam" if n == 0 else None)
    axes.plot(np.arange(score.frames), score.frame_conf, color="tab:blue", lw=1.2, label="confidence")
    axes.axhline(0, color="grey", lw=0.6)
    axes.set(xlim=(0, max(score.frames - 1, 1)), xlabel="frame (25 fps)", ylabel="SyncNet confidence",
             title=f"{Path(score.video).name}: LSE-C {score.lse_c:.2f}, LSE-D {score.lse_d:.2f}, "
                   f"AV offset {score.av_offset} frames")
    axes.legend(loc="upper right", fontsize="small")
    canvas.print_png(str(path))


def evaluate(
    scorer: SyncScorer, video: Path, audio: Path | None = None, reference: Path | None = None,
    windows_per_chunk: int = 8, window_overlap: int = 4,
) -> tuple[dict, VideoScore, list[tuple[int, int]]]:
    """One video's row (scores, the face's frames, with a reference its changes), its score, its chunk seams."""
    score = scorer(video, audio)
    seams = chunk_seams(score.frames, windows_per_chunk, window_overlap)
    row = {"video": str(video), **score.columns(), "frames": score.frames, "face_start": score.track.start,
           "face_stop": score.track.stop}
    if reference is not None:
        row |= {"reference": str(reference), **reference_metrics(video, reference, score.track, seams)}
    return row, score, seams


def _number(value, form: str, missing: str = "n/a") -> str:
    return missing if value is None or value != value else format(value, form)


def _describe(row: dict) -> str:
    text = (f"{row['video']}: LSE-D {row['lse_d']:.3f}  LSE-C {row['lse_c']:.3f}  AV offset {row['av_offset']} "
            f"frames  (face in frames {row['face_start']}-{row['face_stop'] - 1} of {row['frames']})")
    if "reference" in row:
        text += (f"\n  outside the face against {row['reference']}: PSNR {_number(row['psnr_outside_mask'], '.2f')} dB, "
                 f"SSIM {_number(row['ssim_outside_mask'], '.4f')}; frame-to-frame change at chunk seams "
                 f"{_number(row['jitter_seams'], '.3f')}, inside chunks {_number(row['jitter_inside'], '.3f')}")
    return text


def _plain(value):
    """JSON-safe: numpy scalars as Python numbers, NaN and infinity as null."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


def _write_json(data, path: Path) -> None:
    clean = lambda row: {k: [_plain(x) for x in v] if isinstance(v, list) else _plain(v) for k, v in row.items()}  # noqa: E731
    path.write_text(json.dumps([clean(r) for r in data] if isinstance(data, list) else clean(data), indent=1) + "\n")


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))


def _original(video: Path, references: Path | None) -> Path | None:
    """The video of the same name (any suffix) in the folder of originals, if one is given."""
    if references is None:
        return None
    match = next((p for p in _videos(references) if p.stem == video.stem), None)
    if match is None:
        raise MediaError(f"{video}: no original named {video.stem}.* in {references}")
    return match


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _named(path: Path, err: Exception) -> str:
    return str(err) if str(path) in str(err) else f"{path}: {err}"


def run_eval(
    video: Path, audio: Path | None = None, reference: Path | None = None, json_out: Path | None = None,
    plot: Path | None = None, parquet: Path | None = None, model: str = "syncnet-v2", detector: str = "auto",
    checkpoints: Path | None = None, device: str = "auto", windows_per_chunk: int = 8, window_overlap: int = 4,
) -> int:
    """`lipsync-ray eval`: score one video, or every video of a folder (each against its own audio, with the
    original of the same name in a `reference` folder), print the scores and write them as JSON and Parquet;
    `plot` is a PNG (a folder of them for a folder). Returns the exit code: 0 ok, 1 some videos of a folder
    failed, 2 bad input or missing weights."""
    if not video.exists():
        return _error(f"{video}: no such file or folder")
    folder = video.is_dir()
    if folder and audio is not None:
        return _error(f"{audio}: a folder's videos are scored against their own audio tracks, not one AUDIO")
    if reference is not None and (not reference.exists() or reference.is_dir() != folder):
        return _error(f"{reference}: the reference must be {'a folder of originals' if folder else 'the original video'}")
    videos = _videos(video) if folder else [video]
    if not videos:
        return _error(f"{video}: no videos ({', '.join(VIDEO_SUFFIXES)}) in the folder")
    scorer = SyncScorer(model, checkpoints, detector, device)
    try:
        scorer.setup()
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        return _error(str(err))
    if model == "tiny-random":
        print("warning: tiny-random has random weights: its scores mean nothing", file=sys.stderr)
    if plot is not None:
        (plot if folder else plot.parent).mkdir(parents=True, exist_ok=True)
    rows, detail = [], {}
    for path in videos:
        try:
            original = _original(path, reference) if folder else reference
            row, score, seams = evaluate(scorer, path, audio, original, windows_per_chunk, window_overlap)
        except (MediaError, ValueError, FileNotFoundError) as err:
            if not folder:
                return _error(_named(path, err))
            rows.append({"video": str(path), "error": _named(path, err)})
            print(f"failed   {rows[-1]['error']}", file=sys.stderr)
            continue
        row["model"] = model
        rows.append(row | {"error": ""} if folder else row)
        detail = {**row, "chunk_seams": [list(s) for s in seams], "frame_conf": list(score.frame_conf)}
        if plot is not None:
            plot_confidence(score, seams, plot / f"{path.stem}.png" if folder else plot)
    _report(rows, folder)
    for path in (json_out, parquet):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if json_out is not None:
        _write_json(rows if folder else detail, json_out)
    if parquet is not None:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(parquet, index=False)
    return 1 if any(r.get("error") for r in rows) else 0


def _report(rows: list[dict], folder: bool) -> None:
    if not folder:
        print(_describe(rows[0]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("video", "LSE-D", "LSE-C", "AV offset", "PSNR out", "SSIM out", "jitter seams / inside", "error")
    for row in rows:
        cells = [_number(row.get(key), form, "") for key, form in [
            ("lse_d", ".3f"), ("lse_c", ".3f"), ("av_offset", "d"), ("psnr_outside_mask", ".2f"), ("ssim_outside_mask", ".4f"),
        ]]
        jitter = f"{_number(row['jitter_seams'], '.2f')} / {_number(row['jitter_inside'], '.2f')}" if "reference" in row else ""
        table.add_row(Path(row["video"]).name, *cells, jitter, row.get("error", ""))
    Console(width=160).print(table)
    scored = [r for r in rows if not r.get("error")]
    if scored:
        print(f"{len(scored)} of {len(rows)} videos scored: mean LSE-D {np.mean([r['lse_d'] for r in scored]):.3f}, "
              f"mean LSE-C {np.mean([r['lse_c'] for r in scored]):.3f}")

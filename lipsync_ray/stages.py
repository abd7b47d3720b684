"""Prepare / Generate / Compose: plain classes that the in-process pipeline, Ray Data and Ray Serve all wrap.

Each stage declares its resources (what the Ray job and Serve request for it: `ray_resources`), loads its models
in `setup()` (`set_up` builds and sets up a stage for every wrapper) and processes one item per call. Only face
crops, 2x3 matrices, flags and audio tokens cross stage boundaries; full frames are decoded again in Compose.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from more_itertools import chunked

from .ahead import ahead
from .audio import EncodedWindows, chunk_features, mel_ceiling
from .config import InputPolicy, LipSyncConfig
from .diffusion import LipSyncDiffusion
from .enhance import FaceRestorer, five_points, restoration_weights
from .faces import FaceAligner, make_detector
from .faces.detect import Face, FaceDetector
from .media import AudioTooLong, FrameReader, MediaError, VideoInfo, VideoWriter, load_audio, probe_audio, probe_video
from .models.gfpgan import restorer_weights
from .models.syncnet import scorer_weights
from .models.presets import audio_shape, checkpoints_root, load_components, load_whisper
from .plan import FPS, Chunk, chunks, fade_out, fit_audio, output_frame_count, source_frame_map, video_frame_count
from .storage import InputCache, InputTooLarge, check_video

if TYPE_CHECKING:
    from .eval import SyncScorer


ALIGN_GROUP = 8  # frames decoded, detected and aligned together by Prepare
PASTE_GROUP = 16  # frames pasted back together by Compose
PREPARE_NICE = 5  # how much lower the CPU priority of Prepare's worker processes is than the GPU stage's
RESTORE_GPU = 0.25  # of a GPU: what a Compose that restores faces requests in the Ray job and Serve
SPEAKER_SECONDS = 5.0  # of a video's start, whose faces face="speaker" scores against the video's own audio

log = logging.getLogger("lipsync_ray")

T = TypeVar("T")
S = TypeVar("S", "Prepare", "Generate", "Compose")


class NoFaceError(MediaError):
    pass


@dataclass
class VideoPlan:
    video: str
    audio: str
    n_out: int
    source_map: np.ndarray  # (n_out,) source frame per output frame
    chunks: list[Chunk]
    ceiling: float  # clip-wide log-mel ceiling shared by every chunk's audio features
    source: VideoInfo  # the video's frame timestamps, displayed size, rotation and colour
    speaker: np.ndarray | None = None  # face="speaker": the box (x1, y1, x2, y2) to start from (`find_speaker`)

    @property
    def width(self) -> int:
        return self.source.width

    @property
    def height(self) -> int:
        return self.source.height


def local_path(inputs: InputCache | None, url: str | Path) -> str:
    """Stages read inputs through an InputCache when they may be remote (the Ray job), directly otherwise."""
    return inputs.local(str(url)) if inputs is not None else str(url)


def plan_video(
    video: str | Path, audio: str | Path, cfg: LipSyncConfig, inputs: InputCache | None = None,
    limits: InputPolicy | None = None, max_seconds: float | None = None, info: VideoInfo | None = None,
) -> VideoPlan:
    """The frame map and chunks of one video, as long as `cfg.length` says; `video` and `audio` may be URLs when
    `inputs` is given. With `limits`, the video's size and frames and the audio's length (at most
    `limits.max_audio_seconds` and `max_seconds`) are checked on their probes before anything is decoded:
    InputTooLarge naming the field and the input. `info`: the video's probe, where the caller has it already."""
    info = info or probe_video(local_path(inputs, video))
    audio_path = local_path(inputs, audio)
    longest = None
    if limits is not None:
        check_video(info, limits, "video", str(video))
        longest = min(limits.max_audio_seconds, max_seconds if max_seconds is not None else math.inf)
    try:
        if longest is not None:
            probe_audio(audio_path, longest)
        wave = load_audio(audio_path, max_seconds=longest)  # decoding stops past it, whatever the header said
    except AudioTooLong as err:
        raise InputTooLarge("audio", str(err).replace(audio_path, str(audio), 1)) from None
    n_out = output_frame_count(wave.size, video_frames=video_frame_count(info.pts, info.end, info.time_base), length=cfg.length)
    source_map = source_frame_map(n_out, info.pts, info.end, info.time_base, cfg.length)
    return VideoPlan(
        str(video), str(audio), n_out, source_map, chunks(n_out, cfg.windows_per_chunk, overlap=cfg.window_overlap),
        mel_ceiling(fit_audio(wave, n_out)), info,
    )


@dataclass
class PreparedChunk:
    chunk: Chunk
    crops: np.ndarray  # (F, R, R, 3) uint8 aligned faces (faceless frames: nearest face, for the model only)
    matrices: np.ndarray  # (F, 2, 3) frame -> crop
    flags: np.ndarray  # (F,) a face was found
    audio: torch.Tensor  # (F, tokens, dim)
    generated: np.ndarray | None = field(default=None)


@dataclass
class PreparedPart:
    """Prepare's result for a run of a chunk's frames, before faceless frames borrow a face (`assemble`)."""

    frames: range
    crops: np.ndarray  # faceless frames: zeros
    matrices: np.ndarray
    flags: np.ndarray
    audio: torch.Tensor


def _choose(faces: list[Face], previous: Face | None, policy: str, speaker: np.ndarray | None = None) -> Face | None:
    """Follow one face: the policy picks it on its first frame (speaker: the face nearest the `speaker` box that
    planning found, else the largest), then the nearest face to the last one."""
    if not faces:
        return None
    if previous is not None:
        return _nearest(faces, previous.box)
    if policy == "speaker" and speaker is not None:
        return _nearest(faces, speaker)
    rank = int(policy) if policy.isdigit() else 0
    return faces[rank] if rank < len(faces) else None


def _nearest(faces: list[Face], box: np.ndarray) -> Face:
    centre = lambda b: (b[:2] + b[2:]) / 2  # noqa: E731
    return min(faces, key=lambda f: float(np.linalg.norm(centre(f.box) - centre(box))))


@functools.lru_cache(maxsize=2)
def sync_scorer(model: str, checkpoints: str | None, detector: str, device: str) -> SyncScorer:
    """A lip-sync scorer set up once per process: face="speaker" and the bulk job's --score use it per video."""
    from .eval import SyncScorer  # scipy's signal processing, only where scoring runs

    scorer = SyncScorer(model, checkpoints, detector, device)
    scorer.setup()
    return scorer


def find_speaker(plan: VideoPlan, cfg: LipSyncConfig, inputs: InputCache | None = None) -> VideoPlan:
    """`plan` with its `speaker` found when `cfg.face` is "speaker": of the face tracks in the video's first
    SPEAKER_SECONDS, the one whose mouth moves with the video's OWN audio track (the highest SyncNet confidence),
    as its median box; Prepare starts from the face nearest it and follows that face. Without an audio track, or
    without a face track long enough to score, Prepare follows the largest face, with a warning. Called once per
    video where it is planned: `run`, the bulk job's planning tasks, Serve's ingress."""
    if cfg.face != "speaker":
        return plan
    if not plan.source.has_audio:
        log.warning("%s: no audio track to find the speaker by: following the largest face", plan.video)
        return plan
    scorer = sync_scorer(cfg.score_model, cfg.checkpoints, cfg.detector, cfg.resolved_device())
    ranked = scorer.score_tracks(local_path(inputs, plan.video), seconds=SPEAKER_SECONDS)
    if not ranked:
        log.warning("%s: no face seen long enough to find the speaker: following the largest face", plan.video)
        return plan
    return replace(plan, speaker=np.median(ranked[0].track.boxes, 0))


class Prepare:
    """CPU: decode a chunk's frames, detect, follow and align the face, compute the chunk's audio tokens.
    Crops are warped on the CPU everywhere (only each face's region), so every path gives the same crops."""

    resources = {"num_cpus": 1}

    def __init__(self, cfg: LipSyncConfig, inputs: InputCache | None = None):
        self.cfg, self.inputs = cfg, inputs

    def setup(self) -> None:
        preset = self.cfg.preset()
        self.detector: FaceDetector = make_detector(self.cfg.detector, checkpoints_root(self.cfg.checkpoints) / "insightface")
        self.aligner = FaceAligner(preset.resolution)
        self.whisper = load_whisper(preset, self.cfg.checkpoints)
        self._clips = threading.local()  # per calling thread (Serve may call from several): its last clip

    def _clip(self, plan: VideoPlan) -> _OpenClip:
        """The open inputs of `plan`'s clip, kept from the last call on this thread when it was the same clip; the
        audio cut or padded with silence to the output's length."""
        clip: _OpenClip | None = getattr(self._clips, "clip", None)
        key = (plan.video, plan.audio, plan.ceiling, plan.n_out)
        if clip is None or (clip.video, clip.audio, clip.ceiling, clip.n_out) != key:
            if clip is not None:
                clip.reader.close()
            clip = self._clips.clip = _OpenClip(
                plan.video, plan.audio, plan.ceiling, plan.n_out, FrameReader(local_path(self.inputs, plan.video), plan.source),
                fit_audio(load_audio(local_path(self.inputs, plan.audio)), plan.n_out),
            )
        return clip

    def __call__(self, plan: VideoPlan, chunk: Chunk, cfg: LipSyncConfig | None = None) -> PreparedChunk:
        """`cfg` may override the face choice of the stage's own config (per-video parameters)."""
        return assemble(chunk, [self.part(plan, range(chunk.start, chunk.stop), cfg)])

    def part(self, plan: VideoPlan, frames: range, cfg: LipSyncConfig | None = None) -> PreparedPart:
        """Prepare a run of a chunk's frames; `assemble` joins a chunk's parts.

        One pass over the frames, a group at a time: detect, then align the group's faces. A frame's matrix
        depends only on the last `smoothing_memory` faces (see `FaceAligner.estimate`), so it is known as soon
        as its own face is, and each frame is decoded once. The frames before `frames` that feed the smoothing
        are detected again, so a part's result does not depend on who prepared the frames before it."""
        face_policy = (cfg or self.cfg).face
        memory = self.cfg.smoothing_memory
        first = max(0, frames.start - (memory - 1))  # warm-up frames: their faces only feed the smoothing
        lead, n = frames.start - first, len(frames)
        res = self.aligner.resolution
        crops = np.zeros((n, res, res, 3), np.uint8)
        matrices = np.zeros((n + lead, 2, 3), np.float32)
        present = np.zeros(n + lead, bool)
        points: list[np.ndarray] = []  # of the frames with a face, in order
        previous = None
        clip = self._clip(plan)
        for g in range(0, n + lead, ALIGN_GROUP):  # a few full frames in memory at a time
            group = range(g, min(g + ALIGN_GROUP, n + lead))
            images = [clip.reader[int(plan.source_map[first + i])] for i in group]
            found = []
            for i, image in zip(group, images):
                face = _choose(self.detector.detect(image), previous, face_policy, plan.speaker)
                if face is not None:
                    previous, present[i] = face, True
                    points.append(face.points)
                    found.append(i)
            if not found:
                continue
            recent = np.stack(points[-(memory - 1 + len(found)) :])
            m, _ = self.aligner.estimate(recent, memory=memory)
            matrices[found] = m[-len(found) :].numpy()
            own = [i for i in found if i >= lead]
            if own:
                warped = self.aligner.warp([images[i - g] for i in own], torch.from_numpy(matrices[own]))
                crops[[i - lead for i in own]] = self.aligner.to_model_size(warped)
        audio = chunk_features(self.whisper, clip.waveform, frames, self.cfg.audio_mode, plan.ceiling, clip.windows)
        return PreparedPart(frames, crops, matrices[lead:], present[lead:], audio)


@dataclass
class _OpenClip:
    """What Prepare keeps open between calls on one clip: the video's decoder (a later chunk continues it instead
    of seeking back to a keyframe and decoding up to its start again) and the audio with its encoded windows."""

    video: str
    audio: str
    ceiling: float
    n_out: int
    reader: FrameReader
    waveform: np.ndarray
    windows: EncodedWindows = field(default_factory=dict)


def split(chunk: Chunk, parts: int) -> list[range]:
    """A chunk's frames as up to `parts` runs of at least ALIGN_GROUP frames, for Prepare workers to share."""
    n = chunk.stop - chunk.start
    parts = max(1, min(parts, n // ALIGN_GROUP))
    bounds = [chunk.start + n * k // parts for k in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def chunk_parts(plan: VideoPlan, workers: int) -> list[list[range]]:
    """Each chunk's parts for `workers` Prepare workers: the first chunk is split across them, as the GPU waits for
    it alone; later chunks are prepared whole (fewer warm-up frames) while the GPU works on earlier ones."""
    return [split(c, workers if c.index == 0 else 1) for c in plan.chunks]


def assemble(chunk: Chunk, parts: list[PreparedPart]) -> PreparedChunk:
    """A chunk from its parts in frame order; faceless frames then borrow the nearest face over the whole chunk."""
    if [f for p in parts for f in p.frames] != list(range(chunk.start, chunk.stop)):
        raise ValueError(f"parts {[p.frames for p in parts]} do not cover chunk {chunk.index}'s frames")
    join = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    crops, flags = join("crops"), join("flags")
    _fill_gaps(crops, flags)
    return PreparedChunk(chunk, crops, join("matrices"), flags, torch.cat([p.audio for p in parts]))


def lower_priority() -> None:
    """Let this process (a Prepare worker) yield the CPU to the GPU stage: Prepare works ahead and can wait, but a
    thread that launches the GPU's kernels and waits for a core leaves the GPU idle. On Linux this lowers the calling
    thread, and the threads and processes it starts later inherit it."""
    os.nice(PREPARE_NICE)


def at_lower_priority(fn: Callable[..., T], *args) -> T:
    """fn(*args) in a thread of its own at `lower_priority`, so the calling process (a pooled Ray worker, which
    could not raise its priority again) keeps its own for later work."""
    with ThreadPoolExecutor(1, initializer=lower_priority) as pool:
        return pool.submit(fn, *args).result()


def _fill_gaps(crops: np.ndarray, flags: np.ndarray) -> None:
    """Faceless frames get the nearest face's crop, so the model's windows around a gap see a steady face
    (the gap frames themselves are passed through untouched at paste-back)."""
    have = np.flatnonzero(flags)
    if have.size == 0 or have.size == flags.size:
        return
    for i in np.flatnonzero(~flags):
        crops[i] = crops[have[np.argmin(np.abs(have - i))]]


class Generate:
    """GPU (falls back to CPU): latent diffusion over a chunk's windows."""

    resources = {"num_cpus": 1, "num_gpus": 1}
    restoring_resources = {"num_cpus": 1, "num_gpus": 1 - RESTORE_GPU}  # leaves a restoring Compose its share

    def __init__(self, cfg: LipSyncConfig):
        self.cfg = cfg

    def setup(self) -> None:
        device = self.cfg.resolved_device()
        if device.startswith("cuda"):
            _expandable_segments()
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        components = load_components(self.cfg.preset(), self.cfg.checkpoints, device).to(device, dtype)
        self.diffusion = LipSyncDiffusion(
            components, device, dtype, compile=self.cfg.compile, cuda_graphs=self.cfg.cuda_graphs
        )
        self.params = self.cfg.diffusion_params()
        if device.startswith("cuda"):
            self.diffusion.warm_up(self.params, audio_shape(self.cfg.preset()))

    def __call__(self, item: PreparedChunk, cfg: LipSyncConfig | None = None) -> PreparedChunk:
        """`cfg` may override the generation parameters (steps, guidance, seed, scheduler, DeepCache)."""
        if item.flags.any():
            c = item.chunk
            params = cfg.diffusion_params() if cfg is not None else self.params
            item.generated = self.diffusion.generate(
                item.crops, item.audio, list(c.windows), params, self.cfg.window_overlap, offset=c.start
            )
        else:
            item.generated = item.crops
        return item


def _expandable_segments() -> None:
    """Let PyTorch's GPU memory segments grow in place, so fewer sit partly empty: with the same allocations and
    speed, the process reserves about a quarter less (docs/performance.md).
    Applies to what is allocated after it; the user's own setting in the environment wins."""
    if not any("expandable_segments" in os.environ.get(name, "") for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def kept(plan: VideoPlan, chunk: Chunk, overlap: int) -> int:
    """How many of a chunk's frames `stitch` writes from it: all of the last chunk's, the others' up to the
    frames they share with the next chunk (those are written from the next)."""
    frames = chunk.stop - chunk.start
    return frames if chunk.index == plan.chunks[-1].index else frames - overlap  # items may be copies: by index


def stitch(plan: VideoPlan, items: Iterable[PreparedChunk], overlap: int) -> Iterator[tuple[int, np.ndarray, bool, np.ndarray]]:
    """Generated crops of chunks (in chunk order) -> every output frame in order as (frame, crop, has a face,
    matrix), the frames shared by neighbouring chunks crossfaded from the earlier chunk into the later one."""
    carry: np.ndarray | None = None  # the previous chunk's crops for the shared frames
    for item in items:
        c, crops = item.chunk, item.generated
        if carry is not None:
            ramp = fade_out(len(carry))[:, None, None, None]
            crops = crops.copy()
            crops[: len(carry)] = np.round(carry * ramp + crops[: len(carry)] * (1 - ramp)).astype(np.uint8)
        keep = kept(plan, c, overlap)
        carry = crops[keep:] if keep < c.stop - c.start else None
        for i in range(keep):
            yield c.start + i, crops[i], bool(item.flags[i]), item.matrices[i]


class Compose:
    """CPU: stitch chunks in frame order, paste the faces back into the decoded frames, encode, mux, move.
    `device` is where faces are pasted back (the in-process pipeline passes its GPU). With `enhance` the pasted
    faces are restored right after paste-back, on the same device (see `_Restoration`).

    Frames are pasted PASTE_GROUP at a time. On a GPU that runs on a CUDA stream of its own: each group waits for
    its result, and on the default stream that wait would also cover all the diffusion work that Generate (another
    thread) has queued there. The stream has high priority, so its kernels are scheduled before the U-Net's when
    SMs free up."""

    resources = {"num_cpus": 1}
    # restoring faces (`enhance`): a share of a GPU, so that the Ray job and Serve restore where the GPU is
    restoring_resources = {"num_cpus": 1, "num_gpus": RESTORE_GPU}

    def __init__(self, cfg: LipSyncConfig, inputs: InputCache | None = None, device: str = "cpu"):
        self.cfg, self.inputs, self.device = cfg, inputs, device

    def setup(self) -> None:
        self.aligner = FaceAligner(self.cfg.preset().resolution, self.device)
        self.stream = torch.cuda.Stream(self.device, priority=-1) if torch.device(self.device).type == "cuda" else None
        if self.cfg.enhance != "none":  # loaded now: missing weights fail here, not in the middle of a video
            face_restorer(self.cfg.enhance, self.cfg.checkpoints, str(self.device))

    def __call__(
        self, plan: VideoPlan, items: Iterable[PreparedChunk], output: str | Path, progress=None,
        cfg: LipSyncConfig | None = None, stats: dict[str, float] | None = None,
    ) -> int:
        """`items` yields PreparedChunks in chunk order; returns the number of frames written. `cfg` may override
        the stage's face restoration (per-video parameters); `stats["enhance_s"]` adds up its seconds.

        Three threads overlap: one decodes the next groups of source frames (their order is known from the plan
        alone), this one pastes, and one feeds the encoder. Each holds at most two groups ahead."""
        written = 0
        restoration = _Restoration.of(cfg or self.cfg, self.aligner, str(self.device))
        video, audio = local_path(self.inputs, plan.video), local_path(self.inputs, plan.audio)
        groups = [range(f, min(f + PASTE_GROUP, plan.n_out)) for f in range(0, plan.n_out, PASTE_GROUP)]
        with (
            FrameReader(video, plan.source) as reader,
            VideoWriter(
                output, plan.width, plan.height, audio, FPS, self.cfg.crf, plan.source.colour, self.cfg.x264_preset, plan.n_out,
            ) as writer,
            torch.cuda.stream(self.stream) if self.stream is not None else nullcontext(),
        ):

            def decode(frames: range) -> list[np.ndarray]:
                return [reader[int(plan.source_map[f])] for f in frames]

            with closing(ahead(decode, groups, depth=2)) as decoded:
                stitched = chunked(stitch(plan, items, self.cfg.window_overlap), PASTE_GROUP)
                pasted = (self._paste(group, frames, restoration) for group, frames in zip(stitched, decoded))
                with closing(ahead(writer.write_all, pasted, depth=2)) as encoded:
                    for count in encoded:
                        written += count
                        if progress:
                            progress(count)
        if stats is not None and restoration is not None:
            stats["enhance_s"] = stats.get("enhance_s", 0.0) + restoration.seconds
        return written

    def _paste(self, group, frames: list[np.ndarray], restoration: _Restoration | None = None) -> list[np.ndarray]:
        """Stitched output frames `group` pasted into their decoded source `frames` (and their faces restored)."""
        with_face = [i for i, (_, _, has_face, _) in enumerate(group) if has_face]
        if with_face:
            crops = torch.from_numpy(np.stack([group[i][1] for i in with_face])).permute(0, 3, 1, 2).float() / 127.5 - 1
            matrices = torch.from_numpy(np.stack([group[i][3] for i in with_face]))
            faces, sources = self.aligner.from_model_size(crops), np.stack([frames[i] for i in with_face])
            if restoration is None:
                pasted = self.aligner.restore(sources, faces, matrices).numpy()
            else:  # the restoration masks from the same paste-back pass
                pasted, masks = self.aligner.restore(sources, faces, matrices, restoration.weights)
                pasted = restoration(pasted.numpy(), matrices, masks)
            for i, frame in zip(with_face, pasted):
                frames[i] = frame
        return frames


@functools.lru_cache(maxsize=2)
def face_restorer(preset: str, checkpoints: str | None, device: str) -> FaceRestorer:
    """A face restorer loaded once per process: a Ray worker composes many videos, Serve's ingress many requests."""
    restorer = FaceRestorer(preset, checkpoints, device)
    restorer.setup()
    return restorer


@dataclass
class _Restoration:
    """Compose's face restoration for one video: GFPGAN on the pasted frames, blended back only inside the
    regenerated lower face (`enhance.restoration_masks`), faces batched as Compose pastes them; `seconds` adds up
    its time. Runs in fp32 (fp16 has not been compared with it on a GPU yet)."""

    restorer: FaceRestorer
    aligner: FaceAligner
    strength: float
    seconds: float = 0.0

    def __post_init__(self):
        self.weights = restoration_weights(self.aligner)  # for the paste-back that makes the masks

    @classmethod
    def of(cls, cfg: LipSyncConfig, aligner: FaceAligner, device: str) -> _Restoration | None:
        if cfg.enhance == "none":
            return None
        return cls(face_restorer(cfg.enhance, cfg.checkpoints, device), aligner, cfg.enhance_strength)

    def __call__(self, frames: np.ndarray, matrices: torch.Tensor, masks: np.ndarray) -> np.ndarray:
        """Pasted frames (F, H, W, 3) uint8 whose faces `matrices` (F, 2, 3) aligned, restored inside their
        restoration masks (F, H, W) uint8 (`FaceAligner.restore` with `weights`)."""
        start = time.perf_counter()
        restored = self.restorer(frames, five_points(self.aligner, matrices), masks, self.strength)
        self.seconds += time.perf_counter() - start
        return restored


def compose_device(cfg: LipSyncConfig) -> str:
    """Where a Ray task's or Serve replica's Compose works: on the GPU share it requested when it restores faces
    (`ray_resources`), else on its CPU."""
    return cfg.resolved_device() if cfg.enhance != "none" else "cpu"


class MissingWeights(FileNotFoundError):
    """An optional model's weights are not installed; `option` is the config field that asked for the model."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def check_weights(cfg: LipSyncConfig, scoring: bool = False) -> None:
    """Raise MissingWeights, naming the file and the command that downloads it, when an optional model that `cfg`
    (or `scoring` outputs) asks for has no weights: called before any video work starts (`run`, the bulk job,
    Serve)."""
    wanted = [("enhance", restorer_weights, cfg.enhance)] if cfg.enhance != "none" else []
    if cfg.face == "speaker" or scoring:
        wanted.append(("face" if cfg.face == "speaker" else "score", scorer_weights, cfg.score_model))
    for option, weights, name in wanted:
        try:
            weights(name, cfg.checkpoints)
        except FileNotFoundError as err:
            raise MissingWeights(option, str(err)) from None


def set_up(stage_class: type[S], *args, **kwargs) -> S:
    """A stage built and its models loaded: how the pipeline, the Ray job and Serve all start one."""
    stage = stage_class(*args, **kwargs)
    stage.setup()
    return stage


def ray_resources(stage_class: type, gpu: bool = True, restoring: bool = False) -> dict[str, float]:
    """What a Ray actor, task or Serve replica running `stage_class` requests: its declared resources, less the GPU
    where there is none (the GPU stage then runs on a CPU). `restoring`: the work restores faces, and a stage
    that declares `restoring_resources` requests those (Compose a quarter of a GPU, Generate the rest of one)."""
    declared = getattr(stage_class, "restoring_resources", stage_class.resources) if restoring else stage_class.resources
    return {k: v for k, v in declared.items() if gpu or k != "num_gpus"}

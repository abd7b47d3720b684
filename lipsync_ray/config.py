"""One configuration model for the CLI, the Ray Data job and Ray Serve."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from .plan import LengthMode

X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]

if TYPE_CHECKING:
    from .diffusion import DiffusionParams
    from .models.presets import ModelPreset

EnhanceMode = Literal["none", "gfpgan", "tiny-random", "gfpgan-random"]  # face restoration: off, or a `models.gfpgan.RESTORERS` preset


class LipSyncConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "latentsync-1.6",
        description="latentsync-1.5 (256 px), latentsync-1.6 (512 px), tiny-random, latentsync-1.x-random (benchmarks), or a U-Net .pt path",
    )
    resolution: Literal[128, 256, 512] | None = Field(None, description="face size in px (default: the model's own)")
    checkpoints: str | None = Field(None, description="checkpoints folder (default: ./checkpoints or $LIPSYNC_CHECKPOINTS)")
    steps: int = Field(20, ge=1, le=200, description="denoising steps")
    guidance: float = Field(1.5, ge=1.0, le=20.0, description="classifier-free guidance scale (1 = off)")
    seed: int = Field(1247, description="seed of the initial noise")
    scheduler: Literal["ddim", "dpm++"] = Field("ddim", description="ddim (upstream) or dpm++ (fewer steps)")
    deepcache: int = Field(0, ge=0, le=10, description="DeepCache interval: 0 off, 3 as upstream's --enable_deepcache")
    audio_mode: Literal["seamless", "upstream"] = Field(
        "seamless", description="seamless, or upstream (hard 30 s Whisper windows)"
    )
    detector: Literal["auto", "insightface", "offline"] = Field(
        "auto", description="auto (insightface when its files are present, else offline), insightface, offline"
    )
    face: str = Field(
        "largest", description="face to follow: largest, its rank by size (0 = largest), or speaker (the face whose mouth moves with the video's own audio, by SyncNet; else the largest)"
    )
    on_no_face: Literal["error", "passthrough"] = Field(
        "error", description="a video with no face at all: error, or passthrough (keep it)"
    )
    length: LengthMode = Field(
        "pingpong", description="output length: pingpong (as the audio; a shorter video plays forward and backward), loop (as the audio; the video restarts), cut (the shorter of video and audio), silence (the whole video, the audio padded with silence; longer audio ping-pongs it)"
    )
    crf: int = Field(18, ge=0, le=51, description="H.264 quality, x264's CRF (lower: better and larger; 18 is visually lossless)")
    x264_preset: X264Preset = Field(
        "veryfast", description="x264 preset, ultrafast ... veryslow (slower encodes compress better)"
    )
    window_overlap: int = Field(4, ge=0, le=8, description="frames shared by neighbouring 16-frame windows")
    windows_per_chunk: int = Field(8, ge=1, description="16-frame windows per chunk, the unit of work a worker takes")
    windows_per_batch: int = Field(4, ge=1, description="windows per U-Net call")
    compile: bool = Field(False, description="torch.compile the U-Net (GPU: a slower first chunk, faster after)")
    cuda_graphs: bool = Field(
        True, description="GPU: replay the U-Net's steps as CUDA graphs (a video's last U-Net batch is then padded to full)"
    )
    prepare_workers: int | None = Field(
        None, ge=0, le=64, description="`run`: Prepare (decode, faces, audio) in N worker processes; 0: a thread (default on a GPU host: 2 with 8-15 cores, 4 with 16+, else 0)"
    )
    enhance: EnhanceMode = Field(
        "none", description="face restoration after paste-back: none, gfpgan (GFPGAN v1.4: sharper mouth and teeth; `lipsync-ray download --enhance`), tiny-random (random weights, for tests), gfpgan-random (v1.4's size with random weights, for benchmarks)"
    )
    enhance_strength: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the restored face in its blend with the generated one, 0..1"
    )
    score_model: Literal["syncnet-v2", "tiny-random"] = Field(
        "syncnet-v2", description="lip-sync scorer for --face speaker and the bulk job's --score: syncnet-v2 (`lipsync-ray download --eval`) or tiny-random (random weights, for tests)"
    )
    smoothing_memory: int = Field(8, ge=1, description="frames of alignment smoothing history")
    device: str = Field("auto", description="auto, cpu or cuda[:N]")

    @model_validator(mode="after")
    def _check(self) -> "LipSyncConfig":
        if self.windows_per_chunk % self.windows_per_batch and self.windows_per_batch < self.windows_per_chunk:
            raise ValueError("windows_per_chunk must be a multiple of windows_per_batch (chunk-invariant batches)")
        if self.face not in ("largest", "speaker") and not self.face.isdigit():
            raise ValueError(f"face must be 'largest', 'speaker' or a number, got {self.face!r}")
        return self

    def with_params(self, params: dict[str, Any]) -> "LipSyncConfig":
        """This config with per-video or per-request parameters over it, validated."""
        return LipSyncConfig.model_validate({**self.model_dump(), **params}) if params else self

    def preset(self) -> "ModelPreset":
        from .models.presets import get_preset

        return get_preset(self.model, self.resolution)

    def diffusion_params(self) -> "DiffusionParams":
        from .diffusion import DiffusionParams

        per_batch = min(self.windows_per_batch, self.windows_per_chunk)  # a batch never spans chunks
        return DiffusionParams(self.steps, self.guidance, self.seed, self.scheduler, per_batch, self.deepcache)

    def resolved_prepare_workers(self) -> int:
        """Worker processes keep Prepare's Python off the GIL that the thread launching the GPU's kernels needs;
        on a CPU, or with few cores, they only compete with the other stages. With 16 cores 4 workers prepare the
        first chunk sooner than 2, for more host memory (docs/performance.md)."""
        if self.prepare_workers is not None:
            return self.prepare_workers
        cores = os.cpu_count() or 1
        if not self.resolved_device().startswith("cuda") or cores < 8:
            return 0
        return 4 if cores >= 16 else 2

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class InputPolicy(BaseModel):
    """Which inputs a service or job accepts: the URL rules of `storage.check_url` and the video and audio limits
    checked on the probes, before anything is decoded (`stages.plan_video`; see the README's Security section)."""

    model_config = ConfigDict(extra="forbid")

    protocols: tuple[str, ...] = Field(("s3", "gs", "https"), description="URL schemes read (add http for plain http)")
    local_paths: bool = Field(False, description="local paths and file:// URLs")
    allowed_hosts: tuple[str, ...] = Field(
        (), description="http(s) hosts (name or IP, optionally :port) read whatever addresses they resolve to"
    )
    allow_private_networks: bool = Field(
        False, description="http(s) hosts on private networks (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7); never loopback, link-local or metadata addresses"
    )
    max_video_pixels: int = Field(3840 * 2160, gt=0, description="largest video frame (width x height)")
    max_video_frames: int = Field(90_000, gt=0, description="longest video in frames (an hour at 25 fps)")
    max_audio_seconds: float = Field(
        3600.0, gt=0, description="longest audio in seconds (an hour), judged by the probe before it is decoded"
    )


class BatchConfig(BaseModel):
    """The bulk job: where things are, how the actor pools scale, and the pipeline's own config."""

    model_config = ConfigDict(extra="forbid")

    catalog: str
    output: str
    pipeline: LipSyncConfig = Field(default_factory=LipSyncConfig)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for every URL")
    inputs: InputPolicy = Field(
        default_factory=lambda: InputPolicy(local_paths=True),
        description="what rows may read: local paths too by default, since the catalog is the operator's own",
    )
    output_prefixes: tuple[str, ...] = Field(
        (), description="further prefixes a row's `output` may name (by default only places under `output`)"
    )
    gpu: bool | None = Field(None, description="Generate actors take one GPU each; None: when the cluster has GPUs")
    prepare_actors: tuple[int, int | None] = Field(
        (2, None), description="CPU actor pool size: min,max (no max: up to 4 per GPU the GPU pool may reach, those the cluster has when the job starts or --generate-actors' max; at least 4); it grows while it has runs queued"
    )
    generate_actors: tuple[int, int | None] = Field(
        (1, None), description="GPU actor pool size: min,max (no max: up to one per GPU the cluster has or its autoscaler adds; without GPUs, one)"
    )
    chunks_per_batch: int = Field(
        1, ge=1, description="chunks per Generate call (more: fewer calls, but a coarser split of the job's last chunks over the GPUs)"
    )
    chunks_per_prepare: int = Field(
        1, ge=1, description="consecutive chunks of a video one Prepare call takes in order (fewer: more actors on one video, but more seeking and audio encoding)"
    )
    generate_prefetch: int = Field(
        1, ge=1, description="Generate calls at each GPU actor at once, one on the GPU (more: the others' unpickling and staging overlap its GPU work; fewer: a finer split of the job's last chunks over the GPUs); a pool that may grow queues as many again at each actor, which is what makes Ray Data grow it"
    )
    prepare_memory_gb: float = Field(3.0, gt=0, description="memory each Prepare actor declares")
    score: bool = Field(
        False, description="score each output's lip sync with SyncNet as it is written: manifest columns lse_c, lse_d, av_offset, score_s"
    )
    min_confidence: float | None = Field(
        None, description="with --score, mark outputs whose LSE-C is below this (or that cannot be scored) low_sync; they are kept"
    )

    @model_validator(mode="after")
    def _check(self) -> "BatchConfig":
        if self.min_confidence is not None and not self.score:
            raise ValueError("min_confidence needs score (--score): outputs are marked low_sync by their scores")
        return self

    @property
    def manifest_url(self) -> str:
        from . import storage

        return storage.join(self.output, "manifest.parquet")


class ServeConfig(BaseModel):
    """Everything the Serve app takes (the `args` of the serve config)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: LipSyncConfig = Field(default_factory=LipSyncConfig)
    api_key: SecretStr | None = Field(None, description="required X-API-Key header; default $LIPSYNC_API_KEY, unset = open")
    inputs: InputPolicy = Field(default_factory=InputPolicy, description="which URLs are fetched, video size limits")
    max_upload_bytes: int = Field(200 * 2**20, gt=0, description="per uploaded or fetched file, enforced while it streams")
    input_timeout_s: float = Field(120.0, gt=0, description="time to receive a request's inputs (upload or fetch); then 408")
    max_sync_seconds: float = Field(60.0, description="longest output (audio) for POST /v1/lipsync; longer: /v1/jobs")
    max_job_seconds: float = Field(600.0, description="longest output for POST /v1/jobs")
    output_prefix: str | None = Field(None, description="async results are uploaded here and returned as URLs")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    work_dir: str | None = Field(None, description="temporary files (default: the system temp dir)")
    gpu: bool = Field(True, description="Generate replicas take one GPU each")
    prepare_replicas: tuple[int, int] = (1, 4)
    generate_replicas: tuple[int, int] = (1, 4)
    max_ongoing_requests: int = Field(4, description="requests one ingress replica works on at once")
    max_queued_requests: int = Field(8, description="requests waiting beyond that; more get 503 + Retry-After")
    retry_after_s: int = 5

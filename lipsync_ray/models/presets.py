"""Model presets and component loading: the published LatentSync 1.5 / 1.6 checkpoints, or `tiny-random`.

Checkpoint layout under the checkpoints root (default ./checkpoints, or $LIPSYNC_CHECKPOINTS):
    latentsync-1.5/latentsync_unet.pt     latentsync-1.6/latentsync_unet.pt
    whisper/tiny.pt                        (openai format, shared by both versions)
    sd-vae-ft-mse/                         (diffusers AutoencoderKL folder)
    insightface/models/buffalo_l/*.onnx    (face detection + 106 landmarks)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from whisper.model import ModelDimensions

from ..audio import WhisperFeatureEncoder
from ..audio.whisper_features import tokens_per_frame
from .checkpoint import checkpoints_root

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from .unet import UNet3DConditionModel

VAE_SCALING = 0.18215
VAE_SHIFT = 0.0


def config_path(*parts: str) -> Path:
    return Path(str(resources.files("lipsync_ray.configs").joinpath(*parts)))


def load_unet_config(name: str) -> dict[str, Any]:
    """The `model:` section of a U-Net yaml under configs/unet (a file name) or at a path."""
    path = Path(name) if Path(name).is_file() else config_path("unet", name)
    return yaml.safe_load(path.read_text())["model"]


@dataclass(frozen=True)
class ModelPreset:
    name: str
    resolution: int
    unet_config: str
    hf_repo: str | None = None
    vae_repo: str | None = None
    random_weights: bool = False
    vae_config: str = "sd-vae-ft-mse.json"  # configs/vae: the architecture that random weights are built for
    whisper_config: str = "tiny.json"  # configs/whisper: likewise
    description: str = ""
    unet_file: str | None = None  # a U-Net checkpoint outside the checkpoints layout (`--model PATH`)

    def unet_path(self, root: Path) -> Path:
        return Path(self.unet_file) if self.unet_file else root / self.name / "latentsync_unet.pt"


UNET_CONFIGS = {256: "stage2.yaml", 512: "stage2_512.yaml"}  # same architecture, trained at 256 / 512 px faces

PRESETS: dict[str, ModelPreset] = {
    "latentsync-1.5": ModelPreset(
        "latentsync-1.5", 256, UNET_CONFIGS[256], "ByteDance/LatentSync-1.5", "stabilityai/sd-vae-ft-mse",
        description="LatentSync 1.5, 256 px faces",
    ),
    "latentsync-1.6": ModelPreset(
        "latentsync-1.6", 512, UNET_CONFIGS[512], "ByteDance/LatentSync-1.6", "stabilityai/sd-vae-ft-mse",
        description="LatentSync 1.6, 512 px faces",
    ),
    "tiny-random": ModelPreset(
        "tiny-random", 128, "tiny-random.yaml", random_weights=True, vae_config="tiny-random.json",
        whisper_config="tiny-random.json",
        description="small random-weight model for tests and smoke runs: produces MEANINGLESS MOUTHS",
    ),
    # the published architectures and FLOPs with random weights, for benchmarks on hosts without the weights
    "latentsync-1.5-random": ModelPreset(
        "latentsync-1.5-random", 256, UNET_CONFIGS[256], random_weights=True,
        description="LatentSync 1.5's architecture with random weights, for benchmarks: MEANINGLESS MOUTHS",
    ),
    "latentsync-1.6-random": ModelPreset(
        "latentsync-1.6-random", 512, UNET_CONFIGS[512], random_weights=True,
        description="LatentSync 1.6's architecture with random weights, for benchmarks: MEANINGLESS MOUTHS",
    ),
}


def get_preset(name: str, resolution: int | None = None) -> ModelPreset:
    """A named preset, or `name` as the path of a LatentSync U-Net checkpoint (512 px unless `resolution` says).
    `resolution` overrides the face size the model runs at (each published model is trained at its own)."""
    if name in PRESETS:
        preset = PRESETS[name]
        return replace(preset, resolution=resolution) if resolution else preset
    if Path(name).is_file():
        res = resolution or 512
        return ModelPreset(
            Path(name).stem, res, UNET_CONFIGS[res], vae_repo="stabilityai/sd-vae-ft-mse", unet_file=str(name),
            description=f"U-Net checkpoint {name}",
        )
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)} or the path of a U-Net checkpoint")


@dataclass
class Components:
    """The networks the diffusion step needs (the audio encoder runs in Prepare: `load_whisper`), built once per
    worker."""

    preset: ModelPreset
    unet: UNet3DConditionModel
    vae: AutoencoderKL

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Components":
        from .vae import fuse_vae

        for model in (self.unet, self.vae):
            model.to(device)
            if next(model.parameters()).dtype != dtype:  # diffusers warns on every cast, even a no-op one
                model.to(dtype=dtype)
        self.unet.to(memory_format=torch.channels_last)  # its activations' layout (models/blocks.py)
        fuse_vae(self.vae)  # channels-last too (models/vae.py)
        return self


def make_scheduler(kind: str = "ddim"):
    """DDIM exactly as upstream, or DPM-Solver++ (multistep, 2nd order) from the same betas: fewer steps."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = json.loads(config_path("scheduler_config.json").read_text())
    if kind == "ddim":
        return DDIMScheduler.from_config(cfg)
    if kind == "dpm++":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {kind!r}: ddim or dpm++")


def _missing(what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {path}: run `lipsync-ray download` (or set LIPSYNC_CHECKPOINTS)")


def _whisper_dims(preset: ModelPreset) -> ModelDimensions:
    return ModelDimensions(**json.loads(config_path("whisper", preset.whisper_config).read_text()))


def audio_shape(preset: ModelPreset) -> tuple[int, int]:
    """(tokens, dim) of one video frame's audio conditioning (`audio.whisper_features.frame_features`)."""
    dims = _whisper_dims(preset)
    return tokens_per_frame(dims.n_audio_layer + 1), dims.n_audio_state


def _random_whisper(preset: ModelPreset) -> WhisperFeatureEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return WhisperFeatureEncoder(_whisper_dims(preset)).eval()


def build_random_components(preset: ModelPreset, seed: int = 0, device: str | torch.device = "cpu") -> Components:
    """Seeded random weights of the preset's architecture (tiny-random, or the real sizes for benchmarks).

    The U-Net and VAE are initialised on `device`: on a GPU in milliseconds, where a 1-CPU worker takes most
    of a minute for the real sizes (the weights then differ from a CPU build's, seeded all the same)."""
    from diffusers import AutoencoderKL

    from .unet import UNet3DConditionModel

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet3DConditionModel.from_config(load_unet_config(preset.unet_config))
        vae = AutoencoderKL.from_config(json.loads(config_path("vae", preset.vae_config).read_text()))
    return Components(preset, unet.eval(), vae.eval())


def load_whisper(model: str | ModelPreset, root: str | Path | None = None) -> WhisperFeatureEncoder:
    """Only the audio encoder, for CPU workers that need no U-Net or VAE."""
    preset = model if isinstance(model, ModelPreset) else get_preset(model)
    if preset.random_weights:
        return _random_whisper(preset)
    path = checkpoints_root(root) / "whisper" / "tiny.pt"
    if not path.exists():
        raise _missing("whisper tiny", path)
    return WhisperFeatureEncoder.from_checkpoint(path)


def load_components(model: str | ModelPreset, root: str | Path | None = None, device: str = "cpu") -> Components:
    """Load a preset's published weights from the checkpoints root (strict), or build random ones on `device`."""
    from diffusers import AutoencoderKL

    from .unet import UNet3DConditionModel

    preset = model if isinstance(model, ModelPreset) else get_preset(model)
    if preset.random_weights:
        return build_random_components(preset, device=device)
    root = checkpoints_root(root)
    unet_file, vae_dir = preset.unet_path(root), root / "sd-vae-ft-mse"
    for what, path in [("LatentSync U-Net", unet_file), ("VAE", vae_dir)]:
        if not path.exists():
            raise _missing(what, path)
    with torch.device("meta"):
        unet = UNet3DConditionModel.from_config(load_unet_config(preset.unet_config))
    unet.load_checkpoint(unet_file)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    return Components(preset, unet.eval(), vae.eval())

"""LatentSync's audio-conditioned 3D U-Net, loadable from the published checkpoints unchanged.

`UNet3DConditionModel.from_config(cfg)` takes the `model:` section of upstream `configs/unet/stage2*.yaml`.
The state-dict keys, shapes and the forward numerics match upstream LatentSync (the facts recorded in tests/data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from ..diffusion import DeepCache

from .blocks import (
    Downsample3D,
    MotionModule,
    ResnetBlock3D,
    SpatialTransformer3D,
    Upsample3D,
    from_frame_batch,
    group_norm,
    to_frame_batch,
)

DownType = Literal["CrossAttnDownBlock3D", "DownBlock3D"]
UpType = Literal["CrossAttnUpBlock3D", "UpBlock3D"]


class UNetConfig(BaseModel):
    """The upstream U-Net config. Unknown keys are rejected so that a config we would misread fails loudly."""

    model_config = ConfigDict(extra="forbid")

    sample_size: int | None = None
    in_channels: int = 13
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: list[DownType] = Field(
        default_factory=lambda: ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"]
    )
    mid_block_type: Literal["UNetMidBlock3DCrossAttn"] = "UNetMidBlock3DCrossAttn"
    up_block_types: list[UpType] = Field(default_factory=lambda: ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3)
    block_out_channels: list[int] = Field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: Literal["silu"] = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 384
    # Upstream (like diffusers' legacy UNet2DConditionModel) uses this as the NUMBER of heads.
    attention_head_dim: int | list[int] = 8
    resnet_time_scale_shift: Literal["default"] = "default"
    add_audio_layer: bool = True
    use_motion_module: bool = True
    motion_module_resolutions: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_type: Literal["Vanilla"] = "Vanilla"
    motion_module_kwargs: dict[str, Any] = Field(default_factory=dict)

    def heads(self, block: int) -> int:
        h = self.attention_head_dim
        return h[block] if isinstance(h, list) else h


@dataclass
class UNet3DOutput:
    sample: torch.Tensor


class _Block(nn.Module):
    """One resolution level: resnets, optional audio transformers and motion modules, optional resampler."""

    def __init__(
        self,
        cfg: UNetConfig,
        resnet_in: list[int],
        out_channels: int,
        cross_attention: bool,
        motion: bool,
        heads: int,
    ):
        super().__init__()
        temb = cfg.block_out_channels[0] * 4
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock3D(c, out_channels, temb, g, eps) for c in resnet_in])
        audio_dim = cfg.cross_attention_dim if cfg.add_audio_layer else None
        self.attentions = (
            nn.ModuleList([SpatialTransformer3D(out_channels, heads, g, audio_dim) for _ in resnet_in])
            if cross_attention
            else None
        )
        self.motion_modules = (
            nn.ModuleList([MotionModule(out_channels, cfg.motion_module_kwargs) for _ in resnet_in])
            if motion
            else None
        )

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None, frames: int):
        x = self.resnets[i](x, temb, frames)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
        if self.motion_modules is not None:
            x = self.motion_modules[i](x, frames)
        return x


class DownBlock(_Block):
    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, cross: bool, motion: bool, heads: int, last: bool):
        super().__init__(cfg, [in_ch] + [out_ch] * (cfg.layers_per_block - 1), out_ch, cross, motion, heads)
        self.downsamplers = None if last else nn.ModuleList([Downsample3D(out_ch, cfg.downsample_padding)])

    def forward(self, x, temb, context, frames):
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context, frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(_Block):
    def __init__(
        self, cfg: UNetConfig, skip_chs: list[int], prev_ch: int, out_ch: int, cross, motion, heads, last: bool
    ):
        resnet_in = [(prev_ch if i == 0 else out_ch) + s for i, s in enumerate(skip_chs)]
        super().__init__(cfg, resnet_in, out_ch, cross, motion, heads)
        self.upsamplers = None if last else nn.ModuleList([Upsample3D(out_ch)])

    def forward(self, x, skips, temb, context, frames, upsample_size=None, first: int = 0, keep: int | None = None):
        """-> (output, the features entering layer `keep`, or None)."""
        kept = None
        for i in range(first, len(self.resnets)):
            if i == keep:
                kept = x
            x = torch.cat([x, skips.pop()], dim=1)
            x = self.layer(i, x, temb, context, frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x, kept


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int, heads: int, motion: bool):
        super().__init__()
        temb = cfg.block_out_channels[0] * 4
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        audio_dim = cfg.cross_attention_dim if cfg.add_audio_layer else None
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, temb, g, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer3D(channels, heads, g, audio_dim)])
        self.motion_modules = nn.ModuleList([MotionModule(channels, cfg.motion_module_kwargs)]) if motion else None

    def forward(self, x, temb, context, frames):
        x = self.resnets[0](x, temb, frames)
        x = self.attentions[0](x, context)
        if self.motion_modules is not None:
            x = self.motion_modules[0](x, frames)
        return self.resnets[1](x, temb, frames)


def deepcache_layer(block: "UpBlock") -> int:
    """DeepCache's branch point (branch 0, as upstream): the layer of the last up block that takes the first down
    layer's skip. A full step keeps the features entering it; a shallow step starts there."""
    return len(block.resnets) - 2


class UNet3DConditionModel(nn.Module):
    """Inputs: sample (b, 13, f, h, w) = noisy latents, mask, masked latents, reference latents;
    timestep (int or tensor); encoder_hidden_states = per-frame audio tokens (b*f, n, d) or (b, f, n, d).
    Runs fastest with channels-last weights, `.to(memory_format=torch.channels_last)` (`Components.to` does it):
    its activations are channels-last, and a convolution would otherwise convert its weight on every call."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        if cfg.mid_block_scale_factor != 1:
            raise ValueError("mid_block_scale_factor other than 1 is not supported")
        chs = cfg.block_out_channels
        levels = len(chs)
        if len(cfg.down_block_types) != levels or len(cfg.up_block_types) != levels:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")

        def has_motion(resolution: int, decoder: bool) -> bool:
            return (
                cfg.use_motion_module
                and resolution in cfg.motion_module_resolutions
                and (decoder or not cfg.motion_module_decoder_only)
            )

        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_proj = Timesteps(chs[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(chs[0], chs[0] * 4)

        self.down_blocks = nn.ModuleList()
        resolution = 1
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(
                DownBlock(
                    cfg,
                    chs[i - 1] if i else chs[0],
                    chs[i],
                    kind == "CrossAttnDownBlock3D",
                    has_motion(resolution, decoder=False),
                    cfg.heads(i),
                    last=i == levels - 1,
                )
            )
            if i < levels - 1:
                resolution *= 2

        self.mid_block = MidBlock(cfg, chs[-1], cfg.heads(levels - 1), cfg.use_motion_module and cfg.motion_module_mid_block)

        # skip channels, in the order the decoder consumes them (last produced first)
        skip_chs = [chs[0]]
        for i in range(levels):
            skip_chs += [chs[i]] * cfg.layers_per_block + ([chs[i]] if i < levels - 1 else [])
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chs))
        rev_heads = [cfg.heads(i) for i in reversed(range(levels))]
        prev = chs[-1]
        for i, kind in enumerate(cfg.up_block_types):
            n = cfg.layers_per_block + 1
            mine = [skip_chs.pop() for _ in range(n)]
            self.up_blocks.append(
                UpBlock(
                    cfg,
                    mine,
                    prev,
                    rev[i],
                    kind == "CrossAttnUpBlock3D",
                    has_motion(resolution, decoder=True),
                    rev_heads[i],
                    last=i == levels - 1,
                )
            )
            prev = rev[i]
            resolution //= 2

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: dict[str, Any] | UNetConfig) -> "UNet3DConditionModel":
        return cls(config if isinstance(config, UNetConfig) else UNetConfig.model_validate(dict(config)))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def load_checkpoint(self, path: str | Path) -> int | None:
        """Load a `latentsync_unet.pt` strictly; returns its `global_step`."""
        from .checkpoint import load_unet_state_dict

        return load_unet_state_dict(self, path)

    def _embed_time(self, timestep: int | float | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """-> the timestep embedding, one row per frame of the frame batch."""
        batch, frames = sample.shape[0], sample.shape[2]
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.long)
        t = t.to(self.device).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        if t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch}")
        return self.time_embedding(self.time_proj(t).to(sample.dtype)).repeat_interleave(frames, 0)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        cache: "DeepCache | None" = None,
    ) -> UNet3DOutput | tuple[torch.Tensor]:
        if sample.ndim != 5:
            raise ValueError(f"sample must be (batch, channels, frames, height, width), got {tuple(sample.shape)}")
        b, _, f, h, w = sample.shape
        context = encoder_hidden_states
        if context is not None:
            if context.ndim == 4:  # (b, f, n, d) -> (b*f, n, d), row = batch * f + frame
                context = context.reshape(-1, *context.shape[2:])
            if context.shape[0] != b * f:
                raise ValueError(f"audio embeds have {context.shape[0]} rows, expected batch*frames = {b * f}")
            context = context.to(sample.dtype)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        if cache is not None and cache.reuse():
            x = self.shallow(sample, timestep, context, cache.features)
        else:
            x, features = self.deep(sample, timestep, context, cache is not None)
            if cache is not None:
                cache.features = features
        return UNet3DOutput(sample=x) if return_dict else (x,)

    # `deep` and `shallow` hold all the tensor work and no Python state, so torch.compile and CUDA graphs can take
    # each whole (`diffusion.compile_steps`, `diffusion.graph_steps`); `forward` follows DeepCache's schedule.
    def deep(self, sample: torch.Tensor, timestep, context: torch.Tensor | None, keep_features: bool = False):
        """The full U-Net -> (noise prediction, DeepCache's features or None)."""
        x, temb, frames = self._in(sample, timestep)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context, frames)
            skips += s
        x = self.mid_block(x, temb, context, frames)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            # upsample to the next skip's size, which also handles inputs not divisible by the total downsampling
            size = tuple(skips[-1].shape[-2:]) if block.upsamplers is not None else None
            last = block is self.up_blocks[-1]
            keep = deepcache_layer(block) if last and keep_features else None
            x, features = block(x, mine, temb, context, frames, size, keep=keep)
        return self._out(x, frames), features  # the last block's: the only one asked to keep any

    def shallow(self, sample: torch.Tensor, timestep, context: torch.Tensor | None, features: torch.Tensor):
        """DeepCache's reuse step: conv_in, the first down layer, the last up block's last layers, conv_out."""
        x, temb, frames = self._in(sample, timestep)
        last = self.up_blocks[-1]
        first = self.down_blocks[0].layer(0, x, temb, context, frames)
        x, _ = last(features, [x, first], temb, context, frames, first=deepcache_layer(last))
        return self._out(x, frames)

    def _in(self, sample: torch.Tensor, timestep) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (conv_in's frame batch, the timestep embedding per frame, frames per clip)."""
        return self.conv_in(to_frame_batch(sample)), self._embed_time(timestep, sample), sample.shape[2]

    def _out(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return from_frame_batch(self.conv_out(group_norm(self.conv_norm_out, x, frames, silu=True)), frames)

"""LatentSync's audio-conditioned 3D U-Net, loadable from the published checkpoints unchanged.

`UNet3DConditionModel.from_config(cfg)` takes the `model:` section of upstream `configs/unet/stage2*.yaml`.
The state-dict keys, shapes and the forward numerics match upstream LatentSync (the facts recorded in tests/data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

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


@dataclass
class DeepCache:
    """DeepCache (Ma et al., CVPR 2024) at branch 0, as upstream's `DeepCacheSDHelper(cache_interval=3,
    cache_branch_id=0)`: every `interval`-th U-Net call runs in full and keeps the features entering the last up
    block's layer that takes the first down layer's skip; the calls in between reuse them and run only conv_in,
    that first down layer, the last up block's last two layers and conv_out. One instance per denoising loop."""

    interval: int = 3
    calls: int = 0
    features: torch.Tensor | None = None

    @staticmethod
    def layer(block: "UpBlock") -> int:
        return len(block.resnets) - 2

    def reuse(self) -> bool:
        reuse = self.features is not None and self.calls % self.interval != 0
        self.calls += 1
        return reuse


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
        cache: DeepCache | None = None,
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

    # `deep` and `shallow` hold all the tensor work and no Python state, so torch.compile can take each whole
    # (`compile_steps`); DeepCache's bookkeeping stays in `forward`.
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
            keep = DeepCache.layer(block) if last and keep_features else None
            x, features = block(x, mine, temb, context, frames, size, keep=keep)
        return self._out(x, frames), features  # the last block's: the only one asked to keep any

    def shallow(self, sample: torch.Tensor, timestep, context: torch.Tensor | None, features: torch.Tensor):
        """DeepCache's reuse step: conv_in, the first down layer, the last up block's last layers, conv_out."""
        x, temb, frames = self._in(sample, timestep)
        last = self.up_blocks[-1]
        first = self.down_blocks[0].layer(0, x, temb, context, frames)
        x, _ = last(features, [x, first], temb, context, frames, first=DeepCache.layer(last))
        return self._out(x, frames)

    def _in(self, sample: torch.Tensor, timestep) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (conv_in's frame batch, the timestep embedding per frame, frames per clip)."""
        return self.conv_in(to_frame_batch(sample)), self._embed_time(timestep, sample), sample.shape[2]

    def _out(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return from_frame_batch(self.conv_out(group_norm(self.conv_norm_out, x, frames, silu=True)), frames)

    def compile_steps(self, **options) -> None:
        """torch.compile `deep` and `shallow` (options as torch.compile's); `forward` then runs the compiled ones."""
        self.deep = torch.compile(self.deep, **options)  # type: ignore[method-assign]
        self.shallow = torch.compile(self.shallow, **options)  # type: ignore[method-assign]

    def graph_steps(self) -> None:
        """Replay `deep` and `shallow` (compiled or not) as CUDA graphs, one per input shape (see `CUDAGraphed`),
        one replay of either in flight at a time and one memory pool for all their graphs."""
        done, pool = torch.cuda.Event(), torch.cuda.graph_pool_handle()
        self.deep = CUDAGraphed(self.deep, done, pool)  # type: ignore[method-assign]
        self.shallow = CUDAGraphed(self.shallow, done, pool)  # type: ignore[method-assign]


class CUDAGraphed:
    """`fn` captured as a CUDA graph on its first call with each input signature (shapes, dtypes, other arguments)
    and replayed after: a step's ~2,000 kernels then cost one launch, so the GPU no longer waits on the Python
    thread that launches them, which shares the GIL with the pipeline's other stages.

    The outputs are the graph's own buffers, overwritten by later replays (see the pool below). The denoising loop
    uses each step's output before the next step; DeepCache's features (the full step's) are reused by the
    shallow steps that follow, which replay another graph.

    A replay is launched only once the one before it (recorded in `done`, which graphs may share) has finished.
    Graph launches cost the host almost nothing, so the launching thread would otherwise queue a whole denoising
    loop, and queued graphs delay every other stream's work in the process: on an H200 a paste-sized job on its
    own high-priority stream took 700 ms instead of 1 ms behind unbounded replays of a 140 ms graph, and the
    pipeline's Compose (`end_to_end.py`'s compose fps) fell from 66 to 24 frames/s. While the thread waits, the GPU
    runs the step's eager kernels (guidance, scheduler) that it queued after the replay.

    Graphs sharing `pool` reuse each other's activation memory, as they never run at once. A capture never takes
    memory that an earlier graph's output holds (the outputs stay referenced here), so the full step's features
    survive the shallow replays; a replay may overwrite outputs of graphs captured after it, which the loop has
    used by then. The warm-up's cached blocks belong to its side stream, so they are released after capture."""

    def __init__(self, fn, done: torch.cuda.Event, pool: tuple):
        self.fn, self.done, self.pool = fn, done, pool
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, Any]] = {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype, a.stride(), a.device) if torch.is_tensor(a) else a for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, inputs, output = self.graphs[key]
        self.done.synchronize()
        for buffer, a in zip(inputs, args):
            if torch.is_tensor(a):
                buffer.copy_(a)
        graph.replay()
        self.done.record()
        return output

    def _capture(self, args: tuple) -> tuple[torch.cuda.CUDAGraph, list, Any]:
        inputs = [a.clone() if torch.is_tensor(a) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy init, kernel plans, Triton / Inductor compiles
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*inputs)
        torch.cuda.empty_cache()
        return graph, inputs, output

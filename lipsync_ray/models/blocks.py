"""Building blocks of the LatentSync 3D U-Net.

Module and parameter names follow the published checkpoints exactly; numerics follow upstream LatentSync
(an AnimateDiff-style U-Net): ResNet GroupNorms normalise over all frames of a clip, spatial transformers and
motion modules act per frame / per pixel, every convolution is 2-D applied frame by frame.
Attention, feed-forward and timestep layers are diffusers' own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b*f, c, h, w)."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b*f, c, h, w) -> (b, c, f, h, w)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


class FrameConv2d(nn.Conv2d):
    """A 2-D convolution applied to every frame of a (b, c, f, h, w) clip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        frames = x.shape[2]
        return batch_to_frames(super().forward(frames_to_batch(x)), frames)


class ResnetBlock3D(nn.Module):
    """Pre-activation ResNet block with timestep conditioning; GroupNorm statistics span all frames."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = FrameConv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = FrameConv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = FrameConv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample3D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        frames = x.shape[2]
        if size is None:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        else:
            x = F.interpolate(x, size=(frames, *size), mode="nearest")
        return self.conv(x)


class AudioTransformerBlock(nn.Module):
    """Per-frame spatial self-attention, then cross-attention to that frame's audio tokens, then GEGLU."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int | None):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=False)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(
                query_dim=dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=head_dim, bias=False
            )
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), encoder_hidden_states=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    """Per-frame spatial transformer. `context` is (b*f, tokens, dim): each frame attends to its own audio."""

    def __init__(self, channels: int, heads: int, groups: int, cross_attention_dim: int | None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([AudioTransformerBlock(channels, heads, cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        frames = x.shape[2]
        x = frames_to_batch(x)
        bf, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        hidden = self.proj_out(hidden.reshape(bf, h, w, c).permute(0, 3, 1, 2))
        return batch_to_frames(hidden + x, frames)


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sin/cos table over frame positions, added to the temporal attention's input."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)  # persistent: it is part of the published state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"{x.shape[1]} frames exceed the temporal position table ({self.pe.shape[1]})")
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalSelfAttention(Attention):
    """Self-attention across the frames of each pixel, with positional encoding added to its input."""

    def __init__(self, dim: int, heads: int, max_len: int | None):
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)
        self.pos_encoder = SinusoidalPositionalEncoding(dim, max_len) if max_len else None

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        bf, pixels, c = x.shape
        x = x.reshape(bf // frames, frames, pixels, c).transpose(1, 2).reshape(-1, frames, c)
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        x = super().forward(x)
        return x.reshape(bf // frames, pixels, frames, c).transpose(1, 2).reshape(bf, pixels, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, num_attentions: int, max_len: int | None):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalSelfAttention(dim, heads, max_len) for _ in range(num_attentions)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attentions)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = attention(norm(x), frames) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    # AnimateDiff motion modules normalise with 32 groups whatever the U-Net's norm_num_groups.
    GROUPS = 32

    def __init__(self, channels: int, heads: int, num_blocks: int, num_attentions: int, max_len: int | None):
        super().__init__()
        if channels % self.GROUPS:
            raise ValueError(f"motion modules need channels divisible by {self.GROUPS}, got {channels}")
        self.norm = nn.GroupNorm(self.GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, heads, num_attentions, max_len) for _ in range(num_blocks)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        x = frames_to_batch(x)
        bf, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c))
        for block in self.transformer_blocks:
            hidden = block(hidden, frames)
        hidden = self.proj_out(hidden).reshape(bf, h, w, c).permute(0, 3, 1, 2)
        return batch_to_frames(hidden + x, frames)


class MotionModule(nn.Module):
    """AnimateDiff 'Vanilla' motion module: a temporal transformer with a residual connection."""

    def __init__(self, channels: int, kwargs: dict):
        super().__init__()
        block_types = list(kwargs.get("attention_block_types", ["Temporal_Self", "Temporal_Self"]))
        if any(t != "Temporal_Self" for t in block_types):
            raise ValueError(f"unsupported motion-module attention types {block_types}: only Temporal_Self")
        heads = kwargs.get("num_attention_heads", 8)
        div = kwargs.get("temporal_attention_dim_div", 1)
        if div != 1:
            raise ValueError(f"temporal_attention_dim_div={div} is not supported (published checkpoints use 1)")
        max_len = kwargs.get("temporal_position_encoding_max_len", 24)
        self.temporal_transformer = TemporalTransformer(
            channels,
            heads,
            kwargs.get("num_transformer_block", 1),
            len(block_types),
            max_len if kwargs.get("temporal_position_encoding", True) else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_transformer(x)

"""Building blocks of the LatentSync 3D U-Net.

Module and parameter names follow the published checkpoints exactly; numerics follow upstream LatentSync
(an AnimateDiff-style U-Net): ResNet GroupNorms normalise over all frames of a clip, spatial transformers and
motion modules act per frame / per pixel, every convolution is 2-D applied frame by frame.
Attention and timestep layers are diffusers' own (temporal attention with its own forward, below); the feed-forward
is diffusers' with contiguous GEGLU halves.

Layout: upstream rearranges (b, c, f, h, w) <-> ((b f), c, h, w) around every convolution and transformer; the
copies and strided kernels that follow took an eager forward from 141 to 169 ms (H100, 256 px). Here every block
takes and returns the frame batch ((b f), c, h, w) in channels-last memory, i.e. ((b f), h, w, c): convolutions
run in the layout tensor cores prefer, the spatial transformer's tokens are a view of it, and clip-wide GroupNorm
is a reduction over a view. The motion modules attend across frames in that layout too (a strided view).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import frame_attention as frame_kernel
from . import fused


def to_frame_batch(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> ((b f), c, h, w) in channels-last memory."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).reshape(b * f, h, w, c).contiguous().permute(0, 3, 1, 2)


def from_frame_batch(x: torch.Tensor, frames: int) -> torch.Tensor:
    """((b f), c, h, w) -> (b, c, f, h, w) (a view)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """((b f), c, h, w) channels-last -> ((b f), h*w, c), a view."""
    bf, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(bf, h * w, c)


def untokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """((b f), h*w, c) -> ((b f), c, h, w) channels-last, a view."""
    return x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def group_norm(
    norm: nn.GroupNorm, x: torch.Tensor, frames: int, silu: bool = False, frame_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`norm` of `x + frame_bias` (one row per frame) with statistics over each run of `frames` consecutive frames
    of the frame batch (1: per frame), i.e. upstream's GroupNorm on (b, c, f, h, w), then SiLU if asked, without
    leaving channels-last. Eager on a GPU this is `fused`'s Triton kernels. Otherwise, as in native
    GroupNorm, the mean and the affine map are float32 and the result is rounded once (torch.compile fuses the
    passes); the spread comes from a Welford pass in x's dtype: relative precision suffices, and a standard
    deviation, unlike a variance, cannot overflow fp16."""
    if fused.supported(x):
        return fused.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, frames, silu, frame_bias)
    if frame_bias is not None:
        x = x + frame_bias[:, :, None, None]
    bf, c, h, w = x.shape
    g = norm.num_groups
    grouped = tokens(x).reshape(bf // frames, frames * h * w, g, c // g)
    mean = grouped.mean((1, 3), keepdim=True, dtype=torch.float32)
    std = torch.std(grouped, (1, 3), correction=0, keepdim=True).float()
    scale = norm.weight.float().reshape(g, c // g) * torch.rsqrt(std.square() + norm.eps)
    shift = norm.bias.float().reshape(g, c // g) - mean * scale
    out = untokens(torch.addcmul(shift, grouped, scale).to(x.dtype).reshape(bf, h * w, c), h, w)
    return F.silu(out) if silu else out


def add_norm(
    norm: nn.LayerNorm, x: torch.Tensor, delta: torch.Tensor | None = None, frame_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream `x + delta` and its LayerNorm, plus `frame_bias` (frames, c) by frame for tokens x
    ((b frames), pixels, c): one pass on a GPU (`fused`)."""
    if fused.supported(x):
        return fused.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps, frame_bias)
    if delta is not None:
        x = delta + x
    h = norm(x)
    if frame_bias is not None:
        h = (h.reshape(-1, frame_bias.shape[0], *h.shape[1:]) + frame_bias[:, None]).reshape(h.shape)
    return x, h


def add_bias(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Residual add of two frame batches plus a bias per channel: one pass on a GPU (`fused`)."""
    if fused.supported(x) and fused.supported(h) and x.stride() == h.stride():
        return fused.add_bias(x, h, bias)
    return x + h + bias[:, None, None]


def conv_residual(x: torch.Tensor, h: torch.Tensor, conv: nn.Conv2d, shortcut: nn.Conv2d | None) -> torch.Tensor:
    """A ResNet block's output `shortcut(x) + conv(h)`, both convolutions without their biases, which the residual
    add takes instead (cuDNN adds a convolution's bias in a pass of its own)."""
    h = F.conv2d(h, conv.weight, padding=conv.padding)
    bias = conv.bias
    if shortcut is not None:
        x = F.conv2d(x, shortcut.weight)
        bias = bias + shortcut.bias
    return add_bias(x, h, bias)


class ResnetBlock3D(nn.Module):
    """Pre-activation ResNet block with timestep conditioning; GroupNorm statistics span all frames. conv1's bias
    joins the timestep's: both are per-frame rows that norm2 adds as it reads conv1's output. conv2's and the
    shortcut's biases join the residual add (cuDNN adds a convolution's bias in a pass of its own)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        """x: the frame batch; temb: one row per frame."""
        h = F.conv2d(group_norm(self.norm1, x, frames, silu=True), self.conv1.weight, padding=self.conv1.padding)
        bias = self.time_emb_proj(F.silu(temb)) + self.conv1.bias
        return conv_residual(x, group_norm(self.norm2, h, frames, silu=True, frame_bias=bias), self.conv2, self.conv_shortcut)


class Downsample3D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class FeedForward(nn.Module):
    """diffusers' `FeedForward(dim, activation_fn="geglu")`, same parameters (`net.0.proj`, `net.2`), with the
    GEGLU's value and gate computed by two GEMMs over the halves of `proj`. Both then come out contiguous; chunking
    the one output made the GELU and the product strided kernels (18 of 141 ms of an eager forward, H100, 256 px)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.net[0].proj
        value_w, gate_w = proj.weight.chunk(2)
        value_b, gate_b = proj.bias.chunk(2)
        value, gate = F.linear(x, value_w, value_b), F.linear(x, gate_w, gate_b)
        return self.net[2](fused.geglu(value, gate) if fused.supported(value) else value * F.gelu(gate))


class TokenAttention(Attention):
    """diffusers' Attention (same parameters) on tokens (batch, n, dim), with a forward of its own: the default
    processor's division by `rescale_output_factor` (1 here) is a pass over the output for nothing."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            proj(t).view(b, t.shape[1], self.heads, -1).transpose(1, 2)
            for proj, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out[1](self.to_out[0](out))


class AudioTransformerBlock(nn.Module):
    """Per-frame spatial self-attention, then cross-attention to that frame's audio tokens, then GEGLU."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int | None):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = TokenAttention(query_dim=dim, heads=heads, dim_head=head_dim, bias=False)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = TokenAttention(
                query_dim=dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=head_dim, bias=False
            )
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x, h = add_norm(self.norm1, x)
        delta = self.attn1(h)
        if self.attn2 is not None:
            x, h = add_norm(self.norm2, x, delta)
            delta = self.attn2(h, context)
        x, h = add_norm(self.norm3, x, delta)
        return self.ff(h) + x


class SpatialTransformer3D(nn.Module):
    """Per-frame spatial transformer. `context` is (b*f, tokens, dim): each frame attends to its own audio. The
    1x1 convolutions `proj_in` / `proj_out` run as GEMMs on the tokens (a view of the frame batch), their bias
    added in the GEMM's epilogue, where a convolution adds it in a pass of its own."""

    def __init__(self, channels: int, heads: int, groups: int, cross_attention_dim: int | None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([AudioTransformerBlock(channels, heads, cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        hidden = F.linear(tokens(group_norm(self.norm, x, 1)), self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        return untokens(F.linear(hidden, self.proj_out.weight.flatten(1), self.proj_out.bias), h, w) + x


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

    def table(self, frames: int, dtype: torch.dtype) -> torch.Tensor:
        """The encodings of positions 0 .. frames - 1: (frames, dim)."""
        if frames > self.pe.shape[1]:
            raise ValueError(f"{frames} frames exceed the temporal position table ({self.pe.shape[1]})")
        return self.pe[0, :frames].to(dtype)


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over the few frames of each (clip, pixel, head): on a GPU in fp16 / bf16 the Triton kernel of
    `frame_kernel`; otherwise SDPA, on a GPU its memory-efficient kernel, which beats cuDNN's and flash attention
    on 16-token sequences (H100, level 0 at 256 px, in upstream's transposed layout: 7.5 against 10.9 and 15.4 ms
    per forward; H200, whole U-Net at 256 px: 129.6 against 133.7 ms eager, 102.8 against 107.0 compiled)."""
    if frame_kernel.supported(q):
        return frame_kernel.attention(q, k, v)
    if q.is_cuda:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class TemporalSelfAttention(Attention):
    """Self-attention across the frames of each pixel. Its input carries the positional encoding (`positions`):
    the block's LayerNorm adds it as it writes that input.

    The frame batch ((b f), pixels, c) is attended to in place: (pixel, head) pairs are one strided dimension of
    a (b, pixels*heads, f, head_dim) view, so neither the input nor the output is transposed to per-pixel
    sequences, as upstream does ("(b f) d c -> (b d) f c")."""

    def __init__(self, dim: int, heads: int, max_len: int | None):
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)
        self.pos_encoder = SinusoidalPositionalEncoding(dim, max_len) if max_len else None

    def positions(self, frames: int, dtype: torch.dtype) -> torch.Tensor | None:
        """(frames, dim) to add to the input of each frame, or None without positional encoding."""
        return self.pos_encoder.table(frames, dtype) if self.pos_encoder is not None else None

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        bf, pixels, c = x.shape
        b = bf // frames
        x = x.reshape(b, frames, pixels, c)
        q, k, v = (
            proj(x).reshape(b, frames, pixels * self.heads, c // self.heads).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = frame_attention(q, k, v).transpose(1, 2).reshape(bf, pixels, c)
        return self.to_out[1](self.to_out[0](out))


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, num_attentions: int, max_len: int | None):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalSelfAttention(dim, heads, max_len) for _ in range(num_attentions)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attentions)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        delta = None
        for attention, norm in zip(self.attention_blocks, self.norms):
            x, h = add_norm(norm, x, delta, attention.positions(frames, x.dtype))
            delta = attention(h, frames)
        x, h = add_norm(self.ff_norm, x, delta)
        return self.ff(h) + x


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

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        hidden = self.proj_in(tokens(group_norm(self.norm, x, 1)))  # per frame, as upstream
        for block in self.transformer_blocks:
            hidden = block(hidden, frames)
        return untokens(self.proj_out(hidden), h, w) + x


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

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, frames)

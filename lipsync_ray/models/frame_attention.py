"""Attention across the 16 frames of every (clip, pixel, head): a Triton kernel for the motion modules.

The motion modules attend over sequences of 16 tokens, 65,536 of them per U-Net call at level 0 (256 px, 4
windows). SDPA's kernels tile 64-128 query rows per sequence and leave most of each tile idle, spending far longer
per call than reading q, k, v and writing the output takes. Here one program takes a block of consecutive (pixel,
head) pairs of one clip, whose frames are contiguous runs of memory in the U-Net's frame batch, and does their whole
attention in registers: scores, float32 softmax, weighted sum (timings: docs/performance.md).

Only on CUDA GPUs from Ampere on and in fp16 / bf16; otherwise, or without Triton, `frame_attention` in `blocks`
uses SDPA.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: SDPA is used instead
    triton = None


def supported(q: torch.Tensor) -> bool:
    """Whether `attention` can take these inputs (same shape and dtype for q, k, v is the caller's)."""
    return (
        triton is not None and q.dtype in (torch.float16, torch.bfloat16) and q.dim() == 4
        and q.shape[-2] <= 32 and q.shape[-1] <= 256 and q.stride(-1) == 1
        and ((q.is_cuda and _tensor_cores(q.device)) or interpreted())
    )


@functools.cache
def _tensor_cores(device: torch.device) -> bool:
    """Ampere or newer. The kernel was only run on Hopper; older GPUs keep SDPA."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def interpreted() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): how tests without a GPU run the kernel."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Per q / k / v tile (16 frames x padded head dim x pairs) and per program: the best of a sweep on an H100 at every
# head dim of the U-Net (40, 80, 160), 256 and 512 px (`benchmarks/unet_forward.py --windows 4
# --frame-kernel-sweep`); larger tiles spill registers.
TILE_ELEMENTS = 4096
WARPS = 2


def pairs_per_program(head_dim: int, frames: int) -> int:
    return max(1, TILE_ELEMENTS // (_padded(frames) * _padded(head_dim)))


def _padded(n: int) -> int:
    """tl.dot's operands need power-of-two sides of at least 16."""
    return max(16, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _frame_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, n_pairs, scale,
        q_sb, q_sj, q_sf, k_sb, k_sj, k_sf, v_sb, v_sj, v_sf, o_sb, o_sj, o_sf,
        FRAMES: tl.constexpr, DIM: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr, BJ: tl.constexpr,
    ):
        b = tl.program_id(1)
        j = (tl.program_id(0) * BJ + tl.arange(0, BJ))[:, None, None]
        f = tl.arange(0, FP)[None, :, None]
        d = tl.arange(0, DP)[None, None, :]
        inside = (j < n_pairs) & (f < FRAMES) & (d < DIM)
        q = tl.load(q_ptr + b * q_sb + j * q_sj + f * q_sf + d, mask=inside, other=0.0)
        k = tl.load(k_ptr + b * k_sb + j * k_sj + f * k_sf + d, mask=inside, other=0.0)
        v = tl.load(v_ptr + b * v_sb + j * v_sj + f * v_sf + d, mask=inside, other=0.0)
        scores = tl.dot(q, tl.permute(k, (0, 2, 1))) * scale  # (BJ, FP, FP), float32
        key = tl.arange(0, FP)[None, None, :]
        scores = tl.where(key < FRAMES, scores, float("-inf"))
        weights = tl.exp(scores - tl.max(scores, 2)[:, :, None])
        weights = weights / tl.sum(weights, 2)[:, :, None]
        out = tl.dot(weights.to(v.dtype), v)
        tl.store(o_ptr + b * o_sb + j * o_sj + f * o_sf + d, out.to(o_ptr.dtype.element_ty), mask=inside)

    @triton_op("lipsync_ray::frame_attention", mutates_args=())
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v for q, k, v of shape (batch, pairs, frames, head_dim), any strides with
        the head dim contiguous; the output is laid out as q (when q is dense)."""
        return launch(q, k, v, pairs_per_program(q.shape[-1], q.shape[-2]), WARPS)

    def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, warps: int) -> torch.Tensor:
        """The kernel on blocks of `block` (pixel, head) pairs, `warps` warps per program."""
        batch, n_pairs, frames, dim = q.shape
        out = torch.empty_like(q)  # q's strides: the U-Net's frame batch reads it back as a view
        grid = (triton.cdiv(n_pairs, block), batch)
        wrap_triton(_frame_attention_kernel)[grid](
            q, k, v, out, n_pairs, 1 / math.sqrt(dim),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            FRAMES=frames, DIM=dim, FP=_padded(frames), DP=_padded(dim), BJ=block, num_warps=warps,
        )
        return out

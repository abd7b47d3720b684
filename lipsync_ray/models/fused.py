"""Triton kernels for the U-Net's memory-bound steps in eager mode: GroupNorm (+ frame bias, + SiLU), residual add
+ LayerNorm (+ the motion modules' positional encoding), GEGLU's product, and residual add + convolution bias.
Eager PyTorch spends several passes over the activations on each of these. With these kernels the eager U-Net is
as fast as the compiled one, without compiling (docs/performance.md). Under torch.compile Inductor fuses the PyTorch forms with their neighbours
instead, so these run in eager only (`supported`).

GroupNorm, written out in PyTorch (`blocks.group_norm`), is a mean pass, a Welford pass, a float32 `addcmul`, a
copy back to fp16 and a SiLU, and the ResNets' timestep bias one more broadcast pass. Here:
1. `_stats_kernel`: each program reads full channel rows of one clip (contiguous memory) and keeps a running mean
   and sum of squared deviations per element of its tile (Welford), combined across the tile's rows at the end
   (Chan): no cancellation when a channel's mean dwarfs its spread, and no reduction inside the loop;
2. `_finalize_kernel`: per (clip, group), combines those partials into the group's statistics and folds them with
   the affine weights into one float32 scale and shift per (clip, channel);
3. `_apply_kernel`: bias, `x * scale + shift`, SiLU, rounded once to the input's dtype.

PyTorch's LayerNorm kernel gives each 320-channel row a thread block and reaches a fraction of the memory
bandwidth; `_add_layer_norm_kernel` normalises a tile of rows per program and adds the residual branch in
the same pass.
"""

from __future__ import annotations

import torch

from .frame_attention import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch form is used
    triton = None

# Elements per tile of rows in registers, and warps per program: the best of a sweep on an H100 over the U-Net's
# shapes at 256 px (GroupNorm: 320 to 1280 channels; LayerNorm: 320 channels x 131,072 rows to 1280 x 8,192).
GROUP_NORM_TILE, STATS_WARPS, APPLY_WARPS = 8192, 4, 8
# Statistics kernel: elements per tile, each with a running mean and M2 in registers; the best of a sweep on an
# H200 (1024 to 8192 elements, 2 to 8 warps).
STATS_TILE = 4096
PROGRAM_ELEMENTS = 65536  # per GroupNorm statistics program: few partials to combine, enough programs to fill the GPU
LAYER_NORM_TILE, LAYER_NORM_WARPS = 2048, 4
GEGLU_BLOCK = ADD_BLOCK = 2048


def supported(x: torch.Tensor) -> bool:
    """Whether the kernels can take x: fp16 / bf16 on a GPU (or in Triton's interpreter), outside torch.compile,
    channels-last if it is a frame batch ((frames, channels, h, w)), else contiguous rows of channels."""
    dense = x.permute(0, 2, 3, 1).is_contiguous() if x.dim() == 4 else x.is_contiguous()
    return (
        triton is not None and x.dtype in (torch.float16, torch.bfloat16) and dense
        and (x.is_cuda or interpreted()) and not torch.compiler.is_compiling()
    )


def group_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, frames: int,
    silu: bool = False, frame_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm of `x + frame_bias` (one row of channels per frame, broadcast over pixels) with statistics over
    each run of `frames` consecutive frames, then SiLU if asked; channels-last in and out."""
    bf, c, h, w = x.shape
    if bf % frames or c % groups:
        raise ValueError(f"{bf} frames in runs of {frames}, {c} channels in {groups} groups")
    if frame_bias is not None and frame_bias.shape != (bf, c):
        raise ValueError(f"frame_bias must be (frames, channels) = {(bf, c)}, got {tuple(frame_bias.shape)}")
    clips, rows_per_frame = bf // frames, h * w
    rows_per_clip = frames * rows_per_frame
    padded_c = triton.next_power_of_2(c)
    tile_rows, stats_rows = max(1, GROUP_NORM_TILE // padded_c), max(1, STATS_TILE // padded_c)
    program_rows = max(stats_rows, PROGRAM_ELEMENTS // padded_c)
    programs = triton.cdiv(rows_per_clip, program_rows)
    has_bias = frame_bias is not None
    frame_bias = frame_bias.contiguous() if has_bias else x  # an unread placeholder without bias
    means = torch.empty(clips, programs, c, device=x.device, dtype=torch.float32)
    spreads = torch.empty_like(means)
    _stats_kernel[(programs, clips)](
        x, frame_bias, means, spreads, rows_per_clip, rows_per_frame, c,
        HAS_BIAS=has_bias, PROGRAM_ROWS=program_rows, TILE_ROWS=stats_rows, CP=padded_c, num_warps=STATS_WARPS,
    )
    scale = torch.empty(clips, c, device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    _finalize_kernel[(clips, groups)](
        means, spreads, weight, bias, scale, shift, programs, rows_per_clip, c, c // groups, eps,
        PROGRAM_ROWS=program_rows, PB=min(64, triton.next_power_of_2(programs)),
        GP=triton.next_power_of_2(c // groups),
    )
    out = torch.empty_like(x)  # channels-last, as x
    _apply_kernel[(triton.cdiv(bf * rows_per_frame, tile_rows),)](
        x, frame_bias, scale, shift, out, bf * rows_per_frame, rows_per_clip, rows_per_frame, c,
        HAS_BIAS=has_bias, SILU=silu, TILE_ROWS=tile_rows, CP=padded_c, num_warps=APPLY_WARPS,
    )
    return out


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    frame_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, LayerNorm(x + delta) [+ frame_bias]) over the last dim; the sum is rounded to x's dtype first, as
    in eager. `frame_bias` (frames, C) is added to the norm of each row of x ((b frames), pixels, C) by its frame."""
    c = x.shape[-1]
    rows = x.numel() // c
    padded_c = triton.next_power_of_2(c)
    tile_rows = max(1, LAYER_NORM_TILE // padded_c)
    total = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    has_frame_bias = frame_bias is not None
    _add_layer_norm_kernel[(triton.cdiv(rows, tile_rows),)](
        x, x if delta is None else delta.contiguous(), weight, bias, frame_bias.contiguous() if has_frame_bias else x,
        total, out, rows, c, eps, x.shape[1] if has_frame_bias else 1, frame_bias.shape[0] if has_frame_bias else 1,
        HAS_DELTA=delta is not None, HAS_FRAME_BIAS=has_frame_bias, TILE_ROWS=tile_rows, CP=padded_c,
        num_warps=LAYER_NORM_WARPS,
    )
    return total, out


def add_bias(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + h + bias (one value per channel) for frame batches of one layout (channels-last), one pass: a residual
    add that also takes the bias of the convolutions that made h (and x)."""
    out = torch.empty_like(h)
    n = h.numel()
    _add_bias_kernel[(triton.cdiv(n, ADD_BLOCK),)](x, h, bias, out, n, h.shape[1], BLOCK=ADD_BLOCK, num_warps=4)
    return out


def geglu(value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """value * GELU(gate) (exact, erf), one pass."""
    out = torch.empty_like(value)
    n = value.numel()
    _geglu_kernel[(triton.cdiv(n, GEGLU_BLOCK),)](value, gate.contiguous(), out, n, BLOCK=GEGLU_BLOCK, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _load_rows(x_ptr, bias_ptr, rows, row_mask, c, c_mask, rows_per_frame, C, HAS_BIAS: tl.constexpr):
        """A tile of channel rows (frame-batch rows, i.e. pixels) in float32, plus each row's frame bias."""
        mask = row_mask[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            frame = rows // rows_per_frame
            x += tl.load(bias_ptr + frame[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        return x, mask

    @triton.jit
    def _stats_kernel(
        x_ptr, bias_ptr, mean_ptr, m2_ptr, rows_per_clip, rows_per_frame, C,
        HAS_BIAS: tl.constexpr, PROGRAM_ROWS: tl.constexpr, TILE_ROWS: tl.constexpr, CP: tl.constexpr,
    ):
        # Welford per element of the tile over the program's tiles (no reduction inside the loop), then the tile's
        # rows are combined once by Chan's method
        program, clip = tl.program_id(0), tl.program_id(1)
        c = tl.arange(0, CP)
        c_mask = c < C
        count = tl.zeros([TILE_ROWS], tl.float32)
        mean = tl.zeros([TILE_ROWS, CP], tl.float32)
        m2 = tl.zeros([TILE_ROWS, CP], tl.float32)
        first = program * PROGRAM_ROWS
        for start in range(0, PROGRAM_ROWS, TILE_ROWS):
            rows = first + start + tl.arange(0, TILE_ROWS)
            row_mask = rows < rows_per_clip
            x, mask = _load_rows(x_ptr, bias_ptr, clip * rows_per_clip + rows, row_mask, c, c_mask, rows_per_frame, C, HAS_BIAS)
            count += row_mask.to(tl.float32)
            delta = tl.where(mask, x - mean, 0.0)
            mean += delta / tl.maximum(count, 1.0)[:, None]
            m2 += delta * tl.where(mask, x - mean, 0.0)
        n = tl.maximum(tl.sum(count, 0), 1.0)
        program_mean = tl.sum(mean * count[:, None], 0) / n
        spread = mean - program_mean[None, :]
        program_m2 = tl.sum(m2 + spread * spread * count[:, None], 0)
        out = (clip * tl.num_programs(0) + program) * C + c
        tl.store(mean_ptr + out, program_mean, mask=c_mask)
        tl.store(m2_ptr + out, program_m2, mask=c_mask)

    @triton.jit
    def _partials(clip, p0, programs, rows_per_clip, C, c, c_mask, PROGRAM_ROWS: tl.constexpr, PB: tl.constexpr):
        """Offsets and mask of PB statistics programs' partials from p0 on, and each program's row count."""
        p = p0 + tl.arange(0, PB)
        n = tl.minimum(tl.maximum(rows_per_clip - p * PROGRAM_ROWS, 0), PROGRAM_ROWS).to(tl.float32)
        at = (clip * programs + p)[:, None] * C + c[None, :]
        return at, (p < programs)[:, None] & c_mask[None, :], n[:, None]

    @triton.jit
    def _finalize_kernel(
        mean_ptr, m2_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, programs, rows_per_clip, C, CG, eps,
        PROGRAM_ROWS: tl.constexpr, PB: tl.constexpr, GP: tl.constexpr,
    ):
        clip, group = tl.program_id(0), tl.program_id(1)
        g = tl.arange(0, GP)
        c = group * CG + g
        c_mask = g < CG
        count = tl.zeros([], tl.float32) + rows_per_clip * CG
        total = tl.zeros([PB, GP], tl.float32)
        for p0 in range(0, programs, PB):
            at, mask, n = _partials(clip, p0, programs, rows_per_clip, C, c, c_mask, PROGRAM_ROWS, PB)
            total += tl.load(mean_ptr + at, mask=mask, other=0.0) * n
        mean = tl.sum(tl.sum(total, 1), 0) / count
        total = tl.zeros([PB, GP], tl.float32)
        for p0 in range(0, programs, PB):
            at, mask, n = _partials(clip, p0, programs, rows_per_clip, C, c, c_mask, PROGRAM_ROWS, PB)
            delta = tl.load(mean_ptr + at, mask=mask, other=0.0) - mean
            total += tl.load(m2_ptr + at, mask=mask, other=0.0) + tl.where(mask, delta * delta * n, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(total, 1), 0) / count + eps)
        scale = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32) * rstd
        shift = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32) - mean * scale
        tl.store(scale_ptr + clip * C + c, scale, mask=c_mask)
        tl.store(shift_ptr + clip * C + c, shift, mask=c_mask)

    @triton.jit
    def _apply_kernel(
        x_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr, total_rows, rows_per_clip, rows_per_frame, C,
        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, TILE_ROWS: tl.constexpr, CP: tl.constexpr,
    ):
        rows = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)
        c = tl.arange(0, CP)
        c_mask = c < C
        x, mask = _load_rows(x_ptr, bias_ptr, rows, rows < total_rows, c, c_mask, rows_per_frame, C, HAS_BIAS)
        at = (rows // rows_per_clip)[:, None] * C + c[None, :]
        y = x * tl.load(scale_ptr + at, mask=mask, other=0.0) + tl.load(shift_ptr + at, mask=mask, other=0.0)
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_layer_norm_kernel(
        x_ptr, delta_ptr, w_ptr, b_ptr, frame_bias_ptr, total_ptr, y_ptr, rows, C, eps, rows_per_frame, frames,
        HAS_DELTA: tl.constexpr, HAS_FRAME_BIAS: tl.constexpr, TILE_ROWS: tl.constexpr, CP: tl.constexpr,
    ):
        r = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)
        c = tl.arange(0, CP)
        c_mask = c < C
        mask = (r < rows)[:, None] & c_mask[None, :]
        at = r.to(tl.int64)[:, None] * C + c[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0)
        if HAS_DELTA:
            x = (x + tl.load(delta_ptr + at, mask=mask, other=0.0)).to(total_ptr.dtype.element_ty)
            tl.store(total_ptr + at, x, mask=mask)
        x = x.to(tl.float32)
        mean = tl.sum(x, 1) / C
        deviation = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(deviation * deviation, 1) / C + eps)
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        y = deviation * rstd[:, None] * w[None, :] + b[None, :]
        if HAS_FRAME_BIAS:
            frame = (r // rows_per_frame) % frames
            y += tl.load(frame_bias_ptr + frame[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_bias_kernel(x_ptr, h_ptr, bias_ptr, out_ptr, n, C, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + i, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + i % C, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, (x + h + b).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_kernel(value_ptr, gate_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        gate = tl.load(gate_ptr + i, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(value_ptr + i, mask=mask, other=0.0).to(tl.float32)
        out = value * 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
        tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty), mask=mask)

"""U-Net forward on a GPU: latency, TFLOP/s, peak memory, and the fast path's precision against fp32.

Real-size LatentSync architecture (configs/unet/stage2.yaml) with random weights: the same FLOPs as the published
checkpoints. One forward = batch 2 (both guidance halves) x 16 frames, as upstream's denoising step.
Upstream on one H100 (docs/upstream_baseline.md): 57.0 ms at 256 px, 185.3 ms at 512 px (fp16).
`--windows N` times N windows per call (our pipeline's default is 4); `--profile` prints, per variant, where the
GPU's time goes by kernel kind (convolution, GEMM, attention, normalisation, fused, copies) and the top kernels;
`--attention` times each of the U-Net's attention shapes under every SDPA backend, with the head dim zero-padded
to a multiple of 64, as explicit matmuls and softmax compiled by Inductor, and (temporal shapes) our Triton kernel.
`--cudnn-benchmark` adds eager rows with cuDNN's convolution algorithms chosen by timing, not heuristics.
`--graphs` adds rows with the forward replayed as a CUDA graph, as the pipeline runs it (`lipsync_ray.diffusion.graph_steps`).
`--fp8-gemms` times every matrix product of one forward (the linear layers' GEMMs, not convolutions or attention)
in fp16 and as FP8 (e4m3, one scale per row of each operand, inputs quantized beforehand): what FP8 GEMMs could
save at most, with their error against fp32.

    python benchmarks/unet_forward.py [--compile] [--cudagraphs] [--windows 1 4] [--profile] [--attention]
        [--frame-kernel-sweep] [--cudnn-benchmark] [--graphs] [--fp8-gemms]
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion_stage import TFLOP_PER_FORWARD, median_ms  # this folder is on sys.path when run as a script
from lipsync_ray.models import UNet3DConditionModel
from lipsync_ray.diffusion import CUDAGraphed
from lipsync_ray.models import frame_attention as frame_kernel

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_MS = {256: 57.0, 512: 185.3}


def time_forward(model, sample, ehs, iters: int) -> float:
    t = torch.tensor(951, device=sample.device)
    return median_ms(lambda: model(sample, t, ehs), iters)


def precision_rows():
    fixture = torch.load(ROOT / "tests/data/unet_equivalence_A.pt", weights_only=True)
    model = UNet3DConditionModel.from_config(fixture["config"]).eval()
    model.load_state_dict(fixture["state_dict"])
    expected = fixture["expected"].double()
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m = model.to("cuda", dtype, memory_format=torch.channels_last)
        with torch.no_grad():
            out = m(fixture["sample"].to("cuda", dtype), fixture["timestep"].cuda(), fixture["encoder_hidden_states"].to("cuda", dtype)).sample
        d = (out.double().cpu() - expected).abs()
        rows.append((str(dtype).removeprefix("torch."), d.max().item(), d.mean().item(), (d.norm() / expected.norm()).item()))
    return rows


KINDS = [  # kernel-name patterns, first match wins
    ("fused (triton)", r"^triton_"),
    ("copy / layout", r"nhwc_?to_?nchw|nchw_?to_?nhwc|copy|transpose|permute|cat_|contiguous"),
    ("attention", r"flash|fmha|attention|softmax"),
    ("convolution", r"conv|fprop|dgrad|implicit|winograd|cudnn"),
    ("GEMM", r"gemm|cutlass|nvjet|xmma|matmul|sm\d+_"),
    ("normalisation", r"norm|welford|moments"),
]


def kind(kernel: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, kernel, re.I)), "other elementwise")


def profile(model, sample, ehs, top: int, forwards: int = 3) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """GPU milliseconds per forward by kernel kind, and the `top` costliest kernels (ms and calls per forward)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t = torch.tensor(951, device=sample.device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            model(sample, t, ehs)
        torch.cuda.synchronize()
    per_kernel: dict[str, tuple[float, float]] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms, calls = per_kernel.get(event.key, (0.0, 0.0))
            per_kernel[event.key] = (ms + event.self_device_time_total / 1000 / forwards, calls + event.count / forwards)
    if not per_kernel:
        raise RuntimeError("the profiler recorded no GPU kernels")
    kinds: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        kinds[kind(name)] = kinds.get(kind(name), 0.0) + ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return kinds, [(name, ms, calls) for name, (ms, calls) in ranked]


def attention_shapes(cfg: dict, res: int, windows: int) -> list[tuple[str, int, tuple, tuple]]:
    """(name, calls per forward, q shape, k/v shape) of every attention in one forward, as (batch, heads, len, dim)."""
    clips, frames, heads = 2 * windows, 16, cfg["attention_head_dim"]
    shapes = []
    levels = len(cfg["block_out_channels"])
    for level, channels in enumerate(cfg["block_out_channels"]):
        side = res // 8 // 2**level
        d = channels // heads
        # spatial and audio transformers: 2 down and 3 up at levels 0-2, one in the mid block at the last level
        calls = 5 if level < levels - 1 else 1
        shapes.append((f"spatial L{level}", calls, (clips * frames, heads, side * side, d), (clips * frames, heads, side * side, d)))
        shapes.append((f"audio L{level}", calls, (clips * frames, heads, side * side, d), (clips * frames, heads, 50, d)))
        # temporal, as the U-Net attends (models/blocks.py): (pixel, head) pairs are one dimension of the frame batch
        shapes.append((f"temporal L{level}", 10, (clips, side * side * heads, frames, d), (clips, side * side * heads, frames, d)))
    return shapes


def _sdpa(q, k, v, backend):
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v)


def _padded_sdpa(q, k, v):
    d = q.shape[-1]
    pad = -d % 64
    if not pad:
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)[..., :d]


def _explicit_attention(q, k, v):
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def _frame_kernel(q, k, v):
    if not frame_kernel.supported(q):
        raise RuntimeError("not a frame-attention shape")
    return frame_kernel.attention(q, k, v)


def _as_unet_passes(shape: tuple) -> torch.Tensor:
    """A random (batch, heads, len, dim) fp16 tensor laid out as the U-Net passes it: a (batch, len, heads*dim)
    tensor viewed per head."""
    b, h, n, d = shape
    return torch.randn(b, n, h * d, device="cuda", dtype=torch.float16).view(b, n, h, d).transpose(1, 2)


def gemm_shapes(model, sample, ehs) -> dict[tuple[int, int, int], int]:
    """(M, K, N) -> calls per forward of every matrix product the forward runs (the linear layers' GEMMs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: dict[tuple[int, int, int], int] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = args[-2], args[-1]
                key = (a.shape[0], a.shape[1], b.shape[1])
                shapes[key] = shapes.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    with Record():
        model(sample, torch.tensor(951, device=sample.device), ehs)
    return shapes


def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (rows, k) as e4m3 with one float32 scale per row."""
    scale = t.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_gemm_table(model, sample, ehs, title: str) -> None:
    """ms per forward of each GEMM shape in fp16 and as rowwise-scaled FP8 (accurate and fast accumulation),
    and the relative L2 error of each against fp32 on random operands."""
    print(f"\nGEMMs of one forward, {title}: ms per forward (calls x ms per call); error: relative L2 against fp32")
    print(f"{'M':>8} {'K':>5} {'N':>6} {'calls':>5} {'fp16':>8} {'fp8':>8} {'fp8 fast':>8} {'err fp16':>9} {'err fp8':>9}")
    totals = [0.0, 0.0, 0.0]
    for (m, k, n), calls in sorted(gemm_shapes(model, sample, ehs).items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1]):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        x8, xs = _rowwise_fp8(x)
        w8, ws = _rowwise_fp8(w)

        def fp8(fast: bool) -> torch.Tensor:
            return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.reshape(1, n), bias=b, out_dtype=torch.float16, use_fast_accum=fast)

        ref = F.linear(x.float(), w.float(), b.float())
        err = lambda out: ((out.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        ms = [calls * median_ms(lambda: F.linear(x, w, b), 10)]
        errors = [err(F.linear(x, w, b))]
        try:
            ms += [calls * median_ms(lambda: fp8(False), 10), calls * median_ms(lambda: fp8(True), 10)]
            errors.append(err(fp8(True)))
        except RuntimeError:  # no FP8 kernel for this shape or GPU: counted at its fp16 time
            ms += [ms[0], ms[0]]
            errors.append(float("nan"))
        totals = [t + v for t, v in zip(totals, ms)]
        print(f"{m:>8} {k:>5} {n:>6} {calls:>5} " + " ".join(f"{v:8.3f}" for v in ms) + f" {errors[0]:9.2e} {errors[1]:9.2e}", flush=True)
    print(f"{'total':>8} {'':>5} {'':>6} {'':>5} " + " ".join(f"{v:8.2f}" for v in totals))


def frame_kernel_sweep(cfg: dict, windows: int) -> None:
    """Microseconds per call of the frame-attention kernel at each block size (pairs per program) and warp count,
    on the U-Net's temporal shapes: levels 0-2 at 256 px, then level 0 at 512 px."""
    print("\nFrame-attention kernel: us per call, by pairs per program / warps")
    shapes = [s for s in attention_shapes(cfg, 256, windows) if s[0] in ("temporal L0", "temporal L1", "temporal L2")]
    shapes += [s for s in attention_shapes(cfg, 512, windows) if s[0] == "temporal L0"]
    for name, _, shape, _ in shapes:
        q, k, v = (_as_unet_passes(shape) for _ in range(3))
        cells = []
        for block in (1, 2, 4, 8, 16):
            for warps in (1, 2, 4, 8):
                try:
                    cells.append(f"{block}/{warps}: {1000 * median_ms(lambda: frame_kernel.launch(q, k, v, block, warps), 10):.0f}")
                except Exception as err:  # Triton: out of registers or shared memory
                    cells.append(f"{block}/{warps}: {type(err).__name__}")
        print(f"{name} {tuple(shape)}: " + ", ".join(cells), flush=True)


def attention_table(cfg: dict, res: int, windows: int) -> None:
    """Milliseconds per forward of each attention shape under each SDPA backend (q, k, v laid out as the U-Net
    passes them: (batch, len, heads*dim) viewed as (batch, heads, len, dim))."""
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    variants = {name: (lambda q, k, v, c=choice: _sdpa(q, k, v, c)) for name, choice in backends.items()}
    variants["pad64"] = _padded_sdpa  # head dim zero-padded to a multiple of 64: the same result
    variants["compiled"] = torch.compile(_explicit_attention, dynamic=False)  # Inductor's own kernels
    variants["triton"] = _frame_kernel  # ours, for the temporal shapes
    torch._dynamo.config.recompile_limit = 64  # one compile per shape
    print(f"\nAttention, {res} px, {windows} window(s): ms per forward (calls x ms per call)")
    print(f"{'shape':>12} {'calls':>5} " + " ".join(f"{b:>9}" for b in variants))
    totals: dict[str, float | None] = dict.fromkeys(variants, 0.0)  # None: some shape has no kernel
    for name, calls, qs, ks in attention_shapes(cfg, res, windows):
        q, k, v = _as_unet_passes(qs), _as_unet_passes(ks), _as_unet_passes(ks)
        cells = []
        for backend, fn in variants.items():
            try:
                ms = calls * median_ms(lambda: fn(q, k, v), 10)
                totals[backend] = None if totals[backend] is None else totals[backend] + ms
                cells.append(f"{ms:9.2f}")
            except RuntimeError:
                totals[backend] = None
                cells.append(f"{'n/a':>9}")
        print(f"{name:>12} {calls:>5} " + " ".join(cells), flush=True)
    print(f"{'total':>12} {'':>5} " + " ".join(f"{'n/a':>9}" if t is None else f"{t:9.2f}" for t in totals.values()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (fp16)")
    ap.add_argument("--cudagraphs", action="store_true", help="also time torch.compile with CUDA graphs (fp16)")
    ap.add_argument("--windows", type=int, nargs="+", default=[1], help="16-frame windows per call (x2 for guidance)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], choices=[256, 512])
    ap.add_argument("--profile", action="store_true", help="GPU time by kernel kind, per variant (fp16)")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per profile")
    ap.add_argument("--attention", action="store_true", help="each attention shape under each SDPA backend")
    ap.add_argument("--frame-kernel-sweep", action="store_true", help="the frame-attention kernel's block sizes")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="also time eager with cuDNN's benchmark mode (fp16)")
    ap.add_argument("--graphs", action="store_true", help="also time the forward replayed as a CUDA graph (fp16)")
    ap.add_argument("--fp8-gemms", action="store_true", help="each GEMM shape of a forward in fp16 and in FP8")
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "configs/unet/stage2.yaml").read_text())["model"]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    if args.frame_kernel_sweep:
        frame_kernel_sweep(cfg, max(args.windows))
    if args.attention:
        with torch.no_grad():
            for res in args.resolutions:
                for n in args.windows:
                    attention_table(cfg, res, n)
    with torch.device("cuda"):
        base = UNet3DConditionModel.from_config(cfg).eval()
    rows, profiles = [], []
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            model = base.to(dtype=dtype, memory_format=torch.channels_last)  # as Components.to
            variants = [("eager", model)]
            if dtype == torch.float16:
                variants += [("cudnn-bench", model)] if args.cudnn_benchmark else []
                if args.graphs:  # the full step as the pipeline replays it; context rows are (batch x frames)
                    deep = CUDAGraphed(model.deep, torch.cuda.Event(), torch.cuda.graph_pool_handle())
                    variants += [("graphs", lambda sample, t, ehs, deep=deep: deep(sample, t, ehs, False)[0])]
                variants += [("compile", torch.compile(model, dynamic=False))] if args.compile else []
                variants += [("cudagraphs", torch.compile(model, mode="reduce-overhead", dynamic=False))] if args.cudagraphs else []
            for res in args.resolutions:
                lat = res // 8
                for n in args.windows:
                    sample = torch.randn(2 * n, 13, 16, lat, lat, device="cuda", dtype=dtype)
                    ehs = torch.randn(32 * n, 50, 384, device="cuda", dtype=dtype)
                    if args.fp8_gemms and dtype == torch.float16:
                        fp8_gemm_table(model, sample, ehs, f"{res} px, {n} window(s)")
                    for name, m in variants:
                        torch.cuda.reset_peak_memory_stats()
                        torch.backends.cudnn.benchmark = name == "cudnn-bench"
                        ms = time_forward(m, sample, ehs, args.iters)
                        peak = torch.cuda.max_memory_allocated() / 2**30
                        tflops = n * TFLOP_PER_FORWARD[res] / (ms / 1000)
                        rows.append((res, n, str(dtype).removeprefix("torch."), name, ms, tflops, n * UPSTREAM_MS[res] / ms, peak))
                        print(*rows[-1], flush=True)
                        if args.profile and dtype == torch.float16:
                            profiles.append((f"{name} {res} px, {n} window(s)", ms, *profile(m, sample, ehs, args.top)))
    print(f"\nU-Net forward, batch 2 x 16 frames per window (median of {args.iters})")
    print(f"{'res':>4} {'windows':>7} {'dtype':>9} {'mode':>10} {'ms':>8} {'TFLOP/s':>8} {'vs upstream':>11} {'peak GiB':>9}")
    for r in rows:
        print(f"{r[0]:>4} {r[1]:>7} {r[2]:>9} {r[3]:>10} {r[4]:>8.1f} {r[5]:>8.0f} {r[6]:>10.2f}x {r[7]:>9.2f}")
    for title, ms, kinds, top in profiles:
        print(f"\nGPU time per forward, {title} (wall {ms:.1f} ms; kernels sum {sum(kinds.values()):.1f} ms)")
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<18} {v:8.2f} ms  {v / ms:5.1%}")
        for name, v, calls in top:
            print(f"    {v:7.2f} ms {calls:5.0f}x  {name[:110]}")
    print("\nPrecision on the contract's reduced U-Net, against upstream's fp32 output")
    print(f"{'dtype':>9} {'max abs':>10} {'mean abs':>10} {'rel L2':>10}")
    for r in precision_rows():
        print(f"{r[0]:>9} {r[1]:>10.2e} {r[2]:>10.2e} {r[3]:>10.2e}")


if __name__ == "__main__":
    main()

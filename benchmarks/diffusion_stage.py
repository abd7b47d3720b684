"""The GPU stage alone (Generate: VAE encode, 20 DDIM steps of the U-Net with guidance, VAE decode) on a GPU.

Real-size LatentSync architecture with random weights (same FLOPs as the checkpoints), fp16, one chunk of
`--windows` 16-frame windows with 4-frame overlaps, `--per-batch` windows per U-Net call. Prints frames/s of the
stage, U-Net TFLOP/s and share of the dense fp16 peak and peak GPU memory, at 256 and 512 px,
with and without DeepCache, eager and torch.compile'd. Then the VAE's share: milliseconds to encode (reference and
masked crops) and decode one 4-window batch, with the VAE's weights and inputs contiguous and channels-last. Then
the output's precision against an fp32 run (max and mean difference in uint8 levels over one window's generated
crops, same inputs and noise).
Upstream end to end on one H100 (docs/upstream_baseline.md): 7.54 / 11.42 fps at 256 (DeepCache), 3.23 / 5.38 at 512; its U-Net
at 142 / 190 TFLOP/s; 5.2 GiB of GPU memory at 256 (one window per U-Net call).

`--graphs-profile` instead profiles one 4-window chunk (64 frames, no overlap) through Generate with CUDA graphs,
as `run` runs it: wall time, the GPU's busy time within it, its longest idle gaps and GPU time by phase.

    python benchmarks/diffusion_stage.py [--windows 8] [--per-batch 1 4 8] [--compiled-per-batch 4] [--peak 989]
        [--graphs-profile]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch
from diffusers import AutoencoderKL

from lipsync_ray.diffusion import VAE_FRAMES, DiffusionParams, LipSyncDiffusion
from lipsync_ray.models.presets import build_random_components, get_preset
from lipsync_ray.plan import windows

TFLOP_PER_FORWARD = {256: 8.100963942400, 512: 35.251380551680}  # contract/flops.json: batch 2 x 16 frames
UPSTREAM_FPS = {(256, 0): 7.54, (256, 3): 11.42, (512, 0): 3.23, (512, 3): 5.38}


@functools.lru_cache(maxsize=1)
def _diffusion(
    model: str, dtype: torch.dtype = torch.float16, compile: bool = False, cuda_graphs: bool = False
) -> LipSyncDiffusion:
    components = build_random_components(get_preset(model), device="cuda").to("cuda", dtype)
    return LipSyncDiffusion(components, "cuda", dtype, compile=compile, cuda_graphs=cuda_graphs)


def _inputs(res: int, n: int):
    crops = np.random.RandomState(0).randint(0, 255, (n, res, res, 3), dtype=np.uint8)
    return crops, torch.randn(n, 50, 384, generator=torch.Generator().manual_seed(0))


def run(model: str, n_windows: int, per_batch: int, deepcache: int, compile: bool, peak: float) -> dict:
    diffusion = _diffusion(model, compile=compile)
    wins = windows(n_windows * 12 + 4, 16, 4)
    n = wins[-1].stop
    res = diffusion.resolution
    crops, audio = _inputs(res, n)
    params = DiffusionParams(20, 1.5, 1247, "ddim", per_batch, deepcache)
    diffusion.generate(crops, audio, wins, params, 4)  # warm-up (compiles every batch shape of the run)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    diffusion.generate(crops, audio, wins, params, 4)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # U-Net work in upstream's units (batch 2 x 16 frames per window and step); with DeepCache the shallow
    # steps are not counted, so that column is only meaningful without it
    tflops = TFLOP_PER_FORWARD[res] * 20 * len(wins) / seconds if deepcache <= 1 else float("nan")
    return {
        "res": res, "deepcache": deepcache, "per_batch": per_batch, "frames": n, "fps": n / seconds,
        "upstream": UPSTREAM_FPS.get((res, deepcache)), "tflops": tflops, "peak_share": tflops / peak,
        "gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def graphs_profile(model: str, top: int = 12) -> None:
    """Prints where one chunk's time goes in Generate with CUDA graphs (see the module's docstring)."""
    from torch.profiler import ProfilerActivity, profile

    diffusion = _diffusion(model, cuda_graphs=True)
    crops, audio = _inputs(diffusion.resolution, 64)
    wins, params = windows(64, 16, 0), DiffusionParams(20, 1.5, 1247, "ddim", 4, 0)
    phases: dict[str, float] = {}

    def timed(name, fn):  # GPU milliseconds between events around each call of fn, summed by phase
        def call(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            end.synchronize()
            phases[name] = phases.get(name, 0.0) + start.elapsed_time(end)
            return out
        return call

    generate = lambda: diffusion.generate(crops, audio, wins, params, 0)  # noqa: E731
    for _ in range(2):  # captures the graphs, then one warm run
        generate()
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate()
    wall = 1000 * (time.perf_counter() - start)
    encode, decode, unet = diffusion._encode, diffusion._decode, diffusion.c.unet
    diffusion._encode, diffusion._decode = timed("VAE encode", encode), timed("VAE decode", decode)
    diffusion.c.unet = timed("U-Net", unet)
    generate()
    diffusion._encode, diffusion._decode, diffusion.c.unet = encode, decode, unet
    print(f"\nGenerate, one 4-window chunk with CUDA graphs ({model}): wall {wall:.1f} ms; GPU time by phase, ms "
          "(events around each call, synchronised): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate()
        torch.cuda.synchronize()
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, gaps, reach, last = 0.0, [], spans[0][0], spans[0][2]
    for s0, s1, name in spans:  # union of the kernels' intervals (us); gaps between them
        if s0 > reach:
            gaps.append(((s0 - reach) / 1000, last, name))
        busy += max(0.0, s1 - max(s0, reach))
        if s1 > reach:
            reach, last = s1, name
    print(f"Profiled: GPU busy {busy / 1000:.1f} of {(reach - spans[0][0]) / 1000:.1f} ms between its first and last kernel "
          f"({len(spans)} kernels); idle {sum(g[0] for g in gaps):.1f} ms in {len(gaps)} gaps")
    for ms, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  gap {ms:6.2f} ms after {before[:60]} before {after[:60]}")


def vae_ms(model: str, frames: int = 64) -> list[tuple[str, float, float]]:
    """(VAE form, encode ms, decode ms) for one U-Net batch of `frames` crops: Generate encodes each crop twice
    (reference and masked) and decodes once. Rows: diffusers' VAE as published (contiguous, PyTorch's GroupNorm and
    SiLU) and ours (`models.vae`: channels-last, GroupNorm + SiLU and the ResNets' adds fused), same weights."""
    diffusion = _diffusion(model)
    fused = diffusion.c.vae
    plain = AutoencoderKL.from_config(fused.config).to("cuda", torch.float16).eval()
    plain.load_state_dict(fused.state_dict())
    images = torch.rand(2 * frames, 3, diffusion.resolution, diffusion.resolution, device="cuda", dtype=torch.float16) * 2 - 1
    latents = diffusion._encode(images[:frames])
    rows = []
    for name, vae, fmt in (
        ("diffusers, contiguous", plain, torch.contiguous_format),
        ("ours: fused kernels, channels-last", fused, torch.channels_last),
    ):
        parts = lambda x: [p.contiguous(memory_format=fmt) for p in x.split(VAE_FRAMES)]  # noqa: E731
        with torch.no_grad():
            encode = lambda: [vae.encode(p).latent_dist.mode() for p in parts(images)]  # noqa: E731
            decode = lambda: [vae.decode(p).sample for p in parts(latents)]  # noqa: E731
            rows.append((name, median_ms(encode, 5), median_ms(decode, 5)))
    return rows


def median_ms(fn, iters: int) -> float:
    """Median GPU milliseconds of one `fn()` over `iters` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def precision(model: str, compile: bool) -> list[tuple[str, float, float]]:
    """uint8 differences of one window's output from fp16 (eager, compiled) and bf16 against fp32."""
    res = get_preset(model).resolution
    crops, audio = _inputs(res, 16)
    wins = windows(16, 16, 4)
    params = DiffusionParams(20, 1.5, 1247, "ddim", 1, 0)
    out = {}
    variants = [("fp32", torch.float32, False), ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)]
    variants += [("fp16 compiled", torch.float16, True)] if compile else []
    for name, dtype, comp in variants:
        out[name] = _diffusion(model, dtype, comp).generate(crops, audio, wins, params, 4).astype(np.int16)
    ref = out.pop("fp32")
    return [(name, float(np.abs(x - ref).max()), float(np.abs(x - ref).mean())) for name, x in out.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--per-batch", type=int, nargs="*", default=[1, 4, 8], help="windows/call of eager runs")
    parser.add_argument("--compiled-per-batch", type=int, nargs="*", default=[4], help="windows/call of compiled runs")
    parser.add_argument("--peak", type=float, default=989.0, help="dense fp16 TFLOP/s of the GPU (H100/H200 SXM: 989)")
    parser.add_argument("--models", nargs="+", default=["latentsync-1.5-random", "latentsync-1.6-random"])
    parser.add_argument("--graphs-profile", action="store_true", help="only profile one chunk with CUDA graphs, per model")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    if args.graphs_profile:
        for model in args.models:
            graphs_profile(model)
        return
    print("| res | DeepCache | compile | windows/call | frames | stage fps | upstream e2e fps | UNet TFLOP/s | of peak | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        runs = [(False, pb) for pb in args.per_batch] + [(True, pb) for pb in args.compiled_per_batch]
        for compile, per_batch in runs:
            for deepcache in (0, 3):
                r = run(model, args.windows, per_batch, deepcache, compile, args.peak)
                print(
                    f"| {r['res']} | {r['deepcache'] or 'off'} | {'on' if compile else 'off'} | {per_batch} | {r['frames']} "
                    f"| {r['fps']:.1f} | {r['upstream']} | {r['tflops']:.0f} | {r['peak_share']:.0%} | {r['gpu_gib']:.2f} |",
                    flush=True,
                )
                torch.cuda.empty_cache()
    print("\n| model | VAE | encode 128 crops ms | decode 64 latents ms |\n|---|---|---|---|")
    for name, enc, dec in vae_ms(args.models[0]):
        print(f"| {args.models[0]} | {name} | {enc:.1f} | {dec:.1f} |", flush=True)
    print("\n| model | precision | max uint8 diff vs fp32 | mean uint8 diff vs fp32 |\n|---|---|---|---|")
    for name, worst, mean in precision(args.models[0], bool(args.compiled_per_batch)):
        print(f"| {args.models[0]} | {name} | {worst:.0f} | {mean:.3f} |", flush=True)


if __name__ == "__main__":
    main()

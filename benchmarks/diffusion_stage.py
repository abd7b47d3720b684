"""The GPU stage alone (Generate: VAE encode, 20 DDIM steps of the U-Net with guidance, VAE decode) on a GPU.

Real-size LatentSync architecture with random weights (same FLOPs as the checkpoints), fp16, one chunk of
`--windows` 16-frame windows with 4-frame overlaps, `--per-batch` windows per U-Net call. Prints frames/s of the
stage, U-Net TFLOP/s and share of the dense fp16 peak and peak GPU memory, at 256 and 512 px,
with and without DeepCache. Upstream end to end on one H100 (shared/perf): 7.54 / 11.42 fps at 256 (DeepCache),
3.23 / 5.38 at 512; its U-Net at 142 / 190 TFLOP/s.

    python benchmarks/diffusion_stage.py [--windows 8] [--per-batch 4 8] [--peak 989]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from lipsync_ray.diffusion import DiffusionParams, LipSyncDiffusion
from lipsync_ray.models.presets import build_random_components, get_preset
from lipsync_ray.plan import windows

TFLOP_PER_FORWARD = {256: 8.100963942400, 512: 35.251380551680}  # contract/flops.json: batch 2 x 16 frames
UPSTREAM_FPS = {(256, 0): 7.54, (256, 3): 11.42, (512, 0): 3.23, (512, 3): 5.38}


@functools.lru_cache(maxsize=1)
def _diffusion(model: str) -> LipSyncDiffusion:
    components = build_random_components(get_preset(model)).to("cuda", torch.float16)
    return LipSyncDiffusion(components, "cuda", torch.float16)


def run(model: str, n_windows: int, per_batch: int, deepcache: int, peak: float) -> dict:
    preset = get_preset(model)
    diffusion = _diffusion(model)
    wins = windows(n_windows * 12 + 4, 16, 4)
    n = wins[-1].stop
    res = preset.resolution
    crops = np.random.RandomState(0).randint(0, 255, (n, res, res, 3), dtype=np.uint8)
    audio = torch.randn(n, 50, 384)
    params = DiffusionParams(20, 1.5, 1247, "ddim", per_batch, deepcache)
    diffusion.generate(crops[: wins[0].stop], audio[: wins[0].stop], wins[:1], params, 4)  # warm-up
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--per-batch", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--peak", type=float, default=989.0, help="dense fp16 TFLOP/s of the GPU (H100 SXM: 989)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    print("| res | DeepCache | windows/call | frames | stage fps | upstream e2e fps | UNet TFLOP/s | of peak | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in ("latentsync-1.5", "latentsync-1.6"):
        for deepcache in (0, 3):
            for per_batch in args.per_batch:
                r = run(model, args.windows, per_batch, deepcache, args.peak)
                print(
                    f"| {r['res']} | {r['deepcache'] or 'off'} | {per_batch} | {r['frames']} | {r['fps']:.1f} | {r['upstream']} "
                    f"| {r['tflops']:.0f} | {r['peak_share']:.0%} | {r['gpu_gib']:.2f} |", flush=True
                )
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

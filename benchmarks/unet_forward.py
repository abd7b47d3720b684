"""U-Net forward on a GPU: latency, TFLOP/s, peak memory, and the fast path's precision against fp32.

Real-size LatentSync architecture (configs/unet/stage2.yaml) with random weights: the same FLOPs as the published
checkpoints. One forward = batch 2 (both guidance halves) x 16 frames, as upstream's denoising step.
Upstream on one H100 (shared/perf): 57.0 ms at 256 px, 185.3 ms at 512 px (fp16).

    python benchmarks/unet_forward.py [--compile]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from diffusion_stage import TFLOP_PER_FORWARD  # this folder is on sys.path when run as a script
from lipsync_ray.models import UNet3DConditionModel

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_MS = {256: 57.0, 512: 185.3}


def time_forward(model, sample, ehs, iters: int) -> float:
    t = torch.tensor(951, device=sample.device)
    for _ in range(3):
        model(sample, t, ehs)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(sample, t, ehs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def precision_rows():
    fixture = torch.load(ROOT / "tests/data/unet_equivalence_A.pt", weights_only=True)
    model = UNet3DConditionModel.from_config(fixture["config"]).eval()
    model.load_state_dict(fixture["state_dict"])
    expected = fixture["expected"].double()
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m = model.to("cuda", dtype)
        with torch.no_grad():
            out = m(fixture["sample"].to("cuda", dtype), fixture["timestep"].cuda(), fixture["encoder_hidden_states"].to("cuda", dtype)).sample
        d = (out.double().cpu() - expected).abs()
        rows.append((str(dtype).removeprefix("torch."), d.max().item(), d.mean().item(), (d.norm() / expected.norm()).item()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile at 256 px")
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "configs/unet/stage2.yaml").read_text())["model"]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    with torch.device("cuda"):
        base = UNet3DConditionModel.from_config(cfg).eval()
    rows = []
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            model = base.to(dtype)
            variants = [("eager", model)]
            if args.compile and dtype == torch.float16:
                variants.append(("compile", torch.compile(model)))
            for res in (256, 512):
                lat = res // 8
                sample = torch.randn(2, 13, 16, lat, lat, device="cuda", dtype=dtype)
                ehs = torch.randn(32, 50, 384, device="cuda", dtype=dtype)
                for name, m in variants:
                    if name == "compile" and res != 256:
                        continue
                    torch.cuda.reset_peak_memory_stats()
                    ms = time_forward(m, sample, ehs, args.iters)
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    tflops = TFLOP_PER_FORWARD[res] / (ms / 1000)
                    rows.append((res, str(dtype).removeprefix("torch."), name, ms, tflops, UPSTREAM_MS[res] / ms, peak))
    print("\nU-Net forward, batch 2 x 16 frames (median of", args.iters, ")")
    print(f"{'res':>4} {'dtype':>9} {'mode':>8} {'ms':>8} {'TFLOP/s':>8} {'vs upstream':>11} {'peak GiB':>9}")
    for r in rows:
        print(f"{r[0]:>4} {r[1]:>9} {r[2]:>8} {r[3]:>8.1f} {r[4]:>8.0f} {r[5]:>10.2f}x {r[6]:>9.2f}")
    print("\nPrecision on the contract's reduced U-Net, against upstream's fp32 output")
    print(f"{'dtype':>9} {'max abs':>10} {'mean abs':>10} {'rel L2':>10}")
    for r in precision_rows():
        print(f"{r[0]:>9} {r[1]:>10.2e} {r[2]:>10.2e} {r[3]:>10.2e}")


if __name__ == "__main__":
    main()

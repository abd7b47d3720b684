"""Face restoration alone on real frames: the frames/s of `FaceRestorer` (align each face to FFHQ 512, restore,
warp back, blend inside the regenerated lower face) at a batch size, in fp32 and fp16, the network's forward alone
on 512 px faces, and how far fp16's restored frames are from fp32's (uint8 levels, inside the masks). The faces,
five-point landmarks and masks are the pipeline's own: Prepare's alignment of the video's first chunk.

    python benchmarks/restoration.py --video demo1_video.mp4 --audio demo1_audio.wav [--restorer gfpgan-random]
        [--batch 16] [--frames 64]

`gfpgan-random` is GFPGAN v1.4's architecture with random weights (the same FLOPs); `gfpgan` needs the weights.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lipsync_ray.config import LipSyncConfig
from lipsync_ray.enhance import FaceRestorer, five_points, restoration_masks
from lipsync_ray.faces import FaceAligner
from lipsync_ray.media import FrameReader
from lipsync_ray.stages import Prepare, plan_video, set_up


def _timed(fn, repeats: int) -> float:
    """Seconds per call after one warm-up call, the GPU's work included."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--restorer", default="gfpgan-random")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=64, help="frames restored per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(torch.cuda.get_device_name() if device == "cuda" else "CPU", f"torch {torch.__version__}", flush=True)

    cfg = LipSyncConfig(model="latentsync-1.5-random", detector="offline")
    plan = plan_video(args.video, args.audio, cfg)
    item = set_up(Prepare, cfg)(plan, plan.chunks[0])
    n = min(args.frames, len(item.flags))
    with FrameReader(args.video, plan.source) as reader:
        frames = np.stack([reader[int(plan.source_map[i])] for i in range(n)])
    aligner = FaceAligner(cfg.preset().resolution)
    matrices = torch.as_tensor(item.matrices[:n], dtype=torch.float32)
    landmarks, masks = five_points(aligner, matrices), restoration_masks(aligner, matrices, *frames.shape[1:3])

    print(f"| restorer | dtype | batch | frames ({frames.shape[2]}x{frames.shape[1]}) | restoration fps (align, restore, blend) "
          "| network alone, faces/s | fp16 vs fp32: max / mean levels in the masks |")
    print("|" + "---|" * 7, flush=True)
    outputs = {}
    for dtype in (torch.float32, torch.float16) if device == "cuda" else (torch.float32,):
        restorer = FaceRestorer(args.restorer, cfg.checkpoints, device, dtype, args.batch)
        restorer.setup()
        seconds = _timed(lambda: outputs.__setitem__(dtype, restorer(frames, landmarks, masks)), args.repeats)
        faces = torch.rand(args.batch, 3, restorer.size, restorer.size, device=device, dtype=dtype) * 2 - 1
        with torch.inference_mode():
            network = _timed(lambda: restorer.model(faces, return_rgb=False), args.repeats)
        diff = ""
        if dtype == torch.float16:
            inside = masks > 0
            d = np.abs(outputs[dtype].astype(int) - outputs[torch.float32])[inside]
            diff = f"{d.max()} / {d.mean():.3f}"
        print(f"| {args.restorer} | {str(dtype).removeprefix('torch.')} | {args.batch} | {n} | {n / seconds:.1f} "
              f"| {args.batch / network:.1f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()

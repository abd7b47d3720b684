"""The CPU stage alone (Prepare: decode, face detection and alignment, audio features), as `run`'s workers see it.

`run --prepare-workers N` splits the first chunk into N parts and hands out the later chunks whole, to whichever
worker is free. This prepares one video's parts in that order on one stage per worker, the workers taking parts
in turn, one after another in this process (so the figures do not depend on how many cores are free), and prints
each worker's frames/s over the rounds after a warm-up round. A worker keeps its clip open between its parts,
as in `run`.

    python benchmarks/prepare_stage.py --video V.mp4 --audio A.wav [--workers 2] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from lipsync_ray.config import LipSyncConfig
from lipsync_ray.stages import Prepare, chunk_parts, plan_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--model", default="latentsync-1.5-random")
    parser.add_argument("--detector", default="auto", choices=["auto", "insightface", "offline"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    parser.add_argument("--windows-per-chunk", type=int, default=4)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the video, after one warm-up pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = LipSyncConfig(model=args.model, detector=args.detector, windows_per_chunk=args.windows_per_chunk, window_overlap=args.overlap)
    stages = [Prepare(cfg) for _ in range(args.workers)]
    for stage in stages:
        stage.setup()
    plan = plan_video(args.video, args.audio, cfg)
    parts = [frames for chunk in chunk_parts(plan, args.workers) for frames in chunk]
    frames, seconds = [0] * args.workers, [0.0] * args.workers
    for rnd in range(args.rounds + 1):
        for k, part in enumerate(parts):
            worker = k % args.workers
            start = time.perf_counter()
            stages[worker].part(plan, part)
            if rnd:
                frames[worker] += len(part)
                seconds[worker] += time.perf_counter() - start
    print(f"{args.video}: {plan.n_out} frames at {plan.width}x{plan.height}, {len(parts)} parts, {args.threads} thread(s) per worker")
    print("| worker | frames | seconds | fps |\n|---|---|---|---|")
    for worker in range(args.workers):
        print(f"| {worker} | {frames[worker]} | {seconds[worker]:.2f} | {frames[worker] / seconds[worker]:.1f} |")
    print(f"| all, one after another | {sum(frames)} | {sum(seconds):.2f} | {sum(frames) / sum(seconds):.1f} |")


if __name__ == "__main__":
    main()

"""The bulk job as a user runs it: a catalog of clips of mixed length and size, built from the bundled media, through
`lipsync-ray batch` on N GPUs of this host, beside the plain pipeline (`lipsync-ray run`) on one clip in the same
process as the reference. Prints one table row per run: fps end to end,
its steady rate per GPU (between the first chunk on a GPU and the last one off it) against the plain pipeline's
Generate alone, when the first chunk reached the GPU and when the actors were ready, GPU busy over the same span,
how long chunks queued between Prepare and Generate and the GPU's idle seconds between chunks, each stage's busy
seconds summed over its workers, actor counts, and peak GPU and host memory.

    python benchmarks/catalog.py --video demo1_video.mp4 --audio demo1_audio.wav --clips 24 --gpus 1 \\
        [--models latentsync-1.5-random latentsync-1.6-random] [--deepcache 0 3] [--lengths 10 30 60 120] [--prefetch 1 2] \\
        [--windows-per-chunk 4 8]

Clips cycle through `--lengths` seconds (the source looped, no re-encode) and alternate between the source's size
and 720p (re-encoded once, then looped). Multi-GPU: `--gpus 1 2 4` runs the same catalog on each (strong scaling);
`--clips-per-gpu` scales the catalog with the GPUs instead (weak scaling).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import tempfile
from pathlib import Path

from end_to_end import _fmt, catalog_job, plain  # this folder is on sys.path when run as a script
from lipsync_ray.config import LipSyncConfig


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


def build_catalog(video: str, audio: str, out: Path, clips: int, lengths: list[float]) -> Path:
    """`clips` rows of looped copies of `video` and `audio`, `lengths` seconds long in turn, every other one 720p."""
    small = out / "source-720p.mp4"
    _ffmpeg("-i", video, "-vf", "scale=-2:720", "-c:v", "libx264", "-preset", "veryfast", "-g", "50", "-an", str(small))
    rows = []
    for i, (seconds, source) in enumerate(zip(itertools.cycle(lengths), itertools.cycle([video, str(small)]))):
        if i == clips:
            break
        v, a = out / f"clip{i:03d}.mp4", out / f"clip{i:03d}.wav"
        _ffmpeg("-stream_loop", "-1", "-i", source, "-t", str(seconds), "-c", "copy", "-an", str(v))
        _ffmpeg("-stream_loop", "-1", "-i", audio, "-t", str(seconds), str(a))
        rows.append({"id": f"clip{i:03d}", "video": str(v), "audio": str(a)})
    catalog = out / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--clips", type=int, default=24, help="catalog rows (strong scaling: the same for every --gpus)")
    parser.add_argument("--clips-per-gpu", type=int, default=None, help="weak scaling: this many rows per GPU instead")
    parser.add_argument("--lengths", type=float, nargs="+", default=[10, 30, 60, 120], help="clip seconds, in turn")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPUs of this host for the job (0: CPU only)")
    parser.add_argument("--models", nargs="+", default=["latentsync-1.5-random"])
    parser.add_argument("--deepcache", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--windows-per-chunk", type=int, nargs="+", default=[None], help="in turn (default: the job's)")
    parser.add_argument("--overlap", type=int, default=0, help="frames shared by neighbouring windows (upstream: 0)")
    parser.add_argument("--prepare-per-gpu", type=int, default=None, help="a fixed Prepare pool per GPU (default: the job's, which grows with demand)")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1], help="the job's --generate-prefetch, in turn")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain pipeline's run on the first clip")
    args = parser.parse_args()

    import torch

    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", f"torch {torch.__version__}", flush=True)
    print("| model | DeepCache | windows/chunk | prefetch | GPUs | clips | frames | fps | steady fps per GPU | Generate alone fps (plain) | steady / alone "
          "| first chunk on GPU s (Generate actor started / ready; first Prepare actor ready) | GPU busy (stage / NVML) | chunk queue wait s | GPU idle s "
          "| prepare / generate / compose busy s | actors (prepare, generate) | peak GPU GiB | peak host GiB |")
    print("|" + "---|" * 19, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        catalogs: dict[int, Path] = {}
        for model, deepcache in itertools.product(args.models, args.deepcache):
            alone = None  # Generate alone: once per model and DeepCache (the chunk size does not change it)
            for per_chunk, gpus, prefetch in itertools.product(args.windows_per_chunk, args.gpus, args.prefetch):
                chunking = {"windows_per_chunk": per_chunk} if per_chunk else {}
                cfg = LipSyncConfig(model=model, deepcache=deepcache, window_overlap=args.overlap, **chunking)
                clips = args.clips_per_gpu * max(gpus, 1) if args.clips_per_gpu else args.clips
                if clips not in catalogs:
                    (out / str(clips)).mkdir()
                    catalogs[clips] = build_catalog(args.video, args.audio, out / str(clips), clips, args.lengths)
                if alone is None and not args.no_reference:  # Generate alone, in this call and on this GPU
                    first = json.loads(catalogs[clips].read_text().splitlines()[0])
                    alone = plain(cfg, first["video"], first["audio"], out)["generate_alone_fps"]
                r = catalog_job(cfg, catalogs[clips], out, gpus, args.prepare_per_gpu, generate_prefetch=prefetch)
                s, t = r["stage_s"], r["timeline"]
                print(
                    f"| {model} | {deepcache or 'off'} | {cfg.windows_per_chunk} | {prefetch} | {gpus} | {clips} | {r['frames']} | {r['fps']:.1f} "
                    f"| {r['steady_fps']:.1f} | {_fmt(alone)} | {_fmt(alone and r['steady_fps'] / alone, '.0%')} "
                    f"| {t['first_on_gpu']:.1f} ({t['generate_started']:.1f} / {t['generate_ready']:.1f}; {t['prepare_ready_first']:.1f}) "
                    f"| {t['gpu_stage_busy']:.0%} / {_fmt(r['busy'], '.0%')} | {t['queue_wait_median_s']:.1f} | {t['gpu_idle_s']:.1f} "
                    f"| {s['prepare']:.0f} / {s['generate']:.0f} / {s['compose']:.0f} | {r['actors']['prepare']}, {r['actors']['generate']} "
                    f"| {_fmt(r['gpu_gib'], '.2f')} | {r['host_gib']:.2f} |", flush=True,
                )


if __name__ == "__main__":
    main()

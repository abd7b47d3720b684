"""End to end on real media: decode, face detection and alignment, audio features, diffusion, paste-back, encode.

Runs the real-size architectures with random weights (`latentsync-1.5-random`, `latentsync-1.6-random`: the
published FLOPs) through the plain pipeline (`lipsync-ray run`) and, with `--ray-gpus`, through the Ray Data job
on that many GPUs. Prints one table row per run:
- frames/s end to end, the seconds the GPU stage waits for its first chunk and the seconds after its last one
  (fill / drain), the seconds it waits between chunks (gaps: for Prepare, or for Compose to take its last
  result), and each stage's own rate (frames over the seconds its thread was busy; the stages
  overlap, so the slowest stage bounds the end-to-end rate); plain runs also replay Generate's chunks alone after
  the run ("alone"): how much the other stages, which share the GPU and the CPU, slow it down;
- U-Net TFLOP/s over the Generate stage's time (VAE included, so a lower bound) and its share of `--peak`;
- GPU busy fraction (NVML's utilisation, sampled every 0.1 s, mean over the run and the GPUs used);
- peak GPU memory (plain: allocated / reserved by PyTorch; Ray: NVML, per GPU) and peak host memory (RSS of this
  process and all its children).

    python benchmarks/end_to_end.py --video V.mp4 --audio A.wav [--models latentsync-1.5-random ...]
        [--deepcache 0 3] [--overlap 4] [--windows-per-chunk 4] [--compile] [--cuda-graphs on off] [--prepare-workers 2]
        [--compose-device auto cpu] [--enhance none gfpgan-random]
        [--ray-gpus 1 2 4 --ray-videos-per-gpu 6]

Upstream end to end on one H100 (docs/upstream_baseline.md): 7.54 / 11.42 frames/s at 256 (without / with DeepCache),
3.23 / 5.38 at 512, at 5.2 GiB of GPU memory for 256.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil

from diffusion_stage import TFLOP_PER_FORWARD, UPSTREAM_FPS  # this folder is on sys.path when run as a script
from lipsync_ray.config import LipSyncConfig
from lipsync_ray.plan import chunks


class Sampler:
    """Peak host RSS of this process tree and, through NVML when present, GPU utilisation and memory."""

    def __init__(self, gpus: int):
        self.rss = 0
        self.util: list[tuple[float, float]] = []  # (time.time(), mean utilisation % over the GPUs)
        self.gpu_bytes = 0
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
        except Exception:  # no NVML (CPU hosts): GPU columns stay empty
            self._nvml, self._handles = None, []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.1):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.rss = max(self.rss, total)
            if self._handles:
                util = sum(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles) / len(self._handles)
                self.util.append((time.time(), util))
                self.gpu_bytes = max(self.gpu_bytes, max(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles))

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """Mean GPU utilisation, over the samples between `start` and `end` (time.time()) when given."""
        util = [u for t, u in self.util if start <= t <= end]
        return sum(util) / len(util) / 100 if util else None


class Timed:
    """A stage whose own busy seconds are counted; for Compose, time spent waiting for the next item is not."""

    def __init__(self, stage):
        self.stage, self.seconds = stage, 0.0
        self.first: float | None = None  # when its first call started and its last call ended (perf_counter)
        self.last: float | None = None

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        self.first = self.first or start
        waited = 0.0
        if len(args) >= 2 and hasattr(args[1], "__next__"):  # Compose(plan, items, ...): time its waits
            def waiting(items):
                nonlocal waited
                while True:
                    t = time.perf_counter()
                    item = next(items, None)
                    waited += time.perf_counter() - t
                    if item is None:
                        return
                    yield item

            args = (args[0], waiting(args[1]), *args[2:])
        try:
            return self.stage(*args, **kwargs)
        finally:
            self.last = time.perf_counter()
            self.seconds += self.last - start - waited


def plain(cfg: LipSyncConfig, video: str, audio: str, out: Path, compose_device: str = "auto") -> dict:
    """`compose_device`: where Compose pastes (auto: run's choice, the GPU when there is one)."""
    import torch

    from lipsync_ray.pipeline import LipSyncPipeline
    from lipsync_ray.stages import Compose

    with LipSyncPipeline(cfg) as pipeline:
        if compose_device != "auto":
            pipeline.compose = Compose(cfg, device=compose_device)
            pipeline.compose.setup()
        pipeline.run(video, audio, out / "warmup.mp4")  # model warm-up (and compilation) outside the timing
        # Prepare in worker processes is not timed per stage (its calls run there)
        names = ("generate", "compose") if pipeline.workers else ("prepare", "generate", "compose")
        stages = {name: Timed(getattr(pipeline, name)) for name in names}
        generate_stage, chunks_seen = stages["generate"].stage, []
        stages["generate"].stage = lambda item: chunks_seen.append(item) or generate_stage(item)
        for name, timed in stages.items():
            setattr(pipeline, name, timed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with Sampler(1) as sampler:
            start = time.perf_counter()
            result = pipeline.run(video, audio, out / "plain.mp4")
            end = time.perf_counter()
        alone = time.perf_counter()
        for item in chunks_seen:  # each call returns host arrays, so it has finished on the GPU
            generate_stage(item)
        alone = time.perf_counter() - alone
    generate = stages["generate"]
    # the run's windows, from its frame count as plan_video chunks it (no second probe and audio decode)
    windows = sum(len(c.windows) for c in chunks(result.frames, cfg.windows_per_chunk, overlap=cfg.window_overlap))
    return {
        "fps": result.fps, "frames": result.frames,
        # the GPU stage's idle time: before the first chunk reaches Generate, between chunks, after the last one leaves it
        "fill_gaps_drain": f"{generate.first - start:.1f} / {generate.last - generate.first - generate.seconds:.1f} / {end - generate.last:.1f}",
        **{f"{k}_fps": result.frames / v.seconds for k, v in stages.items()},
        "generate_alone_fps": result.frames / alone,
        "unet_tflops": _tflops(cfg, windows, stages["generate"].seconds),
        "busy": sampler.busy(), "host_gib": sampler.rss / 2**30,
        "gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        # CUDA graphs keep their own memory pools: what they hold between replays is reserved, not allocated
        "gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
    }


def _tflops(cfg: LipSyncConfig, windows: int, seconds: float) -> float | None:
    per_forward = TFLOP_PER_FORWARD.get(cfg.preset().resolution)
    if per_forward is None or cfg.deepcache > 1:  # DeepCache's shallow steps are not counted
        return None
    return per_forward * cfg.steps * windows / seconds


def ray_job(
    cfg: LipSyncConfig, video: str, audio: str, out: Path, gpus: int, videos: int, prepare_per_gpu: int, **job_options
) -> dict:
    """The Ray Data job over `videos` copies of the video on `gpus` GPUs of a local cluster (`catalog_job`)."""
    catalog = out / f"catalog-{gpus}.jsonl"
    catalog.write_text("".join(json.dumps({"id": f"v{i}", "video": video, "audio": audio}) + "\n" for i in range(videos)))
    return catalog_job(cfg, catalog, out, gpus, prepare_per_gpu, **job_options)


def catalog_job(
    cfg: LipSyncConfig, catalog: Path, out: Path, gpus: int, prepare_per_gpu: int | None = None, **job_options
) -> dict:
    """The Ray Data job over `catalog` on `gpus` GPUs of a local Ray started here (not timed: the job starts on a
    running instance). `prepare_per_gpu`: a fixed Prepare pool of that many actors per GPU (default: the job's
    own, which grows with the GPU stage's demand).

    From the chunks' timelines (`run_batch`'s `on_chunk`): when the first chunk reached a GPU and when the actors
    were ready, the job's rate between the first chunk on a GPU and the last one off it ("steady": start-up and the
    last video's Compose left out), GPU busy over the same span (the Generate stage's own seconds, and NVML's),
    how long chunks waited between Prepare and Generate, and the GPU actors' idle seconds between chunks. Stage
    seconds are summed over the workers (each stage's own busy time, as the manifest reports it)."""
    import ray

    from lipsync_ray.batch import BatchConfig, run_batch

    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(gpus)))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # enough logical CPUs for every actor (the GPU stage takes one too) plus the planning and Compose tasks:
    # fewer (a small CPU host) hang the job
    cpus = max(os.cpu_count() or 1, ((prepare_per_gpu or 2) + 1) * max(gpus, 1) + 2)
    ray.init(address="local", num_gpus=gpus, num_cpus=cpus, include_dashboard=False)
    time.sleep(5)  # the instance settles (its own processes start) before the job's clock starts, as on a cluster
    pools = {} if prepare_per_gpu is None else {"prepare_actors": (prepare_per_gpu * max(gpus, 1),) * 2}
    job = BatchConfig(
        # a fresh output prefix: the job skips videos already finished under its output
        catalog=str(catalog), output=tempfile.mkdtemp(prefix=f"ray-{gpus}-", dir=out), pipeline=cfg, gpu=gpus > 0,
        **pools, **job_options,  # the GPU pool as users get it: it grows to the GPUs
    )
    chunks: list[dict] = []
    try:
        with Sampler(gpus) as sampler:
            start, t0 = time.perf_counter(), time.time()
            done: list[float] = []
            rows = run_batch(
                job, on_video=lambda _: done.append(time.perf_counter() - start),
                on_chunk=lambda r: chunks.append({k: v for k, v in r.items() if k != "payload"}),
            )
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} videos failed: {failed[0].error}")
    frames = sum(r.frames for r in rows)
    stage_s = {k: sum(getattr(r, f"{k}_s") for r in rows) for k in ("prepare", "generate", "compose")}
    t = _timeline(chunks, t0)
    steady = frames / (t["last_off_gpu"] - t["first_on_gpu"]) / max(gpus, 1)
    print(
        f"ray x{gpus} {job_options}: videos finished at {', '.join(f'{t:.0f}' for t in done)} s of {seconds:.0f} s; "
        f"timeline {json.dumps({k: round(v, 2) for k, v in t.items()})}", flush=True,
    )
    return {
        "fps": frames / seconds, "steady_fps": steady, "frames": frames, "seconds": seconds, "first_video_s": done[0],
        "generate_fps": frames / (stage_s["generate"] / max(gpus, 1)), "stage_s": stage_s, "timeline": t,
        "actors": {"prepare": len({c["prepare_worker"] for c in chunks}), "generate": len({c["worker"] for c in chunks if c["generate_s"]})},
        "busy": sampler.busy(t0 + t["first_on_gpu"], t0 + t["last_off_gpu"]), "host_gib": sampler.rss / 2**30,
        "gpu_gib": sampler.gpu_bytes / 2**30 if sampler.gpu_bytes else None,
    }


def _timeline(chunks: list[dict], t0: float) -> dict[str, float]:
    """Seconds since the job's start `t0` (and waits) from the chunks' timeline columns."""
    generated = [c for c in chunks if c["generate_s"]]
    starts = {id(c): c["generated_at"] - c["generate_s"] for c in generated}
    per_worker: dict[str, list[dict]] = {}
    for c in generated:
        per_worker.setdefault(c["worker"], []).append(c)
    span = sum(max(c["generated_at"] for c in cs) - min(starts[id(c)] for c in cs) for cs in per_worker.values())
    busy = sum(c["generate_s"] for c in generated)
    waits = sorted(starts[id(c)] - c["prepared_at"] for c in generated)
    return {
        "generate_started": max(c["generate_started_at"] for c in generated) - t0,  # the actor's process ran its constructor
        "generate_setup_s": max(c["generate_ready_at"] - c["generate_started_at"] for c in generated),  # models, warm-up
        "prepare_started_first": min(c["prepare_started_at"] for c in chunks) - t0,
        "prepare_ready_first": min(c["prepare_ready_at"] for c in chunks) - t0,
        "prepare_ready_last": max(c["prepare_ready_at"] for c in chunks) - t0,
        "generate_ready": max(c["generate_ready_at"] for c in generated) - t0,
        "first_prepared": min(c["prepared_at"] for c in chunks) - t0,
        "first_on_gpu": min(starts.values()) - t0,
        "last_off_gpu": max(c["generated_at"] for c in generated) - t0,
        "gpu_stage_busy": busy / span,  # the Generate stage's own seconds over its actors' first-to-last spans
        "gpu_idle_s": span - busy,  # between chunks, summed over the GPU actors
        "queue_wait_median_s": waits[len(waits) // 2],  # a chunk's time between Prepare and Generate
    }


def _fmt(x, spec=".1f") -> str:
    return "" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--models", nargs="+", default=["latentsync-1.5-random", "latentsync-1.6-random"])
    parser.add_argument("--deepcache", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--overlap", type=int, default=4, help="frames shared by neighbouring windows (upstream: 0)")
    parser.add_argument("--windows-per-batch", type=int, default=4)
    parser.add_argument("--windows-per-chunk", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net (plain pipeline)")
    parser.add_argument("--cuda-graphs", nargs="+", choices=["on", "off"], default=["on"], help="U-Net steps as CUDA graphs")
    parser.add_argument("--prepare-workers", type=int, default=None, help="plain pipeline: Prepare in N processes (default: run's)")
    parser.add_argument("--compose-device", nargs="+", default=["auto"], help="plain pipeline: where Compose pastes (auto: run's)")
    parser.add_argument("--ray-gpus", type=int, nargs="*", default=[], help="also run the Ray Data job on N GPUs")
    parser.add_argument("--ray-videos-per-gpu", type=int, default=6, help="copies of the video per GPU in the Ray job's catalog")
    parser.add_argument("--prepare-per-gpu", type=int, default=6, help="Prepare actors per GPU in the Ray job")
    parser.add_argument("--ray-chunks-per-prepare", type=int, nargs="+", default=[1], help="Ray job: consecutive chunks per Prepare call")
    parser.add_argument("--ray-prefetch", type=int, nargs="+", default=[1], help="Ray job: Generate calls queued at each GPU actor")
    parser.add_argument("--no-plain", action="store_true", help="only the Ray Data runs")
    parser.add_argument("--peak", type=float, default=989.0, help="dense fp16 TFLOP/s of the GPU (H100/H200 SXM: 989)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--enhance", nargs="+", default=["none"], help="face restoration, in turn (gfpgan-random: v1.4's size)")
    args = parser.parse_args()

    import torch

    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", f"torch {torch.__version__}", flush=True)
    print("| path | model | res | DeepCache | enhance | overlap | windows/chunk | compile | CUDA graphs | prepare workers | frames | e2e fps "
          "| fill / gaps / drain s | prepare fps | generate fps (alone) | compose fps | upstream fps | UNet TFLOP/s | of peak | GPU busy "
          "| peak GPU GiB (allocated / reserved) | peak host GiB |")
    print("|" + "---|" * 22, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for model in args.models:
            for deepcache, graphs, enhance in itertools.product(args.deepcache, args.cuda_graphs, args.enhance):
                cfg = LipSyncConfig(
                    model=model, deepcache=deepcache, enhance=enhance, window_overlap=args.overlap, compile=args.compile,
                    cuda_graphs=graphs == "on", prepare_workers=args.prepare_workers,
                    windows_per_batch=args.windows_per_batch, windows_per_chunk=args.windows_per_chunk, device=args.device,
                )
                res = cfg.preset().resolution
                runs = [] if args.no_plain else [
                    ("plain" + ("" if where == "auto" else f", compose on {where}"), str(cfg.resolved_prepare_workers()),
                     lambda where=where: plain(cfg, args.video, args.audio, out, where))
                    for where in args.compose_device
                ]
                ray_cfg = cfg.model_copy(update={"compile": False})
                for g, run, prefetch in itertools.product(args.ray_gpus, args.ray_chunks_per_prepare, args.ray_prefetch):
                    job = lambda g=g, n=g * args.ray_videos_per_gpu, run=run, prefetch=prefetch: ray_job(  # noqa: E731
                        ray_cfg, args.video, args.audio, out, g, n, args.prepare_per_gpu,
                        chunks_per_prepare=run, generate_prefetch=prefetch,
                    )
                    runs.append((f"ray x{g}", f"{args.prepare_per_gpu * g} x {run} chunks, prefetch {prefetch}", job))
                for path, workers, fn in runs:
                    r = fn()
                    tfl = r.get("unet_tflops")
                    print(
                        f"| {path} | {model} | {res} | {deepcache or 'off'} | {enhance} | {args.overlap} | {args.windows_per_chunk} | {cfg.compile and path.startswith('plain')} | {graphs} "
                        f"| {workers} | {r['frames']} | {r['fps']:.1f} | {r.get('fill_gaps_drain', '')} "
                        f"| {_fmt(r.get('prepare_fps'))} | {_fmt(r.get('generate_fps'))}"
                        + ("" if r.get("generate_alone_fps") is None else f" ({r['generate_alone_fps']:.1f})") + " "
                        f"| {_fmt(r.get('compose_fps'))} | {UPSTREAM_FPS.get((res, deepcache), '')} | {_fmt(tfl, '.0f')} "
                        f"| {_fmt(tfl and tfl / args.peak, '.0%')} | {_fmt(r['busy'], '.0%')} | {_fmt(r['gpu_gib'], '.2f')} / {_fmt(r.get('gpu_reserved_gib'), '.2f')} "
                        f"| {r['host_gib']:.2f} |", flush=True,
                    )
                    if torch.cuda.is_available():  # so the next run's peak GPU memory is its own
                        gc.collect()
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

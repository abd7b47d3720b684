"""`lipsync-ray` command line."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from pydantic import BaseModel

from .config import BatchConfig, LipSyncConfig

app = typer.Typer(
    help="Lip-sync talking-head video to new audio with LatentSync, on one machine or a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
)

def _help(name: str, model: type[BaseModel] = LipSyncConfig) -> str:
    """A config field's description as option help."""
    return f"{model.model_fields[name].description}."


def _default(name: str, model: type[BaseModel] = LipSyncConfig):
    """A config field's default as an option default (pairs and lists as comma-separated text, a nested config as
    its JSON)."""
    field = model.model_fields[name]
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return ",".join("" if v is None else str(v) for v in value) if isinstance(value, tuple) else value


# Model and generation options shared by every command; each is the LipSyncConfig field of the same name, which
# holds its help and default.
Model = Annotated[str, typer.Option(help=_help("model"))]
Resolution = Annotated[Optional[int], typer.Option(help=_help("resolution"))]
Steps = Annotated[int, typer.Option(help=_help("steps"))]
Guidance = Annotated[float, typer.Option(help=_help("guidance"))]
Seed = Annotated[int, typer.Option(help=_help("seed"))]
Scheduler = Annotated[str, typer.Option(help=_help("scheduler"))]
DeepCacheOpt = Annotated[int, typer.Option("--deepcache", help=_help("deepcache"))]
Face = Annotated[str, typer.Option(help=_help("face"))]
OnNoFace = Annotated[str, typer.Option(help=_help("on_no_face"))]
Detector = Annotated[str, typer.Option(help=_help("detector"))]
AudioMode = Annotated[str, typer.Option(help=_help("audio_mode"))]
Checkpoints = Annotated[Optional[Path], typer.Option(help=_help("checkpoints"))]
Device = Annotated[str, typer.Option(help=_help("device"))]
WindowsPerChunk = Annotated[int, typer.Option(help=_help("windows_per_chunk"))]
Enhance = Annotated[str, typer.Option(help=_help("enhance"))]
EnhanceStrength = Annotated[float, typer.Option(help=_help("enhance_strength"))]
ScoreModel = Annotated[str, typer.Option(help=_help("score_model"))]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help=_help("compile"))]
CudaGraphs = Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help=_help("cuda_graphs"))]
PrepareWorkers = Annotated[Optional[int], typer.Option(help=_help("prepare_workers"))]
Length = Annotated[str, typer.Option(help=_help("length"))]
Crf = Annotated[int, typer.Option(help=_help("crf"))]
Preset = Annotated[str, typer.Option("--preset", help=_help("x264_preset"))]
OPTION_NAMES = {"x264_preset": "preset"}  # config fields whose option has another name


def make_config(**options):
    """LipSyncConfig from command options; a bad value exits 2 with the option's name."""
    from pydantic import ValidationError

    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v is not None}
    try:
        cfg = LipSyncConfig(**options)
    except ValidationError as err:
        first = err.errors()[0]
        name = "-".join(OPTION_NAMES.get(str(part), str(part)) for part in first["loc"])
        typer.echo(f"error: --{name.replace('_', '-')}: {first['msg']}", err=True)
        raise typer.Exit(2)
    if cfg.preset().random_weights:
        typer.echo(f"warning: {cfg.model} has random weights and produces meaningless mouths", err=True)
    from .stages import MissingWeights, check_weights

    try:
        check_weights(cfg)  # an optional model (--enhance, --face speaker) without its weights: before any video work
    except MissingWeights as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    return cfg


def _run_one(cfg, video: Path, audio: Path, output: Path) -> None:
    from rich.progress import Progress

    from .media import MediaError
    from .pipeline import LipSyncPipeline

    try:
        with LipSyncPipeline(cfg) as pipeline, Progress(transient=True) as bar:
            task = bar.add_task("lip-syncing", total=None)
            result = pipeline.run(
                video, audio, output,
                progress=lambda n: bar.advance(task, n), on_plan=lambda total: bar.update(task, total=total),
            )
    except (MediaError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(
        f"{result.output}: {result.frames} frames in {result.seconds:.1f} s ({result.fps:.1f} frames/s)"
        + (f", {result.faceless_frames} without a face passed through" if result.faceless_frames else "")
    )


@app.callback()
def main() -> None:
    """lipsync-ray: LatentSync lip-sync at cluster scale."""


@app.command()
def run(
    video: Annotated[Path, typer.Argument(help="Talking-head video (any container, fps and resolution).")],
    audio: Annotated[Path, typer.Argument(help="Target speech (any audio or video file; converted to 16 kHz mono).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .mp4 (H.264 + AAC); written atomically.")],
    model: Model = _default("model"),
    resolution: Resolution = _default("resolution"),
    steps: Steps = _default("steps"),
    guidance: Guidance = _default("guidance"),
    seed: Seed = _default("seed"),
    scheduler: Scheduler = _default("scheduler"),
    deepcache: DeepCacheOpt = _default("deepcache"),
    face: Face = _default("face"),
    on_no_face: OnNoFace = _default("on_no_face"),
    length: Length = _default("length"),
    crf: Crf = _default("crf"),
    x264_preset: Preset = _default("x264_preset"),
    detector: Detector = _default("detector"),
    audio_mode: AudioMode = _default("audio_mode"),
    checkpoints: Checkpoints = _default("checkpoints"),
    device: Device = _default("device"),
    windows_per_chunk: WindowsPerChunk = _default("windows_per_chunk"),
    compile: Compile = _default("compile"),
    cuda_graphs: CudaGraphs = _default("cuda_graphs"),
    prepare_workers: PrepareWorkers = _default("prepare_workers"),
    enhance: Enhance = _default("enhance"),
    enhance_strength: EnhanceStrength = _default("enhance_strength"),
    score_model: ScoreModel = _default("score_model"),
) -> None:
    """Lip-sync VIDEO to AUDIO and write OUTPUT at 25 fps, as long as the audio (the video ping-pongs or is cut;
    see --length).

    Exit codes: 0 ok, 2 bad input, bad option or missing weights.
    """
    options = dict(locals())
    del options["video"], options["audio"], options["output"]
    _run_one(make_config(**options), video, audio, output)


def _pair(text: str, option: str) -> tuple[int, int | None]:
    """MIN,MAX; MIN, (no MAX) for no upper bound."""
    try:
        low, high = text.split(",")
        return int(low), int(high) if high.strip() else None
    except ValueError:
        typer.echo(f"error: {option}: expected MIN,MAX or MIN, got {text!r}", err=True)
        raise typer.Exit(2) from None


def _json_object(text: str | None, option: str) -> dict:
    import json

    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        value = err
    if not isinstance(value, dict):
        typer.echo(f"error: {option}: expected a JSON object, got {text!r}", err=True)
        raise typer.Exit(2)
    return value


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address` or $RAY_ADDRESS; without either, start Ray embedded on this machine."""
    import os

    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps a local cluster on 127.0.0.1
        # at least 4 logical CPUs, so the CPU stages, the GPU stage and composing all get a slot on small machines
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1))


@contextmanager
def _interruptible():
    """Ctrl-C and SIGTERM (what Kubernetes and `ray job stop` send) raise KeyboardInterrupt in the main thread, and the
    signal's number is kept in the list yielded. Set once Ray is connected: its native handler would otherwise abort
    on SIGTERM with a stack dump."""
    import signal

    stopped = [signal.SIGINT]

    def interrupt(signum, _frame):
        stopped[0] = signum
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command()
def batch(
    catalog: Annotated[str, typer.Option(help="Catalog URL (.parquet, .csv or .jsonl): columns video, audio (and optionally id, output, per-row options).")],
    output: Annotated[str, typer.Option(help="Output prefix URL: <id>.mp4 files and manifest.parquet.")],
    model: Model = _default("model"),
    resolution: Resolution = _default("resolution"),
    steps: Steps = _default("steps"),
    guidance: Guidance = _default("guidance"),
    seed: Seed = _default("seed"),
    scheduler: Scheduler = _default("scheduler"),
    deepcache: DeepCacheOpt = _default("deepcache"),
    face: Face = _default("face"),
    on_no_face: OnNoFace = _default("on_no_face"),
    length: Length = _default("length"),
    crf: Crf = _default("crf"),
    x264_preset: Preset = _default("x264_preset"),
    detector: Detector = _default("detector"),
    audio_mode: AudioMode = _default("audio_mode"),
    checkpoints: Checkpoints = _default("checkpoints"),
    windows_per_chunk: WindowsPerChunk = _default("windows_per_chunk"),
    compile: Compile = _default("compile"),
    cuda_graphs: CudaGraphs = _default("cuda_graphs"),
    enhance: Enhance = _default("enhance"),
    enhance_strength: EnhanceStrength = _default("enhance_strength"),
    score_model: ScoreModel = _default("score_model"),
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="Generate actors take a GPU each (default: if the cluster has GPUs now; pass --gpu on autoscaling clusters that start without).")] = None,
    prepare_actors: Annotated[str, typer.Option(help=_help("prepare_actors", BatchConfig))] = _default("prepare_actors", BatchConfig),
    generate_actors: Annotated[str, typer.Option(help=_help("generate_actors", BatchConfig))] = _default("generate_actors", BatchConfig),
    chunks_per_batch: Annotated[int, typer.Option(help=_help("chunks_per_batch", BatchConfig))] = _default("chunks_per_batch", BatchConfig),
    chunks_per_prepare: Annotated[int, typer.Option(help=_help("chunks_per_prepare", BatchConfig))] = _default("chunks_per_prepare", BatchConfig),
    generate_prefetch: Annotated[int, typer.Option(help=_help("generate_prefetch", BatchConfig))] = _default("generate_prefetch", BatchConfig),
    score: Annotated[bool, typer.Option("--score/--no-score", help=_help("score", BatchConfig))] = _default("score", BatchConfig),
    min_confidence: Annotated[Optional[float], typer.Option(help=_help("min_confidence", BatchConfig))] = _default("min_confidence", BatchConfig),
    inputs: Annotated[str, typer.Option(help=_help("inputs", BatchConfig) + " JSON; the fields given replace these.")] = _default("inputs", BatchConfig),
    output_prefixes: Annotated[str, typer.Option(help=_help("output_prefixes", BatchConfig) + " Comma-separated.")] = _default("output_prefixes", BatchConfig),
    storage_options: Annotated[Optional[str], typer.Option(help="fsspec storage options as JSON (default: from the environment).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")] = None,
) -> None:
    """Lip-sync every row of a video catalog on a Ray cluster, writing outputs and a manifest under OUTPUT.

    Reruns skip videos whose output exists and reuse finished chunks. Exit codes: 0 all videos ok or skipped,
    1 some failed (see the manifest), 2 bad catalog, bad options or missing weights, 3 none failed but some are
    low_sync (below --min-confidence), 130 or 143 stopped by Ctrl-C or SIGTERM (rerun to resume).
    """
    options = dict(locals())
    import json

    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from .batch import run_batch
    from .catalog import CatalogError

    job_keys = ("catalog", "output", "gpu", "chunks_per_batch", "chunks_per_prepare", "generate_prefetch", "score", "min_confidence")
    job_options = {
        k: options.pop(k)
        for k in (*job_keys, "prepare_actors", "generate_actors", "storage_options", "address", "inputs", "output_prefixes")
    }
    cfg = make_config(**options)
    try:
        job = BatchConfig(
            pipeline=cfg, **{k: job_options[k] for k in job_keys},
            prepare_actors=_pair(prepare_actors, "--prepare-actors"), generate_actors=_pair(generate_actors, "--generate-actors"),
            storage_options=_json_object(job_options["storage_options"], "--storage-options"),
            inputs={**json.loads(_default("inputs", BatchConfig)), **_json_object(job_options["inputs"], "--inputs")},
            output_prefixes=tuple(p for p in job_options["output_prefixes"].split(",") if p),
        )
    except ValidationError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    connect_ray(address)
    console = Console(stderr=True)
    try:
        with _interruptible() as stopped:
            manifest = run_batch(job, on_video=lambda m: console.print(f"{m.status:8} {m.id}  {m.error or m.output}"))
    except (CatalogError, FileNotFoundError) as err:  # a bad catalog, or an optional model's missing weights
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished videos and staged chunks are kept; the same command resumes", err=True)
        raise typer.Exit(128 + stopped[0])
    table = Table("id", "status", "frames", "seconds", "output / error")
    for m in manifest:
        table.add_row(m.id, m.status, str(m.frames), f"{m.prepare_s + m.generate_s + m.compose_s + m.score_s:.1f}", m.error or m.output)
    Console().print(table)
    counts = {s: sum(m.status == s for m in manifest) for s in ("ok", "low_sync", "skipped", "failed")}
    low = f", {counts['low_sync']} low_sync" if job.min_confidence is not None else ""
    typer.echo(f"{len(manifest)} videos: {counts['ok']} ok{low}, {counts['skipped']} skipped, {counts['failed']} failed; manifest {job.manifest_url}")
    if counts["failed"] or counts["low_sync"]:
        raise typer.Exit(1 if counts["failed"] else 3)


DRAIN_S = 15  # on SIGTERM, within Kubernetes' default 30 s grace period with the time Serve takes to stop


@app.command()
def serve(
    model: Model = _default("model"),
    resolution: Resolution = _default("resolution"),
    steps: Steps = _default("steps"),
    detector: Detector = _default("detector"),
    checkpoints: Checkpoints = _default("checkpoints"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="Generate replicas take a GPU each (default: if this machine has one).")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Require this X-API-Key header (default: $LIPSYNC_API_KEY, else open).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")] = None,
) -> None:
    """Serve the HTTP API (POST /v1/lipsync, /v1/jobs; docs at /docs) until Ctrl-C or SIGTERM."""
    options = dict(locals())
    import os
    import signal
    import threading

    import ray
    from ray import serve as ray_serve

    from .config import ServeConfig
    from .serve import PROXY_CALLBACK_ENV, build_app

    server = {k: options.pop(k) for k in ("host", "port", "gpu", "api_key", "address")}
    cfg = make_config(**options)
    if server["gpu"] is None:
        import torch

        server["gpu"] = torch.cuda.is_available()
    os.environ.setdefault(*PROXY_CALLBACK_ENV)  # a Ray started here passes it on to Serve's proxy
    connect_ray(server["address"])
    config = ServeConfig(pipeline=cfg, gpu=server["gpu"], api_key=server["api_key"])
    ray_serve.start(http_options={"host": host, "port": port})
    ingress = ray_serve.run(build_app(config.model_dump()), name="lipsync", route_prefix="/", blocking=False)
    stop = threading.Event()  # after Serve started: Ray's native handlers would otherwise abort on SIGTERM
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(f"lipsync-ray serving on http://{host}:{port} (docs at /docs); Ctrl-C stops")
    stop.wait()
    typer.echo(f"stopping: the requests in flight get up to {DRAIN_S} s")
    try:
        ingress.drain.remote(DRAIN_S).result(timeout_s=DRAIN_S + 5)
    except Exception:  # noqa: BLE001 - an ingress that cannot drain is stopped all the same
        pass
    ray_serve.shutdown()
    ray.shutdown()


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.")] = Path("demo.mp4"),
    version: Annotated[str, typer.Option("--version", "-v", help="LatentSync version: 1.5 or 1.6.")] = "1.6",
    checkpoints: Checkpoints = _default("checkpoints"),
    device: Device = _default("device"),
) -> None:
    """Lip-sync the bundled 3 s sample. Uses the real LatentSync checkpoints when present or downloadable,
    otherwise tiny-random (random weights: the mouth moves, but is not meaningful)."""
    from importlib import resources

    from .models.download import DownloadError, download as fetch

    model = f"latentsync-{version}"
    try:
        fetch(version, checkpoints)
    except (DownloadError, ValueError) as err:
        typer.echo(f"warning: real checkpoints unavailable ({str(err).split('. ')[0]}); using tiny-random", err=True)
        model = "tiny-random"
    sample = resources.files("lipsync_ray").joinpath("data/demo")
    cfg = make_config(
        model=model, checkpoints=checkpoints, device=device, detector="auto" if model != "tiny-random" else "offline",
        steps=20 if model != "tiny-random" else 4,
    )
    _run_one(cfg, Path(str(sample / "video.mp4")), Path(str(sample / "audio.m4a")), output)


@app.command()
def download(
    version: Annotated[str, typer.Option("--version", "-v", help="LatentSync version: 1.5 (256 px) or 1.6 (512 px).")] = "1.6",
    root: Annotated[Optional[Path], typer.Option(help="Checkpoints folder (default: ./checkpoints or $LIPSYNC_CHECKPOINTS).")] = None,
    enhance: Annotated[bool, typer.Option("--enhance", help="Also fetch GFPGAN v1.4 (GFPGANv1.4.pth, for face restoration).")] = False,
    eval_model: Annotated[bool, typer.Option("--eval", help="Also fetch SyncNet v2 (syncnet_v2.model, the lip-sync scorer of `eval`).")] = False,
) -> None:
    """Download the published LatentSync checkpoints, whisper tiny, the VAE and insightface buffalo_l."""
    from .models.download import DownloadError, download as fetch, download_enhance, download_syncnet

    try:
        if enhance:
            typer.echo(f"GFPGAN v1.4 ready at {download_enhance(root)}")
        if eval_model:
            typer.echo(f"SyncNet v2 ready at {download_syncnet(root)}")
        files = fetch(version, root)
    except (DownloadError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(f"LatentSync {version}: {len(files)} files ready under {files[0].parents[1] if files else root}")


@app.command("eval")
def eval_(
    video: Annotated[Path, typer.Argument(help="A lip-synced video, or a folder of them (each scored against its own audio).")],
    audio: Annotated[Optional[Path], typer.Argument(help="Audio to score against (default: the video's own track).")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="The original video (for a folder: a folder of originals of the same names): adds PSNR / SSIM outside the pasted face and the flicker at chunk seams.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the scores as JSON (for one video with the per-frame confidence).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of the per-frame confidence with chunk seams marked (for a folder: a folder of PNGs).")] = None,
    parquet: Annotated[Optional[Path], typer.Option(help="Write the scores as a Parquet table, a row per video.")] = None,
    model: Annotated[str, typer.Option(help="syncnet-v2 (published weights: `lipsync-ray download --eval`) or tiny-random (random weights, for tests).")] = "syncnet-v2",
    detector: Detector = _default("detector"),
    checkpoints: Checkpoints = _default("checkpoints"),
    device: Device = _default("device"),
    windows_per_chunk: Annotated[int, typer.Option(help="The run's --windows-per-chunk: where its chunk seams lie.")] = _default("windows_per_chunk"),
    window_overlap: Annotated[int, typer.Option(help="The run's window overlap: how many frames each chunk seam crossfades.")] = _default("window_overlap"),
) -> None:
    """Score lip sync with SyncNet: LSE-D (lower is better), LSE-C (higher is better) and the AV offset in frames,
    the numbers of the LatentSync and Wav2Lip papers.

    Exit codes: 0 ok, 1 some videos of a folder failed, 2 bad input or missing weights.
    """
    options = dict(locals())
    from .eval import run_eval

    raise typer.Exit(run_eval(**options))


if __name__ == "__main__":
    sys.exit(app())

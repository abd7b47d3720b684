"""`lipsync-ray` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Lip-sync talking-head video to new audio with LatentSync, on one machine or a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """lipsync-ray: LatentSync lip-sync at cluster scale."""


@app.command()
def run(
    video: Path = typer.Argument(..., help="Talking-head video (any container, fps and resolution)."),
    audio: Path = typer.Argument(..., help="Target speech (any audio or video file; converted to 16 kHz mono)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .mp4 (H.264 + AAC); written atomically."),
    model: str = typer.Option("latentsync-1.6", help="latentsync-1.5 (256 px), latentsync-1.6 (512 px) or tiny-random."),
    steps: int = typer.Option(20, help="Denoising steps."),
    guidance: float = typer.Option(1.5, help="Classifier-free guidance scale (1 = off)."),
    seed: int = typer.Option(1247, help="Seed of the initial noise."),
    scheduler: str = typer.Option("ddim", help="ddim (upstream) or dpm++."),
    face: str = typer.Option("largest", help="Face to follow: largest, or its size rank (0 = largest)."),
    on_no_face: str = typer.Option("error", help="A video with no face at all: error, or passthrough (keep it)."),
    detector: str = typer.Option("auto", help="auto (insightface when present, else offline), insightface, offline."),
    audio_mode: str = typer.Option("seamless", help="seamless, or upstream (hard 30 s Whisper windows)."),
    checkpoints: Optional[Path] = typer.Option(None, help="Checkpoints folder [default: ./checkpoints]."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """Lip-sync VIDEO to AUDIO and write OUTPUT. Exit codes: 0 ok, 2 bad input or missing weights."""
    from pydantic import ValidationError

    from .config import LipSyncConfig
    from .media import MediaError

    try:
        cfg = LipSyncConfig(
            model=model, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler, face=face,
            on_no_face=on_no_face, detector=detector, audio_mode=audio_mode,
            checkpoints=str(checkpoints) if checkpoints else None, device=device,
        )
    except ValidationError as err:
        typer.echo(f"error: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}", err=True)
        raise typer.Exit(2)
    if cfg.model == "tiny-random":
        typer.echo("warning: tiny-random has random weights and produces meaningless mouths", err=True)
    from rich.progress import Progress

    from .pipeline import LipSyncPipeline

    try:
        pipeline = LipSyncPipeline(cfg)
        with Progress(transient=True) as bar:
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


@app.command()
def download(
    version: str = typer.Option("1.6", "--version", "-v", help="LatentSync version: 1.5 (256 px) or 1.6 (512 px)."),
    root: Optional[Path] = typer.Option(None, help="Checkpoints folder [default: ./checkpoints or $LIPSYNC_CHECKPOINTS]."),
) -> None:
    """Download the published LatentSync checkpoints, whisper tiny, the VAE and insightface buffalo_l."""
    from .models.download import DownloadError, download as fetch

    try:
        files = fetch(version, root)
    except (DownloadError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(f"LatentSync {version}: {len(files)} files ready under {files[0].parents[1] if files else root}")


if __name__ == "__main__":
    sys.exit(app())

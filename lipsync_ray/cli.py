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

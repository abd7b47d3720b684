"""Fetch the published weights into the checkpoints layout (see presets.py and checkpoints/README.md).

Sources: the LatentSync U-Net and whisper tiny from the Hugging Face Hub (ByteDance/LatentSync-1.5 / -1.6), the
VAE from stabilityai/sd-vae-ft-mse, insightface buffalo_l from insightface's own model zoo, GFPGAN v1.4 (face
restoration, `download_enhance`) from its GitHub release, SyncNet v2 (lip-sync scoring, `download_syncnet`) from
its authors' site. Without network access it fails within seconds, naming every missing file and how to provide it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .gfpgan import GFPGAN_URL, gfpgan_path, read_gfpgan_checkpoint
from .presets import PRESETS, checkpoints_root
from .syncnet import check_syncnet_file, syncnet_path

VAE_REPO = "stabilityai/sd-vae-ft-mse"
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
INSIGHTFACE_ZOO = "https://github.com/deepinsight/insightface/releases/download/model-zoo/buffalo_l.zip"
SYNCNET_URL = "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"  # syncnet_python's download_model.sh


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Remote:
    """Where a checkpoint file comes from: a Hub repo file (downloaded into local_dir), or insightface's zoo."""

    repo_id: str | None
    filename: str
    local_dir: Path

    def __str__(self) -> str:
        return f"hf://{self.repo_id}/{self.filename}" if self.repo_id else INSIGHTFACE_ZOO


def required_files(version: str, root: Path) -> dict[Path, Remote]:
    """Each file the version needs -> where it comes from."""
    preset = PRESETS[f"latentsync-{version}"]
    unet = preset.unet_path(root)
    files = {
        unet: Remote(preset.hf_repo, "latentsync_unet.pt", unet.parent),
        root / "whisper" / "tiny.pt": Remote(preset.hf_repo, "whisper/tiny.pt", root),
    }
    files.update({root / "sd-vae-ft-mse" / f: Remote(VAE_REPO, f, root / "sd-vae-ft-mse") for f in VAE_FILES})
    zoo = root / "insightface"
    files.update({zoo / "models" / "buffalo_l" / f: Remote(None, f, zoo) for f in ("det_10g.onnx", "2d106det.onnx")})
    return files


def missing_files(version: str, root: str | Path | None = None) -> dict[Path, Remote]:
    return {p: src for p, src in required_files(version, checkpoints_root(root)).items() if not p.is_file()}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parts = urlparse(url)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def download(version: str, root: str | Path | None = None) -> list[Path]:
    """Download what is missing for LatentSync `version` ("1.5" or "1.6"); returns the files now present."""
    if f"latentsync-{version}" not in PRESETS:
        raise ValueError(f"unknown LatentSync version {version!r}: 1.5 or 1.6")
    root = checkpoints_root(root)
    missing = missing_files(version, root)
    if not missing:
        return sorted(required_files(version, root))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    needs_hub = any(r.repo_id for r in missing.values())
    needs_zoo = any(not r.repo_id for r in missing.values())
    unreachable = [u for u, need in [(endpoint, needs_hub), (INSIGHTFACE_ZOO, needs_zoo)] if need and not _reachable(u)]
    if unreachable:
        listing = "\n".join(f"  {p}  <-  {src}" for p, src in sorted(missing.items()))
        raise DownloadError(
            f"cannot reach {', '.join(urlparse(u).hostname or u for u in unreachable)} to fetch LatentSync {version}. "
            f"Missing files:\n{listing}\n"
            f"Copy them into {root} from a machine with access (same layout), or set HF_ENDPOINT to a mirror. "
            "Without them, use `--model tiny-random` (random weights, meaningless mouths)."
        )

    from huggingface_hub import hf_hub_download

    for remote in {r for r in missing.values() if r.repo_id}:
        hf_hub_download(remote.repo_id, remote.filename, local_dir=remote.local_dir)
    if needs_zoo:
        from insightface.utils.storage import ensure_available

        ensure_available("models", "buffalo_l", root=str(root / "insightface"))
    still = missing_files(version, root)
    if still:
        raise DownloadError("download finished but files are still missing: " + ", ".join(map(str, still)))
    return sorted(required_files(version, root))


def download_enhance(root: str | Path | None = None) -> Path:
    """Download GFPGANv1.4.pth (face restoration) unless present; it must read as a GFPGAN checkpoint, so an
    error page never lands in the checkpoints folder."""
    return fetch_file(GFPGAN_URL, gfpgan_path(root), "GFPGAN v1.4", read_gfpgan_checkpoint,
                      "Without it, leave face restoration off.")


def download_syncnet(root: str | Path | None = None) -> Path:
    """Download syncnet_v2.model (the lip-sync scorer of `lipsync-ray eval`) unless present; it must load
    strictly, so an error page never lands in the checkpoints folder."""
    return fetch_file(SYNCNET_URL, syncnet_path(root), "SyncNet v2", check_syncnet_file,
                      "Without it, `lipsync-ray eval --model tiny-random` runs (random weights, meaningless scores).")


def fetch_file(url: str, path: Path, what: str, check: Callable[[Path], None] | None = None, hint: str = "") -> Path:
    """Download `url` to `path` unless present, through a `.part` file that `check` (raising RuntimeError or
    ValueError) accepts first; returns the path. Offline: a DownloadError within seconds naming both."""
    if path.is_file():
        return path
    where = f"Download {url} on a machine with access and put it at {path}.{' ' + hint if hint else ''}"
    if not _reachable(url):
        raise DownloadError(f"cannot reach {urlparse(url).hostname} to fetch {what}. {where}")
    import requests

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with requests.get(url, stream=True, timeout=30) as response:
            response.raise_for_status()
            with partial.open("wb") as out:
                for block in response.iter_content(1 << 20):
                    out.write(block)
        if check is not None:
            check(partial)
    except (requests.RequestException, RuntimeError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"fetching {what} failed ({err}). {where}") from err
    partial.replace(path)
    return path

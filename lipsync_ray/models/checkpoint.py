"""Where checkpoints live, and strict loading of published LatentSync U-Net checkpoints (`latentsync_unet.pt`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def checkpoints_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("LIPSYNC_CHECKPOINTS", "checkpoints"))


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model built from the config."""


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_unet_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """Return (state_dict, global_step) from an upstream checkpoint file or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"U-Net checkpoint not found: {path} (run `lipsync-ray download`)")
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(blob, dict) and "state_dict" in blob:
        state, step = blob["state_dict"], blob.get("global_step")
    else:
        state, step = blob, None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(state).__name__}")
    # checkpoints saved from DistributedDataParallel carry a `module.` prefix
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, step


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load with no missing, unexpected or mis-shaped key; the error names every offending key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_summarise(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} with wrong shape: {_summarise(mis_shaped)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=any(p.is_meta for p in model.parameters()))


def load_unet_state_dict(model: nn.Module, path: str | Path) -> int | None:
    state, step = read_unet_checkpoint(path)
    load_state_dict_strict(model, state, str(path))
    return step

"""Per-video-frame audio conditioning from the Whisper encoder, computed the LatentSync way.

Upstream: log-mel over the whole clip, encoder run on hard 30 s windows, the stacked hidden states
[after conv + positional embedding, after each block] (no ln_post) kept at 50 rows/s, and for output frame i
(25 fps) rows clamp(2i-4 .. 2i+5) flattened time-major, layer-minor: (10 * (layers + 1), C) = (50, 384) for tiny.

The hard windows make features jump at every 30 s boundary, which shows as a glitch in long videos.
`mode="seamless"` (the default for new runs) encodes overlapping windows that end on the clip's end and
crossfades them, so every row is computed with context on both sides and no boundary is hard;
`mode="upstream"` reproduces upstream exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import whisper
from whisper.model import AudioEncoder, ModelDimensions

from ..models.checkpoint import load_state_dict_strict

SAMPLE_RATE = 16_000
MEL_PER_SECOND = 100
ROWS_PER_SECOND = 50
WINDOW_MEL = 3000  # whisper's 30 s input
FPS = 25
CONTEXT_ROWS = (2, 2)  # upstream audio_feat_length: frames of context before / after

AudioMode = Literal["seamless", "upstream"]


class WhisperFeatureEncoder(torch.nn.Module):
    """openai-whisper's audio encoder, returning every layer's hidden states."""

    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)

    @classmethod
    def from_checkpoint(cls, path_or_blob: str | Path | dict) -> "WhisperFeatureEncoder":
        """Load an openai-format checkpoint ({"dims", "model_state_dict"}, e.g. checkpoints/whisper/tiny.pt)."""
        if isinstance(path_or_blob, dict):
            blob, source = path_or_blob, "whisper checkpoint"
        else:
            path = Path(path_or_blob)
            if not path.is_file():
                raise FileNotFoundError(f"whisper checkpoint not found: {path} (run `lipsync-ray download`)")
            blob, source = torch.load(path, map_location="cpu", weights_only=True), str(path)
        model = cls(ModelDimensions(**blob["dims"]))
        encoder_state = {k.removeprefix("encoder."): v for k, v in blob["model_state_dict"].items() if k.startswith("encoder.")}
        load_state_dict_strict(model.encoder, encoder_state, f"{source} (encoder)")
        return model.eval()

    @property
    def layers(self) -> int:
        return self.dims.n_audio_layer + 1

    @torch.no_grad()
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, 3000) -> hidden states (B, 1500, layers + 1, C)."""
        enc = self.encoder
        x = torch.nn.functional.gelu(enc.conv1(mel))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.positional_embedding[: x.shape[1]].to(x.dtype)
        states = [x]
        for block in enc.blocks:
            x = block(x)
            states.append(x)
        return torch.stack(states, dim=2)


def log_mel(waveform: np.ndarray | torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper log-mel of the whole clip with no padding (normalised over the whole clip, as upstream)."""
    audio = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    if audio.ndim != 1 or audio.numel() < 400:
        raise ValueError(f"audio must be mono 16 kHz with at least 400 samples, got shape {tuple(audio.shape)}")
    return whisper.log_mel_spectrogram(audio, n_mels, padding=0)


def _encode_windows(encoder: WhisperFeatureEncoder, mel: torch.Tensor, starts: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Encode the 30 s windows starting at `starts` (mel frames) in one batch; returns states and valid rows."""
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    windows, valid = [], []
    for s in starts:
        w = mel[:, s : s + WINDOW_MEL]
        valid.append(w.shape[1] // 2)
        windows.append(torch.nn.functional.pad(w, (0, WINDOW_MEL - w.shape[1])))
    batch = torch.stack(windows).to(device=device, dtype=dtype)
    return encoder(batch).float().cpu(), valid


def feature_array(encoder: WhisperFeatureEncoder, waveform, mode: AudioMode = "seamless") -> torch.Tensor:
    """Whisper hidden states at 50 rows/s over the whole clip: (N, layers + 1, C), N = mel frames // 2."""
    mel = log_mel(waveform, encoder.dims.n_mels)
    total = mel.shape[1]
    if mode == "upstream" or total <= WINDOW_MEL:
        starts = list(range(0, total, WINDOW_MEL))
        states, valid = _encode_windows(encoder, mel, starts)
        return torch.cat([s[:v] for s, v in zip(states, valid)])
    if mode != "seamless":
        raise ValueError(f"unknown audio feature mode {mode!r} (seamless or upstream)")
    return _seamless(encoder, mel)


# Seamless windows: 30 s long, a new one every 20 s, the last one aligned to the clip's end; neighbours are
# crossfaded over RAMP rows (5 s) inside their overlap, so no row comes from near a window's inner edge.
HOP_MEL = 2000
RAMP_ROWS = 250


def _seamless(encoder: WhisperFeatureEncoder, mel: torch.Tensor) -> torch.Tensor:
    total = mel.shape[1]
    last = total - WINDOW_MEL
    starts = list(range(0, last, HOP_MEL)) + [last]
    states, _ = _encode_windows(encoder, mel, starts)
    rows = total // 2
    acc = torch.zeros(rows, *states.shape[2:])
    weight_sum = torch.zeros(rows)
    for k, (s, st) in enumerate(zip(starts, states)):
        a, n = s // 2, WINDOW_MEL // 2
        r = torch.arange(n, dtype=torch.float32) + 0.5
        w = torch.ones(n)
        if k > 0:
            w = torch.minimum(w, r / RAMP_ROWS)
        if k < len(starts) - 1:
            w = torch.minimum(w, (n - r) / RAMP_ROWS)
        n = min(n, rows - a)
        acc[a : a + n] += st[:n] * w[:n, None, None]
        weight_sum[a : a + n] += w[:n]
    return acc / weight_sum[:, None, None]


def upstream_num_frames(rows: int) -> int:
    """Upstream's chunk count at 25 fps: its loop overshoots the audio by two frames."""
    return rows // 2 + 2


def audio_frames(rows: int) -> int:
    """Video frames (25 fps) that the audio actually covers."""
    return rows // 2


def frame_indices(num_frames: int, rows: int) -> torch.Tensor:
    """Feature rows used by each video frame: (num_frames, 10), clamped to the clip."""
    before, after = CONTEXT_ROWS
    step = ROWS_PER_SECOND // FPS
    centre = torch.arange(num_frames)[:, None] * step
    offsets = torch.arange(-before * step, (after + 1) * step)[None, :]
    return (centre + offsets).clamp(0, rows - 1)


def frame_features(features: torch.Tensor, frames: torch.Tensor | range | list[int]) -> torch.Tensor:
    """Per-frame conditioning for the given 25 fps frame numbers: (len(frames), 10 * layers, C)."""
    frames = torch.as_tensor(list(frames) if not torch.is_tensor(frames) else frames)
    idx = frame_indices(int(frames.max()) + 1 if len(frames) else 0, features.shape[0])[frames]
    picked = features[idx]  # (F, 10, layers, C)
    return picked.reshape(picked.shape[0], -1, picked.shape[-1])

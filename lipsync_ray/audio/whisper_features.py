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
from ..plan import FPS

SAMPLE_RATE = 16_000
MEL_PER_SECOND = 100
ROWS_PER_SECOND = 50
WINDOW_MEL = 3000  # whisper's 30 s input
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


HOP = 160  # samples per mel frame
N_FFT = 400


def _log10_mel(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Whisper's log10 mel power before its clip-wide normalisation: (n_mels, len(audio) // 160)."""
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    mel = whisper.audio.mel_filters(audio.device, n_mels) @ stft[..., :-1].abs() ** 2
    return mel.clamp(min=1e-10).log10()


def _as_audio(waveform) -> torch.Tensor:
    audio = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    if audio.ndim != 1 or audio.numel() < N_FFT:
        raise ValueError(f"audio must be mono 16 kHz with at least {N_FFT} samples, got shape {tuple(audio.shape)}")
    return audio


def mel_ceiling(waveform, n_mels: int = 80) -> float:
    """The clip-wide maximum of the log10 mel, which whisper's normalisation is relative to."""
    return float(_log10_mel(_as_audio(waveform), n_mels).max())


def log_mel(waveform, n_mels: int = 80, frames: range | None = None, ceiling: float | None = None) -> torch.Tensor:
    """Whisper log-mel (no padding), normalised over the whole clip as upstream, for mel `frames` only.

    Only the audio around `frames` is transformed (with a margin wider than the FFT), so a chunk's mel equals the
    same frames of the whole clip's mel once `ceiling` (see `mel_ceiling`) is shared.
    """
    audio = _as_audio(waveform)
    total = audio.numel() // HOP
    frames = frames or range(total)
    if ceiling is None:
        ceiling = mel_ceiling(audio, n_mels)
    margin = 3  # frames; 3 * 160 samples > n_fft / 2, so edge padding never reaches the kept frames
    first = max(0, frames.start - margin)
    last = min(total, frames.stop + margin)
    piece = audio[first * HOP : audio.numel() if last == total else last * HOP]
    log = _log10_mel(piece, n_mels)[:, frames.start - first : frames.stop - first]
    return (torch.maximum(log, torch.tensor(ceiling - 8.0)) + 4.0) / 4.0


def _window_starts(total_mel: int, mode: AudioMode) -> list[int]:
    """Mel-frame starts of the encoder's 30 s windows over the whole clip (a global grid every chunk shares)."""
    if mode == "upstream" or total_mel <= WINDOW_MEL:
        return list(range(0, total_mel, WINDOW_MEL))
    if mode != "seamless":
        raise ValueError(f"unknown audio feature mode {mode!r} (seamless or upstream)")
    last = total_mel - WINDOW_MEL
    return list(range(0, last, HOP_MEL)) + [last]


# Seamless windows: 30 s long, a new one every 20 s, the last one aligned to the clip's end; neighbours are
# crossfaded over RAMP rows (5 s) inside their overlap, so no row comes from near a window's inner edge.
HOP_MEL = 2000
RAMP_ROWS = 250


def _window_weights(k: int, count: int, mode: AudioMode) -> torch.Tensor:
    n = WINDOW_MEL // 2
    w = torch.ones(n)
    if mode == "seamless":
        r = torch.arange(n, dtype=torch.float32) + 0.5
        if k > 0:
            w = torch.minimum(w, r / RAMP_ROWS)
        if k < count - 1:
            w = torch.minimum(w, (n - r) / RAMP_ROWS)
    return w


EncodedWindows = dict[int, tuple[torch.Tensor, int]]  # a clip's encoded 30 s windows by index: states, valid rows


def feature_rows(
    encoder: WhisperFeatureEncoder, waveform, rows: range | None = None, mode: AudioMode = "seamless",
    ceiling: float | None = None, cache: EncodedWindows | None = None,
) -> torch.Tensor:
    """Whisper hidden states at 50 rows/s for `rows` of the clip (default all): (len(rows), layers + 1, C).

    Only the windows overlapping `rows` are encoded (in one batch), so a chunk gets exactly the rows that the
    whole clip would give it, given the clip's `ceiling` (computed here when not passed).
    `cache` (one per clip, mode and ceiling) keeps the windows this call used, and windows found in it are not
    encoded again: a 30 s window covers a dozen chunks, which a worker preparing them in order then encodes once.
    """
    audio = _as_audio(waveform)
    total_mel = audio.numel() // HOP
    total_rows = total_mel // 2
    rows = rows if rows is not None else range(total_rows)
    if rows.start < 0 or rows.stop > total_rows or not len(rows):
        raise ValueError(f"rows {rows.start}..{rows.stop} outside the clip's {total_rows} rows")
    if ceiling is None:
        ceiling = mel_ceiling(audio, encoder.dims.n_mels)
    starts = _window_starts(total_mel, mode)
    needed = [k for k, s in enumerate(starts) if s // 2 < rows.stop and (s + WINDOW_MEL) // 2 > rows.start]
    cache = {} if cache is None else cache
    fresh = [k for k in needed if k not in cache]
    if fresh:
        mels = [log_mel(audio, encoder.dims.n_mels, range(starts[k], min(starts[k] + WINDOW_MEL, total_mel)), ceiling) for k in fresh]
        states, valid = _encode_windows(encoder, mels)
        cache.update(zip(fresh, zip(states, valid)))
    for k in [k for k in cache if k not in needed]:
        del cache[k]
    acc = torch.zeros(len(rows), *cache[needed[0]][0].shape[1:])
    weight_sum = torch.zeros(len(rows))
    for k in needed:
        st, v = cache[k]
        a = starts[k] // 2
        lo, hi = max(a, rows.start), min(a + v, rows.stop)
        if mode == "upstream":  # hard windows: each row belongs to exactly one window
            acc[lo - rows.start : hi - rows.start] = st[lo - a : hi - a]
            weight_sum[lo - rows.start : hi - rows.start] = 1
            continue
        w = _window_weights(k, len(starts), mode)[lo - a : hi - a]
        acc[lo - rows.start : hi - rows.start] += st[lo - a : hi - a] * w[:, None, None]
        weight_sum[lo - rows.start : hi - rows.start] += w
    return acc / weight_sum[:, None, None]


def feature_array(encoder: WhisperFeatureEncoder, waveform, mode: AudioMode = "seamless") -> torch.Tensor:
    """Whisper hidden states at 50 rows/s over the whole clip: (N, layers + 1, C), N = mel frames // 2."""
    return feature_rows(encoder, waveform, None, mode)


def _encode_windows(encoder: WhisperFeatureEncoder, mels: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Encode mel windows (each zero-padded to 30 s) in one batch; returns states and each window's valid rows."""
    param = next(encoder.parameters())
    batch = torch.stack([torch.nn.functional.pad(m, (0, WINDOW_MEL - m.shape[1])) for m in mels])
    return encoder(batch.to(param.device, param.dtype)).float().cpu(), [m.shape[1] // 2 for m in mels]


def upstream_num_frames(rows: int) -> int:
    """Upstream's chunk count at 25 fps: its loop overshoots the audio by two frames."""
    return rows // 2 + 2


def frame_indices(num_frames: int, rows: int) -> torch.Tensor:
    """Feature rows used by each video frame: (num_frames, 10), clamped to the clip."""
    before, after = CONTEXT_ROWS
    step = ROWS_PER_SECOND // FPS
    centre = torch.arange(num_frames)[:, None] * step
    offsets = torch.arange(-before * step, (after + 1) * step)[None, :]
    return (centre + offsets).clamp(0, rows - 1)


def tokens_per_frame(layers: int) -> int:
    """Rows of one frame's conditioning: `frame_indices`' rows for each of the encoder's `layers` states."""
    before, after = CONTEXT_ROWS
    return (before + after + 1) * (ROWS_PER_SECOND // FPS) * layers


def _flatten(picked: torch.Tensor) -> torch.Tensor:
    """(F, 10, layers, C) -> (F, 10 * layers, C), time-major then layer-minor as upstream."""
    return picked.reshape(picked.shape[0], -1, picked.shape[-1])


def frame_features(features: torch.Tensor, frames: torch.Tensor | range | list[int]) -> torch.Tensor:
    """Per-frame conditioning for the given 25 fps frame numbers: (len(frames), 10 * layers, C)."""
    frames = torch.as_tensor(list(frames) if not torch.is_tensor(frames) else frames)
    idx = frame_indices(int(frames.max()) + 1 if len(frames) else 0, features.shape[0])[frames]
    return _flatten(features[idx])


def chunk_features(
    encoder: WhisperFeatureEncoder, waveform, frames: range, mode: AudioMode = "seamless", ceiling: float | None = None,
    cache: EncodedWindows | None = None,
) -> torch.Tensor:
    """Per-frame conditioning for a run of 25 fps frames, encoding only the rows those frames use: equal to
    `frame_features(feature_array(...), frames)` given the clip's `ceiling` (`cache`: see `feature_rows`)."""
    total_rows = _as_audio(waveform).numel() // HOP // 2
    idx = frame_indices(frames.stop, total_rows)[frames.start :]
    rows = range(int(idx.min()), int(idx.max()) + 1)
    return _flatten(feature_rows(encoder, waveform, rows, mode, ceiling, cache)[idx - rows.start])

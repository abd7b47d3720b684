"""SyncNet v2 (Chung & Zisserman, "Out of time", 2016): the audio-visual network behind the LSE-D / LSE-C lip-sync
scores of the Wav2Lip and LatentSync papers, and its MFCC front end.

`SyncNet()` has the layers and state-dict keys of `syncnet_python`'s `S(num_layers_in_fc_layers=1024)`, so the
published `syncnet_v2.model` (a plain state dict) loads strictly. Inputs are not normalised: lips are BGR pixel
values 0..255, audio is MFCC of 16 kHz int16 samples, as the published weights were trained.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import scipy.fft
import torch
from torch import nn

from .checkpoint import CheckpointMismatchError, checkpoints_root, load_state_dict_strict

EMBEDDING = 1024
LIP_FRAMES = 5  # video frames per lip window (0.2 s at 25 fps)
MFCC_PER_FRAME = 4  # MFCC columns (10 ms each) per 25 fps video frame
MFCC_WINDOW = 20  # MFCC columns per audio window: the same 0.2 s
SCORERS = ("syncnet-v2", "tiny-random")


def _layers(conv, norm, pool, specs) -> nn.Sequential:
    """conv, batch norm, ReLU and an optional max pool per spec (in, out, kernel, stride, padding, pool), where
    pool is (kernel, stride, padding) or None. The module indices are those of the published state dict."""
    layers: list[nn.Module] = []
    for c_in, c_out, kernel, stride, padding, pooling in specs:
        layers += [conv(c_in, c_out, kernel, stride, padding), norm(c_out), nn.ReLU(inplace=True)]
        if pooling:
            layers.append(pool(*pooling))
    return nn.Sequential(*layers)


class SyncNet(nn.Module):
    """Embeds 5-frame lip windows (3, 5, 224, 224) and 0.2 s MFCC windows (1, 13, 20) in one space, where the
    L2 distance is small for speech and lips in sync.

    `width` scales the channels of every layer: 1 is the published network (about 3 GFLOP per window, most of
    it in the first lip convolution), `tiny-random` uses 1/8."""

    def __init__(self, num_layers_in_fc_layers: int = EMBEDDING, width: float = 1.0):
        super().__init__()
        c = {n: max(1, round(n * width)) for n in (64, 96, 192, 256, 384, 512)}
        self.netcnnaud = _layers(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, [
            (1, c[64], (3, 3), 1, 1, ((1, 1), 1, 0)),
            (c[64], c[192], (3, 3), 1, 1, ((3, 3), (1, 2), 0)),
            (c[192], c[384], (3, 3), 1, 1, None),
            (c[384], c[256], (3, 3), 1, 1, None),
            (c[256], c[256], (3, 3), 1, 1, ((3, 3), 2, 0)),
            (c[256], c[512], (5, 4), 1, 0, None),
        ])
        self.netfcaud = self._head(c[512], num_layers_in_fc_layers)
        self.netfclip = self._head(c[512], num_layers_in_fc_layers)
        self.netcnnlip = _layers(nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, [
            (3, c[96], (5, 7, 7), (1, 2, 2), 0, ((1, 3, 3), (1, 2, 2), 0)),
            (c[96], c[256], (1, 5, 5), (1, 2, 2), (0, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))),
            (c[256], c[256], (1, 3, 3), 1, (0, 1, 1), None),
            (c[256], c[256], (1, 3, 3), 1, (0, 1, 1), None),
            (c[256], c[256], (1, 3, 3), 1, (0, 1, 1), ((1, 3, 3), (1, 2, 2), 0)),
            (c[256], c[512], (1, 6, 6), 1, 0, None),
        ])

    @staticmethod
    def _head(width: int, out: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Linear(width, out))

    def embed_audio(self, mfcc_windows: torch.Tensor) -> torch.Tensor:
        """(N, 1, 13, 20) MFCC windows -> (N, 1024)."""
        return self.netfcaud(self.netcnnaud(mfcc_windows).flatten(1))

    def embed_lips(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, 224, 224) BGR 0..255 -> (B, F - 4, 1024): one embedding per 5-frame window. Only the first
        convolution looks across frames, so a run of F frames gives all its windows in one pass."""
        mid = self.netcnnlip(frames)  # (B, channels, F - 4, 1, 1)
        b, c, windows = mid.shape[:3]
        return self.netfclip(mid.permute(0, 2, 1, 3, 4).reshape(b * windows, c)).reshape(b, windows, -1)


def _hz_to_mel(hz):
    return 2595 * np.log10(1 + np.asarray(hz) / 700)


def _mel_to_hz(mel):
    return 700 * (10 ** (np.asarray(mel) / 2595) - 1)


def _mel_filterbank(filters: int, nfft: int, sample_rate: int) -> np.ndarray:
    """(filters, nfft // 2 + 1) triangles on FFT bins rounded down, as python_speech_features builds them."""
    mels = np.linspace(0, _hz_to_mel(sample_rate / 2), filters + 2)
    edges = np.floor((nfft + 1) * _mel_to_hz(mels) / sample_rate)
    low, mid, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bins = np.arange(nfft // 2 + 1)[None]
    rising = (bins - low) / np.maximum(mid - low, 1)  # an empty triangle side leaves its bins at zero
    falling = (high - bins) / np.maximum(high - mid, 1)
    return np.where((bins >= low) & (bins < mid), rising, np.where((bins >= mid) & (bins < high), falling, 0.0))


def mfcc(audio: np.ndarray, sample_rate: int = 16_000, coefficients: int = 13) -> np.ndarray:
    """(coefficients, frames) float32 MFCC of int16 samples: python_speech_features.mfcc with its defaults, which
    `syncnet_python` uses (25 ms rectangular frames every 10 ms, pre-emphasis 0.97, 26 mel filters, 512-point
    FFT, DCT-II, lifter 22, log frame energy as coefficient 0)."""
    signal = np.asarray(audio).astype(np.float64)
    frame, step, nfft = round(0.025 * sample_rate), round(0.01 * sample_rate), 512
    signal = np.append(signal[:1], signal[1:] - 0.97 * signal[:-1])
    count = 1 if signal.size <= frame else 1 + math.ceil((signal.size - frame) / step)
    padded = np.zeros((count - 1) * step + frame)
    padded[: signal.size] = signal[: padded.size]
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::step]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    tiny = np.finfo(np.float64).eps
    energy = power.sum(1)
    bands = power @ _mel_filterbank(26, nfft, sample_rate).T
    cepstra = scipy.fft.dct(np.log(np.where(bands == 0, tiny, bands)), type=2, axis=1, norm="ortho")[:, :coefficients]
    cepstra *= 1 + 11 * np.sin(np.pi * np.arange(coefficients) / 22)
    cepstra[:, 0] = np.log(np.where(energy == 0, tiny, energy))
    return cepstra.T.astype(np.float32)


def syncnet_path(root: str | Path | None = None) -> Path:
    return checkpoints_root(root) / "syncnet" / "syncnet_v2.model"


def load_syncnet_state(model: SyncNet, path: str | Path) -> None:
    """Load `syncnet_v2.model` strictly: a missing, unexpected or mis-shaped key is an error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError):
        raise CheckpointMismatchError(f"{path}: not a PyTorch state dict") from None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(state).__name__}")
    load_state_dict_strict(model, state, str(path))


def check_syncnet_file(path: str | Path) -> None:
    """Raise CheckpointMismatchError unless `path` holds SyncNet v2's state dict."""
    with torch.device("meta"):
        model = SyncNet()
    load_syncnet_state(model, path)


def scorer_weights(name: str, root: str | Path | None = None) -> Path | None:
    """The weights file the named scoring model loads (None: random weights). Raises, naming the file and the
    download command, when it is absent: a check to make before any video work starts."""
    if name not in SCORERS:
        raise ValueError(f"unknown scoring model {name!r}: {' or '.join(SCORERS)}")
    if name == "tiny-random":
        return None
    path = syncnet_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"SyncNet v2 weights not found at {path}: run `lipsync-ray download --eval` "
                                "(or set LIPSYNC_CHECKPOINTS)")
    return path


def load_syncnet(name: str = "syncnet-v2", root: str | Path | None = None, device: str | torch.device = "cpu") -> SyncNet:
    """The published SyncNet v2 from the checkpoints root, or `tiny-random`: the network at 1/8 width with seeded
    random weights, for tests and smoke runs (its scores mean nothing). Always fp32: scores are compared with
    published ones."""
    path = scorer_weights(name, root)
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return SyncNet(num_layers_in_fc_layers=128, width=1 / 8).eval().to(device)
    with torch.device("meta"):
        model = SyncNet()
    load_syncnet_state(model, path)
    return model.eval().to(device)

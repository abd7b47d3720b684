"""GFPGAN v1.4 face restoration in plain torch: loads the published `GFPGANv1.4.pth` unchanged.

The network is the `gfpgan` package's `GFPGANv1Clean` (a U-Net encoder whose features give a StyleGAN2 decoder
its style codes and, through SFT, per-pixel scale and shift), written without basicsr, which needs torchvision.
Constructor keywords, state-dict keys and shapes are the package's; the forward numerics match it with
`randomize_noise=False` (tests/data/gfpgan_equivalence.pt). This model has no random-noise mode: the decoder
always injects the checkpoint's fixed noise buffers, since fresh noise per frame is flicker on video.

Modulated convolutions scale the input's channels by the style and the output by the demodulation factor, one
convolution for the whole batch, instead of the package's per-sample weights in a grouped convolution: the same
numbers, and a plain convolution the GPU runs at full speed for any batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointMismatchError, checkpoints_root, load_state_dict_strict

GFPGAN_FILE = Path("gfpgan") / "GFPGANv1.4.pth"  # under the checkpoints root
GFPGAN_URL = "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/GFPGANv1.4.pth"

# the constructor the package uses for v1.3 / v1.4
GFPGAN_V14 = dict(
    out_size=512, num_style_feat=512, channel_multiplier=2, num_mlp=8, input_is_latent=True, different_w=True,
    narrow=1, sft_half=True,
)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def _channels(narrow: float, channel_multiplier: int) -> dict[int, int]:
    """Feature channels at each resolution of StyleGAN2 (the GFPGAN encoder uses half of them)."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {size: int(c * narrow) for size, c in base.items()}


class ModulatedConv2d(nn.Module):
    """StyleGAN2's style-modulated convolution (no bias), optionally after a bilinear 2x upsampling."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.demodulate, self.upsample = demodulate, upsample
        self.modulation = nn.Linear(num_style_feat, in_channels)
        nn.init.ones_(self.modulation.bias)
        fan_in = in_channels * kernel_size**2
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size) / fan_in**0.5)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style)  # (b, in)
        weight = self.weight[0]  # (out, in, k, k)
        if self.upsample:
            x = _resize(x, 2)
        out = F.conv2d(x * s[:, :, None, None], weight, padding=weight.shape[-1] // 2)
        if self.demodulate:  # 1 / |weight * s| per sample and output channel
            demod = torch.rsqrt(s.square() @ weight.square().sum((2, 3)).T + 1e-8)
            out = out * demod[:, :, None, None]
        return out


class StyleConv(nn.Module):
    """Modulated conv, fixed noise scaled by a learned weight, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # strength of the injected noise
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 3, num_style_feat, upsample=upsample)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * 2**0.5
        return _lrelu(out + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB, added to the (upsampled) image of the previous resolution."""

    def __init__(self, in_channels: int, num_style_feat: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (_resize(skip, 2) if self.upsample else skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))


class PixelNorm(nn.Module):
    """Normalise the style codes over dim 1, as the package does (for a (b, layers, c) input that is the layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8)


class StyleGAN2DecoderSFT(nn.Module):
    """StyleGAN2 generator whose features are modulated by the encoder's SFT scale and shift at each resolution."""

    def __init__(self, out_size: int, num_style_feat: int, num_mlp: int, channel_multiplier: int, narrow: float,
                 sft_half: bool):
        super().__init__()
        self.sft_half = sft_half
        mlp: list[nn.Module] = [PixelNorm()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)
        channels = _channels(narrow, channel_multiplier)
        log_size = int(math.log2(out_size))
        self.constant_input = ConstantInput(channels[4])
        self.style_conv1 = StyleConv(channels[4], channels[4], num_style_feat)
        self.to_rgb1 = ToRGB(channels[4], num_style_feat, upsample=False)
        self.style_convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        in_channels = channels[4]
        for size in (2**i for i in range(3, log_size + 1)):
            self.style_convs.append(StyleConv(in_channels, channels[size], num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(channels[size], channels[size], num_style_feat))
            self.to_rgbs.append(ToRGB(channels[size], num_style_feat))
            in_channels = channels[size]
        self.noises = nn.Module()
        for i in range(2 * (log_size - 2) + 1):  # one per style conv: 4, 8, 8, 16, 16, ... pixels square
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2)))

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor]) -> torch.Tensor:
        """`latent` (b, layers, c): one style code per modulated conv and to-RGB; `conditions`: SFT scale, shift
        for each resolution from 8 px up."""
        noises = list(self.noises.buffers())
        out = self.constant_input.weight.expand(latent.shape[0], -1, -1, -1)
        out = self.style_conv1(out, latent[:, 0], noises[0])
        image = self.to_rgb1(out, latent[:, 1])
        for level, to_rgb in enumerate(self.to_rgbs):
            i = 2 * level + 1
            out = self.style_convs[i - 1](out, latent[:, i], noises[i])
            if level < len(conditions) // 2:
                scale, shift = conditions[2 * level], conditions[2 * level + 1]
                if self.sft_half:  # SFT on the second half of the channels only
                    kept, modulated = out.chunk(2, dim=1)
                    out = torch.cat([kept, modulated * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = self.style_convs[i](out, latent[:, i + 1], noises[i + 1])
            image = to_rgb(out, latent[:, i + 2], image)
        return image


class ResBlock(nn.Module):
    """Residual block that halves or doubles the resolution (bilinear)."""

    def __init__(self, in_channels: int, out_channels: int, factor: float):
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _lrelu(self.conv2(_resize(_lrelu(self.conv1(x)), self.factor)))
        return out + self.skip(_resize(x, self.factor))


def _sft(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(channels, out_channels, 3, padding=1)
    )


class GFPGAN(nn.Module):
    """GFPGANv1Clean. `GFPGAN(**GFPGAN_V14)` loads `GFPGANv1.4.pth`'s `params_ema` with strict=True.

    `model(x)` on RGB faces in [-1, 1] aligned to the FFHQ template (b, 3, out_size, out_size) returns
    `(image, out_rgbs)`: the restored faces in about [-1, 1] (unclamped) and the encoder's intermediate RGB
    images from 8 px up (empty with `return_rgb=False`)."""

    def __init__(self, out_size: int, num_style_feat: int = 512, channel_multiplier: int = 1,
                 decoder_load_path: str | None = None, fix_decoder: bool = True, num_mlp: int = 8,
                 input_is_latent: bool = False, different_w: bool = False, narrow: float = 1, sft_half: bool = False):
        super().__init__()
        self.input_is_latent, self.different_w, self.num_style_feat = input_is_latent, different_w, num_style_feat
        self.log_size = int(math.log2(out_size))
        channels = _channels(narrow * 0.5, channel_multiplier)
        sizes = [2**i for i in range(3, self.log_size + 1)]  # 8 .. out_size
        self.conv_body_first = nn.Conv2d(3, channels[out_size], 1)
        self.conv_body_down = nn.ModuleList(ResBlock(channels[s], channels[s // 2], 0.5) for s in reversed(sizes))
        self.final_conv = nn.Conv2d(channels[4], channels[4], 3, padding=1)
        self.conv_body_up = nn.ModuleList(ResBlock(channels[s // 2], channels[s], 2) for s in sizes)
        self.toRGB = nn.ModuleList(nn.Conv2d(channels[s], 3, 1) for s in sizes)
        self.num_latent = 2 * self.log_size - 2
        self.final_linear = nn.Linear(channels[4] * 16, num_style_feat * (self.num_latent if different_w else 1))
        self.stylegan_decoder = StyleGAN2DecoderSFT(out_size, num_style_feat, num_mlp, channel_multiplier, narrow, sft_half)
        if decoder_load_path:
            pretrained = torch.load(decoder_load_path, map_location="cpu", weights_only=True)["params_ema"]
            load_state_dict_strict(self.stylegan_decoder, pretrained, decoder_load_path)
        if fix_decoder:
            self.stylegan_decoder.requires_grad_(False)
        # the decoder has twice the encoder's channels: SFT covers half of them, or all
        sft = 1 if sft_half else 2
        self.condition_scale = nn.ModuleList(_sft(channels[s], sft * channels[s]) for s in sizes)
        self.condition_shift = nn.ModuleList(_sft(channels[s], sft * channels[s]) for s in sizes)

    def forward(self, x: torch.Tensor, return_rgb: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = _lrelu(self.final_conv(feat))
        style = self.final_linear(feat.flatten(1))
        style = style.view(len(style), -1, self.num_style_feat) if self.different_w else style
        conditions, out_rgbs = [], []
        for block, skip, scale, shift, to_rgb in zip(
            self.conv_body_up, reversed(skips), self.condition_scale, self.condition_shift, self.toRGB
        ):
            feat = block(feat + skip)
            conditions += [scale(feat), shift(feat)]
            if return_rgb:
                out_rgbs.append(to_rgb(feat))
        if not self.input_is_latent:
            style = self.stylegan_decoder.style_mlp(style)
        latent = style if style.ndim == 3 else style[:, None].expand(-1, self.num_latent, -1)
        return self.stylegan_decoder(latent, conditions), out_rgbs


def read_gfpgan_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a GFPGAN checkpoint: its `params_ema` (the weights the package restores with), else
    its `params`."""
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("params_ema", "params"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            return blob[key]
    found = ", ".join(map(str, blob)) if isinstance(blob, dict) else type(blob).__name__
    raise CheckpointMismatchError(f"{path}: expected a GFPGAN checkpoint with `params_ema` or `params`, found {found}")


@dataclass(frozen=True)
class RestorerPreset:
    name: str
    config: dict[str, Any] = field(default_factory=lambda: dict(GFPGAN_V14))
    file: Path | None = GFPGAN_FILE  # under the checkpoints root; None: seeded random weights
    description: str = ""


RESTORERS: dict[str, RestorerPreset] = {
    "gfpgan": RestorerPreset("gfpgan", description="GFPGAN v1.4, 512 px faces"),
    "tiny-random": RestorerPreset(
        "tiny-random", dict(GFPGAN_V14, out_size=128, num_style_feat=32, narrow=0.0625), file=None,
        description="small random-weight GFPGAN for tests and smoke runs: MEANINGLESS restorations",
    ),
    "gfpgan-random": RestorerPreset(
        "gfpgan-random", file=None, description="GFPGAN v1.4's architecture with random weights, for benchmarks: MEANINGLESS restorations",
    ),
}


def gfpgan_path(root: str | Path | None = None) -> Path:
    return checkpoints_root(root) / GFPGAN_FILE


def get_restorer(name: str) -> RestorerPreset:
    if name not in RESTORERS:
        raise ValueError(f"unknown face restorer {name!r}: choose one of {', '.join(RESTORERS)}")
    return RESTORERS[name]


def restorer_weights(name: str, root: str | Path | None = None) -> Path | None:
    """The weights file the named restorer loads (None: random weights). Raises, naming the file and the
    download command, when it is absent: a check to make before any video work starts."""
    preset = get_restorer(name)
    if preset.file is None:
        return None
    path = checkpoints_root(root) / preset.file
    if not path.is_file():
        raise FileNotFoundError(
            f"GFPGAN v1.4 weights not found at {path}: run `lipsync-ray download --enhance` "
            f"(or download {GFPGAN_URL} and put it there)"
        )
    return path


def load_restorer(name: str = "gfpgan", root: str | Path | None = None) -> GFPGAN:
    """The named restorer in eval mode on the CPU: GFPGAN v1.4 from the checkpoints root (strict), or seeded
    random weights for `tiny-random`."""
    path, config = restorer_weights(name, root), RESTORERS[name].config
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return GFPGAN(**config).eval()
    with torch.device("meta"):
        model = GFPGAN(**config)
    load_state_dict_strict(model, read_gfpgan_checkpoint(path), str(path))
    return model.eval()

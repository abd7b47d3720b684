"""The SD VAE (diffusers' AutoencoderKL) with its GroupNorm + SiLU pairs on the fused kernels, channels-last.

Every ResNet block and both output heads of the VAE normalise and then apply SiLU at up to 256 x 256 pixels (512 x
512 at 512 px faces) with 128 channels: memory-bound passes that PyTorch runs as a GroupNorm and a separate SiLU,
and on channels-last input a GroupNorm that copies to contiguous first. `fuse_group_norms` swaps those pairs for
`GroupNormSiLU` (same parameters, same state-dict keys), which is one Triton pass family (`fused.group_norm`, per
image) on a GPU and PyTorch's own two steps elsewhere (the same math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from . import fused


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm over each image, then SiLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and fused.supported(x):
            return fused.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, frames=1, silu=True)
        return F.silu(super().forward(x))


def _fused(norm: nn.GroupNorm) -> GroupNormSiLU:
    """A GroupNormSiLU sharing `norm`'s parameters."""
    out = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
    out.weight, out.bias = norm.weight, norm.bias
    return out


def fuse_group_norms(vae: AutoencoderKL) -> AutoencoderKL:
    """In place: each GroupNorm that a SiLU follows becomes a GroupNormSiLU and the SiLU an identity (ResNet
    blocks without a timestep input, as in the VAE, and the encoder's and decoder's `conv_norm_out`/`conv_act`).
    Calling it again changes nothing."""
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            fusible = (
                module.time_emb_proj is None and isinstance(module.nonlinearity, nn.SiLU)
                and all(type(n) is nn.GroupNorm for n in (module.norm1, module.norm2))
            )
            if fusible:
                module.norm1, module.norm2, module.nonlinearity = _fused(module.norm1), _fused(module.norm2), nn.Identity()
        elif type(getattr(module, "conv_norm_out", None)) is nn.GroupNorm and isinstance(getattr(module, "conv_act", None), nn.SiLU):
            module.conv_norm_out, module.conv_act = _fused(module.conv_norm_out), nn.Identity()
    return vae.to(memory_format=torch.channels_last)

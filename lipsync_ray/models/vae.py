"""The SD VAE (diffusers' AutoencoderKL) with its GroupNorm + SiLU pairs and its ResNets' bias and residual adds on
the fused kernels, channels-last.

Every ResNet block and both output heads of the VAE normalise and then apply SiLU at up to 256 x 256 pixels (512 x
512 at 512 px faces) with 128 channels: memory-bound passes that PyTorch runs as a GroupNorm and a separate SiLU,
and on channels-last input a GroupNorm that copies to contiguous first. Each ResNet block then adds its
convolutions' biases (cuDNN: a pass each), the residual and a division by its output scale of 1, more passes at
those sizes. `fuse_vae` swaps the pairs for `GroupNormSiLU` and the blocks for `VAEResnetBlock`
(same parameters, same state-dict keys): the Triton kernels (`fused.group_norm` per image, `fused.add_bias`) on a
GPU and PyTorch's own steps elsewhere (the same math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from . import fused
from .blocks import conv_residual


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm over each image of `x + bias` (one value per channel, e.g. the bias of the convolution before it),
    then SiLU."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 4 and fused.supported(x):
            frame_bias = None if bias is None else bias.expand(x.shape[0], -1)
            return fused.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, 1, True, frame_bias)
        return F.silu(super().forward(x if bias is None else x + bias[:, None, None]))


class VAEResnetBlock(ResnetBlock2D):
    """diffusers' ResnetBlock2D as the VAE has it (no timestep, no resampling, output scale 1, 1x1 shortcut), with
    GroupNormSiLU norms: conv1's bias is added by norm2 as it reads, conv2's and the shortcut's by the residual add."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.conv2d(self.norm1(input_tensor), self.conv1.weight, padding=self.conv1.padding)
        return conv_residual(input_tensor, self.norm2(h, self.conv1.bias), self.conv2, self.conv_shortcut)


def _fused(norm: nn.GroupNorm) -> GroupNormSiLU:
    """A GroupNormSiLU sharing `norm`'s parameters."""
    out = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
    out.weight, out.bias = norm.weight, norm.bias
    return out


def fuse_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """In place: each GroupNorm that a SiLU follows becomes a GroupNormSiLU and the SiLU an identity (ResNet
    blocks without a timestep input, as in the VAE, which become VAEResnetBlocks, and the encoder's and decoder's
    `conv_norm_out`/`conv_act`). Calling it again changes nothing."""
    for module in vae.modules():
        if type(module) is ResnetBlock2D and _vae_block(module):
            module.norm1, module.norm2, module.nonlinearity = _fused(module.norm1), _fused(module.norm2), nn.Identity()
            module.__class__ = VAEResnetBlock  # the same module and parameters, with the fused forward
        elif type(getattr(module, "conv_norm_out", None)) is nn.GroupNorm and isinstance(getattr(module, "conv_act", None), nn.SiLU):
            module.conv_norm_out, module.conv_act = _fused(module.conv_norm_out), nn.Identity()
    return vae.to(memory_format=torch.channels_last)


def _vae_block(block: ResnetBlock2D) -> bool:
    """Whether a ResnetBlock2D is one that VAEResnetBlock's forward computes exactly."""
    convs = [block.conv1, block.conv2] + ([block.conv_shortcut] if block.conv_shortcut is not None else [])
    return (
        block.time_emb_proj is None and block.upsample is None and block.downsample is None
        and block.output_scale_factor == 1 and block.dropout.p == 0 and isinstance(block.nonlinearity, nn.SiLU)
        and all(type(n) is nn.GroupNorm for n in (block.norm1, block.norm2))
        and all(c.bias is not None and c.stride == (1, 1) and c.dilation == (1, 1) and c.groups == 1 for c in convs)
        and all(c.padding_mode == "zeros" for c in convs)
        and (block.conv_shortcut is None or block.conv_shortcut.kernel_size == (1, 1))
    )
